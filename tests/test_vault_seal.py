"""The secrets engine's barrier against a real server: init, unseal, seal, health, rotation, dev mode, durability
and that nothing secret reaches the data dir in clear."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests
from hvac import exceptions as hvac_errors

from shipyard.secrets import shamir
from support import free_port
from vault_support import VaultServer, init_and_unseal


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultServer]:
    server = VaultServer(tmp_path / "data").start()
    yield server
    server.stop()


def test_init_unseal_seal_lifecycle(vault: VaultServer) -> None:
    client = vault.client()
    assert vault.raw("GET", "sys/health").status_code == 501
    assert client.sys.read_seal_status()["initialized"] is False
    result = client.sys.initialize(secret_shares=5, secret_threshold=3)
    assert len(result["keys"]) == 5 and len(result["keys_base64"]) == 5 and result["root_token"].startswith("hvs.")
    assert client.sys.is_sealed()
    assert vault.raw("GET", "sys/health").status_code == 503
    # Every other path answers as Vault does while sealed.
    sealed = vault.raw("GET", "secret/data/x", token=result["root_token"])
    assert (sealed.status_code, sealed.json()) == (503, {"errors": ["Vault is sealed"]})

    status = client.sys.submit_unseal_key(result["keys"][0])
    assert (status["sealed"], status["progress"], status["t"], status["n"]) == (True, 1, 3, 5)
    assert client.sys.submit_unseal_key(result["keys"][0])["progress"] == 1  # the same share twice counts once
    assert client.sys.submit_unseal_key(reset=True)["progress"] == 0
    client.sys.submit_unseal_keys(result["keys"][2:5])
    assert not client.sys.is_sealed()
    assert vault.raw("GET", "sys/health").status_code == 200

    client.token = result["root_token"]
    client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    client.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "p1"})
    client.sys.seal()
    assert client.sys.is_sealed()
    # Another subset of shares unseals too, and the data is back.
    client.sys.submit_unseal_keys([result["keys"][1], result["keys"][3], result["keys"][0]])
    assert client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)["data"]["data"] == {
        "password": "p1"}
    with pytest.raises(hvac_errors.InvalidRequest, match="already initialized"):
        client.sys.initialize(secret_shares=1, secret_threshold=1)


def test_wrong_shares_do_not_unseal(vault: VaultServer) -> None:
    client = vault.client()
    result = client.sys.initialize(secret_shares=3, secret_threshold=2)
    foreign = [share.hex() for share in shamir.split(os.urandom(32), 3, 2)]
    client.sys.submit_unseal_key(foreign[0])
    with pytest.raises(hvac_errors.InvalidRequest, match="failed to unseal"):
        client.sys.submit_unseal_key(foreign[1])
    status = client.sys.read_seal_status()
    assert (status["sealed"], status["progress"]) == (True, 0)
    # One right share mixed with a foreign one fails too; then the right two unseal.
    client.sys.submit_unseal_key(result["keys"][0])
    with pytest.raises(hvac_errors.InvalidRequest):
        client.sys.submit_unseal_key(foreign[2])
    with pytest.raises(hvac_errors.InvalidRequest, match="hex or base64"):
        client.sys.submit_unseal_key("not a key!")
    client.sys.submit_unseal_keys(result["keys_base64"][1:])
    assert not client.sys.is_sealed()


def test_health_codes_and_overrides(vault: VaultServer) -> None:
    assert vault.raw("GET", "sys/health", params={"uninitcode": "200"}).status_code == 200
    root, _ = init_and_unseal(vault)
    assert vault.raw("GET", "sys/health", params={"activecode": "299"}).status_code == 299
    body = vault.raw("GET", "sys/health").json()
    assert body["initialized"] is True and body["sealed"] is False and body["standby"] is False
    vault.client(root).sys.seal()
    assert vault.raw("GET", "sys/health").status_code == 503
    assert vault.raw("GET", "sys/health", params={"sealedcode": "200"}).status_code == 200


def test_seal_and_rotate_need_sudo(vault: VaultServer) -> None:
    root, _ = init_and_unseal(vault)
    admin = vault.client(root)
    admin.sys.create_or_update_policy("ops", 'path "sys/seal" { capabilities = ["update"] }')
    token = admin.auth.token.create(policies=["ops"])["auth"]["client_token"]
    with pytest.raises(hvac_errors.Forbidden):
        vault.client(token).sys.seal()
    assert not admin.sys.is_sealed()


def test_rotate_keeps_old_entries_readable_across_restart(vault: VaultServer) -> None:
    root, keys = init_and_unseal(vault)
    client = vault.client(root)
    client.sys.enable_secrets_engine("kv", path="kv", options={"version": "1"})
    client.secrets.kv.v1.create_or_update_secret("before", secret={"v": "old-term"}, mount_point="kv")
    assert client.sys.get_encryption_key_status()["data"]["term"] == 1
    client.sys.rotate_encryption_key()
    assert client.sys.get_encryption_key_status()["data"]["term"] == 2
    client.secrets.kv.v1.create_or_update_secret("after", secret={"v": "new-term"}, mount_point="kv")
    vault.restart()
    assert client.sys.is_sealed()  # a server with a data dir and without --vault-dev starts sealed
    client.sys.submit_unseal_keys(keys[:2])
    assert client.secrets.kv.v1.read_secret("before", mount_point="kv")["data"] == {"v": "old-term"}
    assert client.secrets.kv.v1.read_secret("after", mount_point="kv")["data"] == {"v": "new-term"}
    assert client.sys.get_encryption_key_status()["data"]["term"] == 2


def test_dev_mode_initialises_unseals_and_says_so(tmp_path: Path) -> None:
    server = VaultServer(tmp_path / "data", dev=True).start()
    try:
        line = next(line for line in server.log_tail(20000).splitlines() if "root token:" in line)
        assert "dev mode" in line
        token = line.rsplit("root token:", 1)[1].strip()
        client = server.client(token)
        assert not client.sys.is_sealed()
        client.secrets.kv.v2.create_or_update_secret("hello", secret={"a": "b"})  # kv v2 at secret/, as vault -dev
        assert client.secrets.kv.v2.read_secret_version("hello", raise_on_deleted_version=True)["data"]["data"] == {
            "a": "b"}
    finally:
        server.stop()


def test_vault_dev_with_data_dir_unseals_again_after_restart(tmp_path: Path) -> None:
    server = VaultServer(tmp_path / "data", "--vault-dev", "--vault-dev-root-token-id", "dev-root").start()
    try:
        client = server.client("dev-root")
        client.secrets.kv.v2.create_or_update_secret("kept", secret={"a": "1"})
        server.restart()
        assert client.secrets.kv.v2.read_secret_version("kept", raise_on_deleted_version=True)["data"]["data"] == {
            "a": "1"}
    finally:
        server.stop()


def _write_until_killed(server: VaultServer, token: str, worker: int, acked: dict[str, str],
                        stop: threading.Event) -> None:
    session = requests.Session()
    for n in range(10_000):
        if stop.is_set():
            return
        value = f"acknowledged-value-{worker}-{n}-{os.urandom(6).hex()}"
        try:
            response = session.post(f"{server.vault_url}/v1/secret/data/w{worker}/s{n}",
                                    json={"data": {"v": value}}, headers={"X-Vault-Token": token}, timeout=10)
        except requests.RequestException:
            return
        if response.status_code == 200:
            acked[f"w{worker}/s{n}"] = value


def test_kill9_during_writes_loses_no_acknowledged_secret_and_nothing_is_in_clear(vault: VaultServer) -> None:
    root, keys = init_and_unseal(vault, shares=3, threshold=2)
    client = vault.client(root)
    client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    client.sys.enable_secrets_engine("transit")
    client.secrets.transit.create_key("app-key")
    acked: dict[str, str] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=_write_until_killed, args=(vault, root, w, acked, stop)) for w in range(4)]
    for thread in threads:
        thread.start()
    while len(acked) < 60 and all(t.is_alive() for t in threads):
        threading.Event().wait(0.01)
    vault.kill9()
    stop.set()
    for thread in threads:
        thread.join(15)
    assert len(acked) >= 60
    vault.start()
    client.sys.submit_unseal_keys(keys[:2])
    for path, value in dict(acked).items():
        assert client.secrets.kv.v2.read_secret_version(path, raise_on_deleted_version=True)["data"]["data"] == {
            "v": value}
    vault.stop()
    blob = b"".join(p.read_bytes() for p in Path(vault.data_dir).rglob("*") if p.is_file())
    root_key = shamir.combine([bytes.fromhex(k) for k in keys[:2]])
    secrets_in_clear = [value.encode() for value in acked.values()] + [b"acknowledged-value", root.encode(),
                                                                     root_key, root_key.hex().encode()]
    secrets_in_clear += [bytes.fromhex(k) for k in keys] + [k.encode() for k in keys]
    assert [s[:24] for s in secrets_in_clear if s in blob] == []


def test_sealed_server_refuses_with_vaults_body_and_unknown_paths(vault: VaultServer) -> None:
    response = vault.raw("POST", "auth/token/create", token="whatever", json={})
    assert (response.status_code, response.json()) == (503, {"errors": ["Vault is sealed"]})
    root, _ = init_and_unseal(vault)
    missing = vault.raw("GET", "nosuchmount/x", token=root)
    assert missing.status_code == 404 and "no handler for route" in missing.json()["errors"][0]
    assert vault.raw("GET", "secret/x", token="not-a-token").json() == {"errors": ["permission denied"]}
    assert vault.raw("GET", "secret/x").status_code == 403
    # hvac's own view of it
    with pytest.raises(hvac_errors.Forbidden):
        hvac.Client(url=vault.vault_url, token="nope").secrets.kv.v2.read_secret_version(
            "x", raise_on_deleted_version=True)


def test_shipyard_up_runs_the_engine_in_dev_mode_and_says_so(tmp_path: Path) -> None:
    import subprocess
    import sys

    project = tmp_path / "proj"
    project.mkdir()
    (project / "shipyard.yaml").write_text(
        "services:\n  sleeper:\n    cmd: python -c 'import time; time.sleep(600)'\n    instances: 1\n")
    http_port, vault_port = free_port(), free_port()
    shipyard = [sys.executable, "-m", "shipyard.cli.main"]
    done = subprocess.run([*shipyard, "up", "--http-port", str(http_port), "--gateway-port", "0", "--dns-port", "0",
                           "--vault-port", str(vault_port)], cwd=project, capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        line = next(line for line in done.stdout.splitlines() if "secrets engine" in line)
        assert "DEV MODE" in line and f"VAULT_ADDR=http://127.0.0.1:{vault_port}" in line
        token = line.rsplit("VAULT_TOKEN=", 1)[1].strip()
        client = hvac.Client(url=f"http://127.0.0.1:{vault_port}", token=token)
        client.secrets.kv.v2.create_or_update_secret("from-up", secret={"a": "b"})
    finally:
        subprocess.run([*shipyard, "down", "--http-addr", f"127.0.0.1:{http_port}"], cwd=project,
                       capture_output=True, timeout=60)


def test_engine_speaks_https_when_tls_is_configured(tmp_path: Path) -> None:
    from tls_support import make_pki

    pki = make_pki(tmp_path / "pki")
    server = VaultServer(tmp_path / "data", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                         "--https-port", str(free_port()), "--vault-dev", "--vault-dev-root-token-id", "tls-root")
    server.start()
    try:
        client = hvac.Client(url=f"https://127.0.0.1:{server.vault_port}", token="tls-root", verify=str(pki.ca))
        client.secrets.kv.v2.create_or_update_secret("over-tls", secret={"a": "b"})
        assert client.secrets.kv.v2.read_secret_version("over-tls", raise_on_deleted_version=True)["data"]["data"] == {
            "a": "b"}
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on the engine's port
            requests.get(f"http://127.0.0.1:{server.vault_port}/v1/sys/health", timeout=5)
    finally:
        server.stop()


def test_rekey_gives_new_shares_and_the_old_ones_stop_working(vault: VaultServer) -> None:
    root, old_keys = init_and_unseal(vault, shares=3, threshold=2)
    client = vault.client(root)
    client.sys.enable_secrets_engine("kv", path="kv", options={"version": "1"})
    client.secrets.kv.v1.create_or_update_secret("kept", secret={"v": "across rekey"}, mount_point="kv")
    started = client.sys.start_rekey(secret_shares=5, secret_threshold=3)
    assert started["started"] is True and started["n"] == 5 and started["t"] == 3 and started["required"] == 2
    with pytest.raises(hvac_errors.InvalidRequest, match="nonce"):
        client.sys.rekey(old_keys[0], nonce="wrong")
    with pytest.raises(hvac_errors.InvalidRequest, match="do not rebuild"):
        client.sys.rekey_multi([shamir.split(os.urandom(32), 3, 2)[0].hex(), old_keys[0]], nonce=started["nonce"])
    done = client.sys.rekey_multi(old_keys[:2], nonce=started["nonce"])
    assert done["complete"] is True and len(done["keys"]) == 5
    client.sys.seal()
    with pytest.raises(hvac_errors.InvalidRequest):
        client.sys.submit_unseal_keys(old_keys)  # the old shares no longer unseal (t is 3 now: all three old ones)
    client.sys.submit_unseal_key(reset=True)
    client.sys.submit_unseal_keys(done["keys"][2:5])
    assert not client.sys.is_sealed()
    assert client.secrets.kv.v1.read_secret("kept", mount_point="kv")["data"] == {"v": "across rekey"}
    assert client.sys.read_seal_status()["t"] == 3


def test_generate_root_from_the_shares_with_a_one_time_pad(vault: VaultServer) -> None:
    import base64

    root, keys = init_and_unseal(vault, shares=3, threshold=2)
    vault.client(root).auth.token.revoke_self()  # every root token gone
    client = vault.client()
    started = client.sys.start_root_token_generation()
    otp, nonce = started["otp"], started["nonce"]
    assert started["started"] is True and started["required"] == 2 and len(otp) == 28
    assert client.sys.generate_root(keys[0], nonce)["progress"] == 1
    done = client.sys.generate_root(keys[2], nonce)
    assert done["complete"] is True
    encoded = done["encoded_token"]
    token = bytes(a ^ b for a, b in zip(base64.b64decode(encoded + "=" * (-len(encoded) % 4)), otp.encode(),
                                        strict=True)).decode()
    assert token.startswith("hvs.") and token.encode() not in encoded.encode()
    assert vault.client(token).auth.token.lookup_self()["data"]["policies"] == ["root"]
    started = client.sys.start_root_token_generation()
    client.sys.generate_root(shamir.split(os.urandom(32), 3, 2)[0].hex(), started["nonce"])
    with pytest.raises(hvac_errors.InvalidRequest, match="do not rebuild"):
        client.sys.generate_root(keys[1], started["nonce"])
