"""Snapshots against a real server: save, wipe, restore, compare (API and `shipyard snapshot` CLI), the file
format, and that a damaged file changes nothing."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import consul
import requests

from support import ServerProcess


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.url, "snapshot", *args],
                          capture_output=True, text=True, timeout=60)


def _server_help() -> str:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "server", "--help"], capture_output=True,
                          text=True, timeout=60).stdout


def _state(c: consul.Consul) -> tuple[object, ...]:
    _, kv = c.kv.get("", recurse=True)
    return (
        sorted((e["Key"], e["Value"]) for e in kv or []),
        sorted(c.agent.services()),
        sorted((e["Kind"], e["Name"]) for e in c.config.list(kind="service-defaults")),
        sorted(q["Name"] for q in c.query.list()),
        sorted(s["Name"] for s in c.session.list()[1]),
    )


def _fill(c: consul.Consul) -> None:
    for i in range(20):
        c.kv.put(f"app/config/{i}", f"value-{i}")
    c.kv.put("binary", b"\x00\xff\x10")
    c.agent.service.register("snapsvc", port=8123, tags=["a"])
    c.config.set(kind="service-defaults", name="snapsvc", config_entry={"Protocol": "http"})
    c.query.create("snapsvc", "snapq")
    c.session.create(name="ttl-session", ttl=30)


def test_save_wipe_restore_compare_over_the_api(fresh_server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=fresh_server.http_port)
    _fill(c)
    before = _state(c)
    snapshot = c.snapshot.save()
    assert snapshot[:2] == b"\x1f\x8b"
    # wipe: every key, service, entry and query goes
    c.kv.delete("", recurse=True)
    c.agent.service.deregister("snapsvc")
    c.config.delete(kind="service-defaults", name="snapsvc")
    for query in c.query.list():
        c.query.delete(query["ID"])
    c.kv.put("written-after", "x")
    assert _state(c) != before
    assert c.snapshot.restore(snapshot) is True
    assert _state(c) == before
    assert c.kv.get("written-after")[1] is None


def test_file_format_is_a_verified_gzipped_tar(fresh_server: ServerProcess) -> None:
    data = requests.get(f"{fresh_server.url}/v1/snapshot", timeout=30).content
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        assert tar.getnames() == ["meta.json", "state.jsonl", "leases.json", "SHA256SUMS"]


def test_a_damaged_snapshot_changes_nothing(fresh_server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=fresh_server.http_port)
    c.kv.put("keep", "me")
    data = bytearray(c.snapshot.save())
    c.kv.put("keep", "newer")
    for damaged in (b"not a snapshot", bytes(data[: len(data) // 2])):
        response = requests.put(f"{fresh_server.url}/v1/snapshot", data=damaged, timeout=30)
        assert response.status_code == 400
    assert c.kv.get("keep")[1]["Value"] == b"newer"


def test_cli_save_and_restore(fresh_server: ServerProcess, tmp_path: Path) -> None:
    c = consul.Consul(host="127.0.0.1", port=fresh_server.http_port)
    _fill(c)
    before = _state(c)
    file = tmp_path / "backup.snap"
    saved = _cli(fresh_server, "save", str(file))
    assert saved.returncode == 0, saved.stderr
    assert file.stat().st_mode & 0o777 == 0o600
    c.kv.delete("", recurse=True)
    c.agent.service.deregister("snapsvc")
    inspected = _cli(fresh_server, "inspect", str(file))
    assert inspected.returncode == 0 and "Keys" in inspected.stdout
    restored = _cli(fresh_server, "restore", str(file))
    assert restored.returncode == 0, restored.stderr
    assert _state(c) == before


def test_cli_restore_of_a_bad_file_is_one_line(fresh_server: ServerProcess, tmp_path: Path) -> None:
    file = tmp_path / "bad.snap"
    file.write_bytes(b"garbage")
    result = _cli(fresh_server, "restore", str(file))
    assert result.returncode == 1
    assert "not a snapshot file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_save_wipe_restore_compare_on_etcd(tmp_path: Path) -> None:
    from support import EtcdProcess

    etcd = EtcdProcess(tmp_path / "etcd").start()
    # One server on this etcd, with the embedded bus: a server on etcd asks for that to be said.
    single = ["--single-server"] if "--single-server" in _server_help() else []
    server = ServerProcess(tmp_path / "data", "--store", f"etcd://127.0.0.1:{etcd.client_port}/snap-test", *single)
    try:
        server.start()
        c = consul.Consul(host="127.0.0.1", port=server.http_port)
        _fill(c)
        before = _state(c)
        snapshot = c.snapshot.save()
        c.kv.delete("", recurse=True)
        c.agent.service.deregister("snapsvc")
        c.config.delete(kind="service-defaults", name="snapsvc")
        assert _state(c) != before
        assert c.snapshot.restore(snapshot) is True
        assert _state(c) == before
    finally:
        server.stop()
        etcd.stop()


def test_cli_with_acls_needs_a_management_token(tmp_path: Path) -> None:
    token = "6f1c6f5e-3d2a-4d8e-9a57-0a1b2c3d4e5f"
    server = ServerProcess(tmp_path / "data", "--acl", "--acl-initial-management", token).start()
    try:
        file = tmp_path / "acl.snap"
        env = {k: v for k, v in os.environ.items() if not k.endswith("HTTP_TOKEN")}
        cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.url, "snapshot", "save", str(file)]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
        assert not file.exists()
        allowed = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                 env={**env, "CONSUL_HTTP_TOKEN": token})
        assert allowed.returncode == 0, allowed.stderr
        assert file.read_bytes()[:2] == b"\x1f\x8b"
    finally:
        server.stop()
