"""Two servers on one etcd share the secrets engine: each is unsealed on its own (as Vault's nodes are), and what
one changes (mounts, policies, keyring rotation, tokens, secrets) the other sees."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hvac import exceptions as hvac_errors

from support import EtcdProcess, need_binary
from vault_support import VaultServer

NAMESPACE = "vault-test"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[VaultServer, VaultServer]]:
    need_binary("etcd")
    etcd = EtcdProcess(tmp_path / "etcd").start()
    store = f"etcd://127.0.0.1:{etcd.client_port}/{NAMESPACE}"
    servers = [VaultServer(tmp_path / name, "--store", store, "--single-server", "--node", name)
               for name in ("a", "b")]
    try:
        for server in servers:
            server.start()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()
        etcd.stop()


def test_second_server_sees_mounts_policies_rotation_tokens_and_secrets_and_is_a_standby_that_serves(
        pair: tuple[VaultServer, VaultServer]) -> None:
    a, b = pair
    init = a.client().sys.initialize(secret_shares=3, secret_threshold=2)
    assert b.client().sys.is_initialized() and b.client().sys.is_sealed()
    for server in (a, b):
        server.client().sys.submit_unseal_keys(init["keys"][:2])
    root = init["root_token"]
    admin_a, admin_b = a.client(root), b.client(root)
    admin_a.sys.enable_secrets_engine("kv", path="shared", options={"version": "2"})
    admin_a.secrets.kv.v2.create_or_update_secret("x", secret={"v": "1"}, mount_point="shared")
    assert admin_b.secrets.kv.v2.read_secret_version("x", mount_point="shared", raise_on_deleted_version=True)[
        "data"]["data"] == {"v": "1"}
    admin_a.sys.rotate_encryption_key()
    admin_a.secrets.kv.v2.create_or_update_secret("y", secret={"v": "after rotation"}, mount_point="shared")
    assert admin_b.secrets.kv.v2.read_secret_version("y", mount_point="shared", raise_on_deleted_version=True)[
        "data"]["data"] == {"v": "after rotation"}
    admin_a.sys.create_or_update_policy("reader", 'path "shared/data/*" { capabilities = ["read"] }')
    token = admin_a.auth.token.create(policies=["reader"])["auth"]["client_token"]
    assert b.client(token).secrets.kv.v2.read_secret_version("x", mount_point="shared",
                                                             raise_on_deleted_version=True)["data"]["data"]["v"] == "1"
    admin_a.sys.create_or_update_policy("reader", 'path "other/*" { capabilities = ["read"] }')
    deadline_reads = 0
    while deadline_reads < 100:  # the policy change reaches b through its watch on the store
        try:
            b.client(token).secrets.kv.v2.read_secret_version("x", mount_point="shared", raise_on_deleted_version=True)
        except hvac_errors.Forbidden:
            break
        deadline_reads += 1
    assert deadline_reads < 100
    a.client(root).sys.seal()  # sealing is per server
    assert not b.client().sys.is_sealed()
    a.client().sys.submit_unseal_keys(init["keys"][:2])

    # The leading server is the active node, the other a standby: 429 on sys/health as Vault's, 200 with
    # ?standbyok (what a load balancer spreading over all servers asks), and it still serves reads and writes.
    active, standby = wait_for_active_and_standby(a, b)
    assert standby.raw("GET", "sys/health").json()["standby"] is True
    assert standby.raw("GET", "sys/health", params={"standbyok": "true"}).status_code == 200
    assert standby.raw("GET", "sys/health", params={"standbycode": "200"}).status_code == 200
    assert standby.raw("GET", "sys/health", params={"perfstandbyok": "true"}).status_code == 429
    assert standby.raw("HEAD", "sys/health").status_code == 429
    leader = standby.client().sys.read_leader_status()
    assert leader["ha_enabled"] is True and leader["is_self"] is False
    assert active.client().sys.read_leader_status()["is_self"] is True
    standby.client(root).secrets.kv.v2.create_or_update_secret("z", secret={"v": "via standby"}, mount_point="shared")
    assert active.client(root).secrets.kv.v2.read_secret_version("z", mount_point="shared",
                                                                 raise_on_deleted_version=True)["data"]["data"] == {
        "v": "via standby"}
    active.stop()  # the standby takes over once the leader's lease is gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and standby.raw("GET", "sys/health").status_code != 200:
        time.sleep(0.2)
    assert standby.raw("GET", "sys/health").json()["standby"] is False
    assert standby.client().sys.read_leader_status()["is_self"] is True


def wait_for_active_and_standby(a: VaultServer, b: VaultServer) -> tuple[VaultServer, VaultServer]:
    """(active, standby) once one of the two leads and the other knows it is a standby."""
    deadline = time.monotonic() + 30
    codes: list[int] = []
    while time.monotonic() < deadline:
        codes = [a.raw("GET", "sys/health").status_code, b.raw("GET", "sys/health").status_code]
        if sorted(codes) == [200, 429]:
            return (a, b) if codes[0] == 200 else (b, a)
        time.sleep(0.2)
    raise AssertionError(f"no active and standby pair within 30 s: sys/health codes {codes}")
