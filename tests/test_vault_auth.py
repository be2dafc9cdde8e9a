"""Tokens, policies and AppRole of the secrets engine, with hvac against a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests
from hvac import exceptions as hvac_errors

from vault_support import VaultServer, init_and_unseal

APP_POLICY = '''
path "secret/data/app/*" {
  capabilities = ["read"]
}
'''


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultServer, str]]:
    server = VaultServer(tmp_path_factory.mktemp("vault-auth") / "data").start()
    root, _ = init_and_unseal(server)
    admin = server.client(root)
    admin.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    admin.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "app-pw"})
    admin.secrets.kv.v2.create_or_update_secret("other/db", secret={"password": "other-pw"})
    admin.sys.create_or_update_policy("app-read", APP_POLICY)
    yield server, root
    server.stop()


def test_policy_read_on_app_reads_there_and_is_denied_elsewhere_and_on_write(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    token = server.client(root).auth.token.create(policies=["app-read"])["auth"]["client_token"]
    app = server.client(token)
    read = app.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"password": "app-pw"}
    with pytest.raises(hvac_errors.Forbidden):
        app.secrets.kv.v2.read_secret_version("other/db", raise_on_deleted_version=True)
    with pytest.raises(hvac_errors.Forbidden):
        app.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "x"})
    with pytest.raises(hvac_errors.Forbidden):
        app.secrets.kv.v2.create_or_update_secret("app/new", secret={"password": "x"})
    with pytest.raises(hvac_errors.Forbidden):
        app.sys.create_or_update_policy("evil", 'path "*" { capabilities = ["sudo", "read"] }')
    denied = server.raw("GET", "secret/data/other/db", token=token)
    assert (denied.status_code, denied.json()) == (403, {"errors": ["permission denied"]})
    caps = app.sys.get_capabilities(paths=["secret/data/app/db"], token=None)  # capabilities-self
    assert caps["capabilities"] == ["read"]


def test_policy_crud_root_and_default(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    admin.sys.create_or_update_acl_policy("ops", 'path "kv/*" { capabilities = ["list"] }')
    assert "ops" in admin.sys.list_acl_policies()["data"]["keys"]
    assert "kv/*" in admin.sys.read_acl_policy("ops")["data"]["policy"]
    assert {"root", "default", "app-read"} <= set(admin.sys.list_policies()["data"]["policies"])
    assert "auth/token/lookup-self" in admin.sys.read_policy("default")["data"]["rules"]
    with pytest.raises(hvac_errors.InvalidRequest, match='cannot update "root"'):
        admin.sys.create_or_update_policy("root", 'path "x" { capabilities = ["read"] }')
    with pytest.raises(hvac_errors.InvalidRequest, match='cannot delete "default"'):
        admin.sys.delete_policy("default")
    admin.sys.delete_acl_policy("ops")
    with pytest.raises(hvac_errors.InvalidPath):
        admin.sys.read_acl_policy("ops")


def test_malformed_policy_is_400_with_the_line(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    response = server.raw("PUT", "sys/policies/acl/bad", token=root,
                          json={"policy": 'path "x" {\n  capabilities = ["read"\n}\n'})
    assert response.status_code == 400
    assert "Line 3" in response.json()["errors"][0]
    response = server.raw("PUT", "sys/policy/bad", token=root, json={"policy": 'path "x" { capabilities = ["fly"] }'})
    assert response.status_code == 400 and "fly" in response.json()["errors"][0]


def test_token_lifecycle(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    created = admin.auth.token.create(policies=["app-read"], ttl="1h", explicit_max_ttl="2h",
                                      meta={"team": "media"}, display_name="svc")["auth"]
    token, accessor = created["client_token"], created["accessor"]
    assert created["policies"] == ["app-read", "default"] and 3500 <= created["lease_duration"] <= 3600
    info = admin.auth.token.lookup(token)["data"]
    assert (info["accessor"], info["explicit_max_ttl"], info["meta"], info["display_name"]) == (
        accessor, 7200, {"team": "media"}, "token-svc")
    assert admin.auth.token.lookup_accessor(accessor)["data"]["id"] == ""  # the accessor never reveals the token
    assert accessor in admin.auth.token.list_accessors()["data"]["keys"]
    user = server.client(token)
    assert user.auth.token.lookup_self()["data"]["policies"] == ["app-read", "default"]
    renewed = user.auth.token.renew_self(increment="30m")["auth"]
    assert 1700 <= renewed["lease_duration"] <= 1800
    assert admin.auth.token.renew(token, increment="10h")["auth"]["lease_duration"] <= 7200  # capped by max TTL
    with pytest.raises(hvac_errors.Forbidden):
        user.auth.token.create(policies=["app-read"])  # the default policy does not allow creating tokens
    admin.auth.token.revoke_accessor(accessor)
    with pytest.raises(hvac_errors.Forbidden):
        user.auth.token.lookup_self()


def test_children_are_revoked_with_their_parent_but_orphans_survive(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    admin.sys.create_or_update_policy("minter", 'path "auth/token/create*" { capabilities = ["update"] }\n'
                                               'path "secret/data/app/*" { capabilities = ["read"] }')
    parent = admin.auth.token.create(policies=["minter"])["auth"]["client_token"]
    minter = server.client(parent)
    child = minter.auth.token.create(policies=["minter"])["auth"]["client_token"]
    grandchild = server.client(child).auth.token.create(policies=["default"])["auth"]["client_token"]
    orphan = minter.auth.token.create_orphan(policies=["default"])["auth"]["client_token"]
    with pytest.raises(hvac_errors.InvalidRequest, match="subset"):
        minter.auth.token.create(policies=["app-read", "root"])
    minter.auth.token.revoke_self()
    for gone in (parent, child, grandchild):
        with pytest.raises(hvac_errors.Forbidden):
            server.client(gone).auth.token.lookup_self()
    assert server.client(orphan).auth.token.lookup_self()["data"]["orphan"] is True


def test_num_uses_period_and_ttl_expiry(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    limited = admin.auth.token.create(policies=["app-read"], num_uses=2)["auth"]["client_token"]
    client = server.client(limited)
    client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    with pytest.raises(hvac_errors.Forbidden):
        client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    periodic = admin.auth.token.create(policies=["default"], period="10m")["auth"]
    assert periodic["lease_duration"] == 600
    assert server.client(periodic["client_token"]).auth.token.renew_self(increment="5h")["auth"][
        "lease_duration"] == 600  # a periodic token renews to its period, whatever the increment
    # A token whose TTL has passed is gone: a TTL of 1s, then one lookup after the server's clock passed it.
    short = admin.auth.token.create(policies=["default"], ttl="1s")["auth"]["client_token"]
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.raw("GET", "auth/token/lookup-self", token=short).status_code == 403:
            break
        time.sleep(0.2)
    assert server.raw("GET", "auth/token/lookup-self", token=short).status_code == 403
    assert server.client(root).auth.token.lookup_self()["data"]["policies"] == ["root"]


def test_sys_auth_and_approle_login(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    admin.sys.enable_auth_method("approle")
    methods = admin.sys.list_auth_methods()["data"]
    assert methods["approle/"]["type"] == "approle" and methods["token/"]["type"] == "token"
    admin.auth.approle.create_or_update_approle("ci", token_policies=["app-read"], token_ttl="20m",
                                                secret_id_num_uses=1)
    role_id = admin.auth.approle.read_role_id("ci")["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id("ci")["data"]["secret_id"]
    login = hvac.Client(url=server.vault_url).auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]
    assert login["policies"] == ["app-read", "default"] and login["metadata"] == {"role_name": "ci"}
    assert 1100 <= login["lease_duration"] <= 1200
    service = server.client(login["client_token"])
    assert service.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)["data"]["data"][
        "password"] == "app-pw"
    with pytest.raises(hvac_errors.InvalidRequest):  # the secret ID had one use
        hvac.Client(url=server.vault_url).auth.approle.login(role_id=role_id, secret_id=secret_id)
    with pytest.raises(hvac_errors.InvalidRequest):
        hvac.Client(url=server.vault_url).auth.approle.login(role_id=role_id, secret_id="wrong")
    assert "ci" in admin.auth.approle.list_roles()["data"]["keys"]
    admin.sys.disable_auth_method("approle")
    assert "approle/" not in admin.sys.list_auth_methods()["data"]


def test_tokens_are_stored_only_as_hashes(vault: tuple[VaultServer, str], tmp_path: Path) -> None:
    server, root = vault
    token = server.client(root).auth.token.create(policies=["default"])["auth"]["client_token"]
    blob = b"".join(p.read_bytes() for p in Path(server.data_dir).rglob("*") if p.is_file())
    assert token.encode() not in blob and root.encode() not in blob


def test_leases_of_approle_logins_lookup_renew_revoke_prefix(vault: tuple[VaultServer, str]) -> None:
    server, root = vault
    admin = server.client(root)
    admin.sys.enable_auth_method("approle", path="ci-auth")
    admin.auth.approle.create_or_update_approle("deployer", token_policies=["app-read"], token_ttl="10m",
                                                mount_point="ci-auth")
    role_id = admin.auth.approle.read_role_id("deployer", mount_point="ci-auth")["data"]["role_id"]
    logins = []
    for _ in range(2):
        secret_id = admin.auth.approle.generate_secret_id("deployer", mount_point="ci-auth")["data"]["secret_id"]
        logins.append(hvac.Client(url=server.vault_url).auth.approle.login(
            role_id=role_id, secret_id=secret_id, mount_point="ci-auth")["auth"])
    keys = admin.sys.list_leases("auth/ci-auth/login")["data"]["keys"]
    assert sorted(keys) == sorted(login["accessor"] for login in logins)
    lease = f"auth/ci-auth/login/{logins[0]['accessor']}"
    info = admin.sys.read_lease(lease)["data"]
    assert info["id"] == lease and 500 <= info["ttl"] <= 600 and info["renewable"] is True
    assert admin.sys.renew_lease(lease, increment=60)["lease_duration"] <= 60
    with pytest.raises(hvac_errors.InvalidRequest, match="invalid lease"):
        admin.sys.read_lease("auth/ci-auth/login/not-an-accessor")
    other = admin.auth.token.create(policies=["default"])["auth"]["client_token"]
    app = server.client(other)
    with pytest.raises(hvac_errors.Forbidden):  # listing and revoking by prefix need sudo
        app.sys.revoke_prefix("auth/ci-auth/")
    admin.sys.revoke_prefix("auth/ci-auth/")
    for login in logins:
        with pytest.raises(hvac_errors.Forbidden):
            server.client(login["client_token"]).auth.token.lookup_self()
    assert app.auth.token.lookup_self()["data"]["policies"] == ["default"]  # other tokens are untouched


def test_num_uses_holds_under_concurrent_requests(vault: tuple[VaultServer, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, root = vault
    token = server.client(root).auth.token.create(policies=["app-read"], num_uses=3)["auth"]["client_token"]
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: server.raw("GET", "secret/data/app/db", token=token).status_code, range(10)))
    assert sorted(codes) == [200] * 3 + [403] * 7


def test_single_use_secret_id_logs_in_once_under_racing_logins(vault: tuple[VaultServer, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, root = vault
    admin = server.client(root)
    admin.sys.enable_auth_method("approle", path="race-auth")
    admin.auth.approle.create_or_update_approle("once", token_policies=["default"], secret_id_num_uses=1,
                                                mount_point="race-auth")
    role_id = admin.auth.approle.read_role_id("once", mount_point="race-auth")["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id("once", mount_point="race-auth")["data"]["secret_id"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: server.raw("POST", "auth/race-auth/login",
                                                   json={"role_id": role_id, "secret_id": secret_id}).status_code,
                              range(8)))
    assert sorted(codes) == [200] + [400] * 7



def test_response_wrapping_single_use_lookup_rewrap_and_concurrent_unwraps(vault: tuple[VaultServer, str]) -> None:
    """X-Vault-Wrap-TTL on a KV read and on token create, sys/wrapping/wrap, lookup, rewrap, unwrap with the
    wrapping token or in the body; a wrapping token opens nothing else, and of concurrent unwraps one wins."""
    from concurrent.futures import ThreadPoolExecutor

    server, root = vault
    admin = server.client(root)
    wrapped = admin.read("secret/data/app/db", wrap_ttl="90s")
    info = wrapped["wrap_info"]
    assert wrapped["data"] is None and info["ttl"] == 90 and info["creation_path"] == "secret/data/app/db"
    holder = server.client(info["token"])
    with pytest.raises(hvac_errors.Forbidden):  # the wrapping token reads nothing itself
        holder.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    looked = server.raw("POST", "sys/wrapping/lookup", json={"token": info["token"]}).json()["data"]
    assert looked["creation_path"] == "secret/data/app/db" and looked["creation_ttl"] == 90
    rewrapped = admin.write_data("sys/wrapping/rewrap", data={"token": info["token"]})["wrap_info"]
    assert rewrapped["token"] != info["token"] and rewrapped["ttl"] == 90
    with pytest.raises(hvac_errors.InvalidRequest, match="wrapping token is not valid"):
        admin.sys.unwrap(info["token"])  # the old one went with the rewrap
    assert server.client(rewrapped["token"]).sys.unwrap()["data"]["data"] == {"password": "app-pw"}
    with pytest.raises((hvac_errors.InvalidRequest, hvac_errors.Forbidden)):
        server.client(rewrapped["token"]).sys.unwrap()  # single use

    created = admin.auth.token.create(policies=["app-read"], wrap_ttl="60s")["wrap_info"]
    assert created["wrapped_accessor"]
    token = admin.sys.unwrap(created["token"])["auth"]["client_token"]  # the wrapping token in the body
    assert server.client(token).lookup_token()["data"]["accessor"] == created["wrapped_accessor"]
    data = admin.sys.wrap(payload={"api_key": "k-123"}, ttl="30s")["wrap_info"]
    assert data["creation_path"] == "sys/wrapping/wrap"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: server.raw("POST", "sys/wrapping/unwrap", token=data["token"]), range(6)))
    won = [a for a in answers if a.status_code == 200]
    assert len(won) == 1 and won[0].json()["data"] == {"api_key": "k-123"}
    assert server.raw("POST", "sys/wrapping/wrap", token=root, json={"a": "b"}).status_code == 400  # no TTL
    short = admin.sys.wrap(payload={"gone": "soon"}, ttl="1s")["wrap_info"]["token"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and server.raw("POST", "sys/wrapping/lookup", json={"token": short}).ok:
        time.sleep(0.2)
    expired = server.raw("POST", "sys/wrapping/unwrap", token=root, json={"token": short})
    assert expired.status_code == 400 and expired.json()["errors"] == ["wrapping token is not valid or does not exist"]
    bad_ttl = requests.get(f"{server.vault_url}/v1/secret/data/app/db", timeout=10,
                           headers={"X-Vault-Token": root, "X-Vault-Wrap-TTL": "soon"})
    assert bad_ttl.status_code == 400 and "X-Vault-Wrap-TTL" in bad_ttl.json()["errors"][0]
