"""The `shipyard` CLI against a real server: kv, services, health, members, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import consul

from support import ServerProcess, free_port


def shipyard(server_addr: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", server_addr, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)


def test_kv_put_get_list_delete(server: ServerProcess) -> None:
    done = shipyard(server.addr, "kv", "put", "cli/app/level", "debug")
    assert done.returncode == 0, done.stderr
    assert b"Success" in done.stdout
    assert shipyard(server.addr, "kv", "put", "cli/app/blob", "-", stdin=b"\x00\xffbin").returncode == 0
    # Like `consul kv get`: the value and a newline (so a shell prompt doesn't land after it); -n: exact bytes.
    assert shipyard(server.addr, "kv", "get", "cli/app/level").stdout == b"debug\n"
    assert shipyard(server.addr, "kv", "get", "-n", "cli/app/blob").stdout == b"\x00\xffbin"
    listed = shipyard(server.addr, "kv", "list", "cli/").stdout.decode().split()
    assert listed == ["cli/app/blob", "cli/app/level"]
    assert shipyard(server.addr, "kv", "list", "cli/", "--separator", "/").stdout.decode().split() == ["cli/app/"]
    assert shipyard(server.addr, "kv", "delete", "cli/", "--recurse").returncode == 0
    missing = shipyard(server.addr, "kv", "get", "cli/app/level")
    assert missing.returncode == 1
    assert missing.stderr.decode().count("\n") == 1 and b"no key" in missing.stderr


def test_kv_cas_conflict_is_one_line_error(server: ServerProcess) -> None:
    assert shipyard(server.addr, "kv", "put", "cli/cas", "1").returncode == 0
    done = shipyard(server.addr, "kv", "put", "--cas", "1", "cli/cas", "2")
    assert done.returncode == 1
    assert b"not applied" in done.stderr and b"Traceback" not in done.stderr


def test_services_health_members(server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=server.http_port)
    c.agent.service.register("cli-web", service_id="cli-web-1", port=9999, tags=["v1"], check={"TTL": "30s"})
    c.agent.check.ttl_pass("service:cli-web-1")
    out = shipyard(server.addr, "services").stdout.decode()
    assert "cli-web" in out and "v1" in out
    out = shipyard(server.addr, "health", "cli-web").stdout.decode()
    assert "cli-web-1" in out and "passing" in out
    unknown = shipyard(server.addr, "health", "nope")
    assert unknown.returncode == 1 and b"no instances" in unknown.stderr
    out = shipyard(server.addr, "members").stdout.decode()
    assert "alive" in out and "server" in out


def test_unreachable_server_is_one_clear_line() -> None:
    done = shipyard(f"127.0.0.1:{free_port()}", "services")
    assert done.returncode == 1
    assert done.stderr.decode().strip().startswith("error: cannot reach the shipyard server")
    assert b"Traceback" not in done.stderr
