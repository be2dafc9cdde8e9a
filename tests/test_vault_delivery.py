"""Secrets delivered to a job's instances: the job's secret as env, an engine token with only the job's policies,
and an instance that cannot start while a secret it needs is out of its policies' reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port
from vault_support import VaultServer

APP = Path(__file__).parent / "apps" / "vault_reader.py"


def shipyard(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_DNS_PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def wait_for_file(path: Path, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.2)
    raise AssertionError(f"{path} was not written in {timeout}s")


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultServer]:
    server = VaultServer(tmp_path / "data", "--vault-dev", "--vault-dev-root-token-id", "delivery-root").start()
    admin = server.client("delivery-root")
    admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": "mediahub-db-password"})
    admin.secrets.kv.v2.create_or_update_secret("billing/db", secret={"password": "billing-db-password"})
    admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
    yield server
    server.stop()


def project(folder: Path, out: Path, secret: str) -> Path:
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
    stop_grace: 1s
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
