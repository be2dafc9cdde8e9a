"""Secrets delivered to a job's instances: the job's secret as env, an engine token with only the job's policies,
and an instance that cannot start while a secret it needs is out of its policies' reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hvac import exceptions as hvac_errors

from support import free_port
from vault_support import VaultServer

APP = Path(__file__).parent / "apps" / "vault_reader.py"


def shipyard(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_DNS_PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def wait_for_file(path: Path, timeout: float = 60, until: Callable[[dict[str, Any]], bool] = bool) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if path.exists():
            report = dict(json.loads(path.read_text()))
            if until(report):
                return report
        time.sleep(0.2)
    raise AssertionError(f"{path}: not the report wanted in {timeout}s (last: {report})")


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultServer]:
    server = VaultServer(tmp_path / "data", "--vault-dev", "--vault-dev-root-token-id", "delivery-root").start()
    admin = server.client("delivery-root")
    admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": "mediahub-db-password"})
    admin.secrets.kv.v2.create_or_update_secret("billing/db", secret={"password": "billing-db-password"})
    admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
    yield server
    server.stop()


def project(folder: Path, out: Path, secret: str, change_mode: str = "restart") -> Path:
    folder.mkdir()
    (folder / "shipyard.yaml").write_text(f"""\
services:
  mediahub:
    cmd: {sys.executable} {APP}
    instances: 1
    env:
      OUT: {out}
      OWN: secret/data/mediahub/db
      OTHER: secret/data/billing/db
    secrets:
      DB_PASSWORD: {secret}
    vault:
      policies: [mediahub-db]
      change_mode: {change_mode}
      files:
        db.password: {secret}
    stop_grace: 1s
    update: {{max_parallel: 1, min_healthy_time: 0s}}
""")
    return folder


def test_instance_gets_its_secret_as_env_and_a_token_limited_to_its_policies(vault: VaultServer,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    folder = project(tmp_path / "proj", out, "secret/data/mediahub/db#password")
    deployed = shipyard(vault.addr, "deploy", "--detach", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    report = wait_for_file(out)
    assert report["DB_PASSWORD"] == "mediahub-db-password"
    assert report["token_prefix"] == "hvs."
    assert (report["own"], report["other"]) == (200, 403)  # its token reads its secret, not another job's


def test_instance_waits_while_its_secret_is_out_of_its_policies_reach(vault: VaultServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    folder = project(tmp_path / "proj", out, "secret/data/billing/db#password")
    deployed = shipyard(vault.addr, "deploy", "--detach", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deadline = time.monotonic() + 30
    listed = ""
    while time.monotonic() < deadline and "permission denied" not in listed:
        listed = shipyard(vault.addr, "ps", "--all").stdout + shipyard(vault.addr, "ps").stdout
        time.sleep(0.5)
    assert "permission denied" in listed, listed
    assert not out.exists()


def test_bad_secret_references_are_refused_at_deploy(vault: VaultServer, tmp_path: Path) -> None:
    folder = project(tmp_path / "proj", tmp_path / "r.json", "no-field-here")
    refused = shipyard(vault.addr, "deploy", "--detach", "--dry-run", str(folder))
    assert refused.returncode == 1 and "secret reference" in refused.stdout + refused.stderr


@pytest.mark.parametrize("mode", ["restart", "signal"])
def test_a_changed_secret_reaches_the_instances(vault: VaultServer, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "report.json"
    folder = project(tmp_path / "proj", out, "secret/data/mediahub/db#password", change_mode=mode)
    deployed = shipyard(vault.addr, "deploy", "--detach", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    first = wait_for_file(out)
    assert first["DB_PASSWORD"] == "mediahub-db-password"
    vault.client("delivery-root").secrets.kv.v2.create_or_update_secret("mediahub/db",
                                                                       secret={"password": "rotated-password"})
    second = wait_for_file(out, until=lambda r: r["DB_PASSWORD"] == "rotated-password")
    if mode == "restart":  # a new instance, started with the new value in its environment
        assert second["pid"] != first["pid"] and second["signals"] == 0
    else:  # the same instance, told by a signal, read it again with its token
        assert second["pid"] == first["pid"] and second["signals"] == 1 and second["same_by_get"] is True
        # its secret file was rewritten before the signal, in the same folder
        assert second["secret_files"]["files"] == {"db.password": "rotated-password"}
        assert second["secret_files"]["dir"] == first["secret_files"]["dir"]


def test_secret_files_on_tmpfs_and_a_stopped_instance_loses_its_token_and_files(vault: VaultServer,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    folder = project(tmp_path / "proj", out, "secret/data/mediahub/db#password")
    deployed = shipyard(vault.addr, "deploy", "--detach", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    report = wait_for_file(out)
    files = report["secret_files"]
    assert files["files"] == {"db.password": "mediahub-db-password"}
    assert files["dir_mode"] == "0o700" and files["modes"] == {"db.password": "0o600"}
    assert files["dir"].startswith("/dev/shm/") or not Path("/dev/shm").is_dir()
    assert not str(files["dir"]).startswith(str(vault.data_dir))
    admin = vault.client("delivery-root")
    assert admin.auth.token.lookup_accessor(report["accessor"])["data"]["path"] == "auth/shipyard/job/mediahub"
    stopped = requests.post(f"{vault.url}/api/v1/jobs/mediahub/stop", json={}, timeout=10)
    assert stopped.status_code == 200, stopped.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(files["dir"]).exists():
        time.sleep(0.5)
    assert not Path(files["dir"]).exists()
    with pytest.raises(hvac_errors.InvalidRequest):  # the stopped instance's token was revoked by the sweep
        admin.auth.token.lookup_accessor(report["accessor"])


def _secrets_on_disk(data_dir: Path, values: list[str]) -> list[str]:
    """Files under the data dir holding any of `values`, read as bytes (logs, launch and state files included)."""
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            found += [f"{path}: {value[:6]}…" for value in values if value.encode() in blob]
    return found


def test_delivered_secrets_are_never_on_disk_and_restarts_get_them_again(vault: VaultServer, tmp_path: Path) -> None:
    """The instance's secret env and engine token reach its shim over a pipe: no file under the data dir holds them.
    Killed, it restarts with its secret; adopted by a restarted server and killed again, its agent fetches the
    secret anew (with a new token) for that restart."""
    out = tmp_path / "report.json"
    folder = project(tmp_path / "proj", out, "secret/data/mediahub/db#password")
    deployed = shipyard(vault.addr, "deploy", "--detach", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    first = wait_for_file(out)
    assert first["DB_PASSWORD"] == "mediahub-db-password" and first["token"].startswith("hvs.")
    assert _secrets_on_disk(vault.data_dir, ["mediahub-db-password", first["token"]]) == []
    os.kill(first["pid"], 9)
    second = wait_for_file(out, until=lambda r: r["pid"] != first["pid"])
    assert second["DB_PASSWORD"] == "mediahub-db-password" and second["own"] == 200
    vault.restart()  # the instance keeps running under its shim; the new server adopts it
    os.kill(second["pid"], 9)
    third = wait_for_file(out, until=lambda r: r["pid"] != second["pid"])
    assert third["DB_PASSWORD"] == "mediahub-db-password" and third["own"] == 200
    assert third["token"] != second["token"]  # fetched again after the server restart, under a fresh token
    assert _secrets_on_disk(vault.data_dir, ["mediahub-db-password", first["token"], second["token"],
                                             third["token"]]) == []
