"""KV v1/v2, transit, mounts, audit and bad input of the secrets engine, with hvac against a real server."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests
from hvac import exceptions as hvac_errors

from vault_support import VaultServer, init_and_unseal


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultServer, hvac.Client]]:
    server = VaultServer(tmp_path_factory.mktemp("vault-engines") / "data").start()
    root, _ = init_and_unseal(server)
    admin = server.client(root)
    admin.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    admin.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    admin.sys.enable_secrets_engine("transit")
    yield server, admin
    server.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_mounts_enable_tune_list_disable(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    admin.sys.enable_secrets_engine("kv-v2", path="team/kv", description="team secrets")
    mounts = admin.sys.list_mounted_secrets_engines()["data"]
    assert mounts["team/kv/"]["type"] == "kv" and mounts["team/kv/"]["options"] == {"version": "2"}
    assert mounts["secret/"]["options"] == {"version": "2"} and mounts["kv1/"]["options"] == {"version": "1"}
    admin.sys.tune_mount_configuration("team/kv", default_lease_ttl="1h", max_lease_ttl="2h")
    tuned = admin.sys.read_mount_configuration("team/kv")["data"]
    assert (tuned["default_lease_ttl"], tuned["max_lease_ttl"]) == (3600, 7200)
    admin.secrets.kv.v2.create_or_update_secret("x", secret={"a": "1"}, mount_point="team/kv")
    with pytest.raises(hvac_errors.InvalidRequest, match="already in use"):
        admin.sys.enable_secrets_engine("kv", path="team/kv/nested")
    with pytest.raises(hvac_errors.InvalidRequest, match="plugin not found"):
        admin.sys.enable_secrets_engine("pki", path="pki")
    admin.sys.disable_secrets_engine("team/kv")
    assert "team/kv/" not in admin.sys.list_mounted_secrets_engines()["data"]
    with pytest.raises(hvac_errors.InvalidPath):  # the data went with the mount, and the route is gone
        admin.secrets.kv.v2.read_secret_version("x", mount_point="team/kv", raise_on_deleted_version=True)
    admin.sys.enable_secrets_engine("kv-v2", path="team/kv")
    with pytest.raises(hvac_errors.InvalidPath):  # a new mount at the same path starts empty
        admin.secrets.kv.v2.read_secret_version("x", mount_point="team/kv", raise_on_deleted_version=True)


def test_kv_v1(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    kv1 = admin.secrets.kv.v1
    kv1.create_or_update_secret("app/db", secret={"user": "u", "password": "p"}, mount_point="kv1")
    kv1.create_or_update_secret("app/api", secret={"key": "k"}, mount_point="kv1")
    assert kv1.read_secret("app/db", mount_point="kv1")["data"] == {"user": "u", "password": "p"}
    assert kv1.list_secrets("app", mount_point="kv1")["data"]["keys"] == ["api", "db"]
    assert kv1.list_secrets("", mount_point="kv1")["data"]["keys"] == ["app/"]
    kv1.create_or_update_secret("app/db", secret={"password": "p2"}, mount_point="kv1")  # a write replaces
    assert kv1.read_secret("app/db", mount_point="kv1")["data"] == {"password": "p2"}
    kv1.delete_secret("app/db", mount_point="kv1")
    with pytest.raises(hvac_errors.InvalidPath):
        kv1.read_secret("app/db", mount_point="kv1")


def test_kv_v2_versions_cas_delete_undelete_destroy_metadata(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    kv = admin.secrets.kv.v2
    assert kv.create_or_update_secret("svc/db", secret={"pw": "v1"})["data"]["version"] == 1
    assert kv.create_or_update_secret("svc/db", secret={"pw": "v2"}, cas=1)["data"]["version"] == 2
    with pytest.raises(hvac_errors.InvalidRequest, match="check-and-set"):
        kv.create_or_update_secret("svc/db", secret={"pw": "lost"}, cas=1)
    with pytest.raises(hvac_errors.InvalidRequest, match="check-and-set"):
        kv.create_or_update_secret("svc/new", secret={"pw": "x"}, cas=1)  # cas=0 means "only if absent"
    assert kv.create_or_update_secret("svc/new", secret={"pw": "x"}, cas=0)["data"]["version"] == 1
    kv.create_or_update_secret("svc/db", secret={"pw": "v3", "user": "u"})
    assert kv.read_secret_version("svc/db", version=1, raise_on_deleted_version=True)["data"]["data"] == {"pw": "v1"}
    kv.patch("svc/db", secret={"pw": "v4"})
    latest = kv.read_secret_version("svc/db", raise_on_deleted_version=True)["data"]
    assert latest["data"] == {"pw": "v4", "user": "u"} and latest["metadata"]["version"] == 4

    kv.delete_latest_version_of_secret("svc/db")  # soft delete of v4
    with pytest.raises(hvac_errors.InvalidPath):
        kv.read_secret_version("svc/db", raise_on_deleted_version=True)
    deleted = kv.read_secret_version("svc/db", raise_on_deleted_version=False)["data"]
    assert deleted["data"] is None and deleted["metadata"]["deletion_time"] != ""
    kv.undelete_secret_versions("svc/db", versions=[4])
    assert kv.read_secret_version("svc/db", raise_on_deleted_version=True)["data"]["data"]["pw"] == "v4"
    kv.delete_secret_versions("svc/db", versions=[1])
    kv.destroy_secret_versions("svc/db", versions=[2])
    kv.undelete_secret_versions("svc/db", versions=[1, 2])  # a destroyed version stays destroyed
    assert kv.read_secret_version("svc/db", version=1, raise_on_deleted_version=True)["data"]["data"] == {"pw": "v1"}
    with pytest.raises(hvac_errors.InvalidPath):
        kv.read_secret_version("svc/db", version=2, raise_on_deleted_version=True)

    meta = kv.read_secret_metadata("svc/db")["data"]
    assert meta["current_version"] == 4 and meta["oldest_version"] == 1
    assert meta["versions"]["2"]["destroyed"] is True
    kv.update_metadata("svc/db", max_versions=2, custom_metadata={"owner": "media"})
    kv.create_or_update_secret("svc/db", secret={"pw": "v5"})
    meta = kv.read_secret_metadata("svc/db")["data"]
    assert sorted(meta["versions"]) == ["4", "5"] and meta["custom_metadata"] == {"owner": "media"}
    assert kv.list_secrets("svc")["data"]["keys"] == ["db", "new"]
    kv.delete_metadata_and_all_versions("svc/db")
    with pytest.raises(hvac_errors.InvalidPath):
        kv.read_secret_metadata("svc/db")


def test_kv_v2_config_and_delete_version_after(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    admin.sys.enable_secrets_engine("kv-v2", path="cfgkv")
    kv = admin.secrets.kv.v2
    kv.configure(max_versions=3, cas_required=True, mount_point="cfgkv")
    config = kv.read_configuration(mount_point="cfgkv")["data"]
    assert (config["max_versions"], config["cas_required"]) == (3, True)
    with pytest.raises(hvac_errors.InvalidRequest, match="check-and-set parameter required"):
        kv.create_or_update_secret("a", secret={"v": "1"}, mount_point="cfgkv")
    for version in range(5):
        kv.create_or_update_secret("a", secret={"v": str(version)}, cas=version, mount_point="cfgkv")
    assert sorted(kv.read_secret_metadata("a", mount_point="cfgkv")["data"]["versions"]) == ["3", "4", "5"]
    # delete_version_after: a version written with it has its deletion time set at creation.
    kv.update_metadata("b", delete_version_after="1h", mount_point="cfgkv")
    kv.create_or_update_secret("b", secret={"v": "x"}, cas=0, mount_point="cfgkv")
    written = kv.read_secret_version("b", mount_point="cfgkv", raise_on_deleted_version=True)["data"]
    assert written["data"] == {"v": "x"} and written["metadata"]["deletion_time"] != ""
    assert kv.read_secret_metadata("b", mount_point="cfgkv")["data"]["delete_version_after"] == "3600s"


def test_transit_round_trip_rotate_rewrap_and_min_decryption(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    transit = admin.secrets.transit
    transit.create_key("orders")
    assert "orders" in transit.list_keys()["data"]["keys"]
    old = transit.encrypt_data("orders", b64(b"card 4111"))["data"]["ciphertext"]
    assert old.startswith("vault:v1:")
    assert base64.b64decode(transit.decrypt_data("orders", old)["data"]["plaintext"]) == b"card 4111"
    transit.rotate_key("orders")
    assert transit.read_key("orders")["data"]["latest_version"] == 2
    new = transit.encrypt_data("orders", b64(b"card 5500"))["data"]["ciphertext"]
    assert new.startswith("vault:v2:")
    rewrapped = transit.rewrap_data("orders", old)["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v2:")
    transit.update_key_configuration("orders", min_decryption_version=2)
    with pytest.raises(hvac_errors.InvalidRequest, match="disallowed"):
        transit.decrypt_data("orders", old)
    assert base64.b64decode(transit.decrypt_data("orders", rewrapped)["data"]["plaintext"]) == b"card 4111"
    with pytest.raises(hvac_errors.InvalidRequest):
        transit.decrypt_data("orders", new[:-6] + "AAAAAA")  # tampered ciphertext fails authentication
    context = b64(b"tenant-1")
    with_context = transit.encrypt_data("orders", b64(b"x"), context=context)["data"]["ciphertext"]
    with pytest.raises(hvac_errors.InvalidRequest):
        transit.decrypt_data("orders", with_context, context=b64(b"tenant-2"))
    with pytest.raises(hvac_errors.InvalidRequest, match="deletion is not allowed"):
        transit.delete_key("orders")
    transit.update_key_configuration("orders", deletion_allowed=True)
    transit.delete_key("orders")
    with pytest.raises(hvac_errors.InvalidPath):
        transit.read_key("orders")


def test_transit_datakey_hmac_sign_verify_random_hash(vault: tuple[VaultServer, hvac.Client]) -> None:
    _, admin = vault
    transit = admin.secrets.transit
    transit.create_key("dk")
    datakey = transit.generate_data_key("dk", key_type="plaintext")["data"]
    assert len(base64.b64decode(datakey["plaintext"])) == 32
    unwrapped = transit.decrypt_data("dk", datakey["ciphertext"])["data"]["plaintext"]
    assert unwrapped == datakey["plaintext"]
    assert "plaintext" not in transit.generate_data_key("dk", key_type="wrapped")["data"]
    mac = transit.generate_hmac("dk", b64(b"msg"))["data"]["hmac"]
    assert transit.verify_signed_data("dk", b64(b"msg"), hmac=mac)["data"]["valid"] is True
    assert transit.verify_signed_data("dk", b64(b"other"), hmac=mac)["data"]["valid"] is False
    for key_type in ("ed25519", "ecdsa-p256"):
        transit.create_key(f"sig-{key_type}", key_type=key_type)
        public = transit.read_key(f"sig-{key_type}")["data"]["keys"]["1"]["public_key"]
        assert public
        signature = transit.sign_data(f"sig-{key_type}", b64(b"release 1.2"))["data"]["signature"]
        assert transit.verify_signed_data(f"sig-{key_type}", b64(b"release 1.2"), signature=signature)["data"][
            "valid"] is True
        assert transit.verify_signed_data(f"sig-{key_type}", b64(b"release 1.3"), signature=signature)["data"][
            "valid"] is False
    assert len(base64.b64decode(transit.generate_random_bytes(n_bytes=48)["data"]["random_bytes"])) == 48
    digest = transit.hash_data(b64(b"abc"), algorithm="sha2-256")["data"]["sum"]
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_audit_lines_hmac_every_secret(vault: tuple[VaultServer, hvac.Client], tmp_path: Path) -> None:
    _, admin = vault
    log_path = tmp_path / "audit.log"
    admin.sys.enable_audit_device("file", options={"file_path": str(log_path)})
    assert "file/" in admin.sys.list_enabled_audit_devices()["data"]
    admin.secrets.kv.v2.create_or_update_secret("audited", secret={"password": "clear-text-password-123"})
    read = admin.secrets.kv.v2.read_secret_version("audited", raise_on_deleted_version=True)
    assert read["data"]["data"]["password"] == "clear-text-password-123"
    admin.secrets.transit.encrypt_data("dk", b64(b"transit-plaintext-456"))
    admin.auth.token.lookup_self()  # its answer carries the token itself ("id")
    admin.auth.token.lookup(admin.token)
    with pytest.raises(hvac_errors.Forbidden):
        hvac.Client(url=admin.url, token="denied-token-789").secrets.kv.v2.read_secret_version(
            "audited", raise_on_deleted_version=True)
    wanted = admin.sys.calculate_hash("file", "clear-text-password-123")["data"]["hash"]
    admin.sys.disable_audit_device("file")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) >= 6 and {line["type"] for line in lines} == {"request", "response"}
    text = log_path.read_text()
    assert wanted in text  # sys/audit-hash finds the entries of a known value
    denied = [line for line in lines if line.get("error") == "permission denied"]
    assert denied and denied[0]["request"]["client_token"].startswith("hmac-sha256:")
    for clear in ("clear-text-password-123", b64(b"transit-plaintext-456"), admin.token, "denied-token-789"):
        assert clear not in text
    writes = [line for line in lines if line["request"]["path"] == "secret/data/audited"]
    assert writes[0]["request"]["data"]["data"]["password"].startswith("hmac-sha256:")
    assert writes[0]["auth"]["client_token"].startswith("hmac-sha256:")
    reads = [line for line in writes if line["type"] == "response" and line["request"]["operation"] == "read"]
    assert reads[0]["response"]["data"]["data"]["password"].startswith("hmac-sha256:")


def test_bad_input(vault: tuple[VaultServer, hvac.Client]) -> None:
    server, admin = vault
    token = admin.token
    too_big = server.raw("POST", "secret/data/big", token=token, json={"data": {"v": "x" * (2 << 20)}})
    assert too_big.status_code == 413 and "too large" in too_big.json()["errors"][0]
    for trick in ("secret/data/../../core/keyring", "secret/data/a/./b", "secret//data/a", "secret/data/%00x"):
        response = requests.get(f"{server.vault_url}/v1/{trick}", headers={"X-Vault-Token": token}, timeout=10)
        assert response.status_code in (400, 404), trick
        assert "errors" in response.json()
    assert server.raw("GET", "secret/data/../../core/keyring", token=token).status_code in (400, 404)
    unknown = server.raw("GET", "nomount/thing", token=token)
    assert unknown.status_code == 404 and "no handler for route" in unknown.json()["errors"][0]
    not_json = requests.post(f"{server.vault_url}/v1/secret/data/x", data=b"{nope",
                             headers={"X-Vault-Token": token}, timeout=10)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["errors"][0]
    no_data = server.raw("POST", "secret/data/x", token=token, json={"nodata": 1})
    assert no_data.status_code == 400 and no_data.json() == {"errors": ["no data provided"]}
    assert server.raw("GET", "secret/data/never-written", token=token).json() == {"errors": []}
    admin.secrets.kv.v2.create_or_update_secret("x", secret={"a": "b"})
    for path, method, body in (("secret/data/x?version=abc", "GET", None),
                               ("auth/token/create", "POST", {"ttl": "-5s"}),
                               ("auth/token/create", "POST", {"num_uses": "many"}),
                               ("transit/datakey/plaintext/dk", "POST", {"bits": "lots"}),
                               ("secret/metadata/x", "POST", {"max_versions": -1})):
        answer = server.raw(method, path, token=token, json=body)
        assert answer.status_code == 400 and answer.json()["errors"], (path, answer.text)
    with pytest.raises(hvac_errors.InvalidRequest, match="encryption key not found"):
        admin.secrets.transit.decrypt_data("no-such-key", "vault:v1:AAAA")
    with pytest.raises(hvac_errors.InvalidRequest, match="base64"):
        admin.secrets.transit.encrypt_data("dk", "not base64!")
    cross_site = requests.post(f"{server.vault_url}/v1/sys/seal", headers={"Origin": "http://evil.example",
                                                                        "X-Vault-Token": token}, timeout=10)
    assert cross_site.status_code == 403 and not admin.sys.is_sealed()


def test_sdk_reads_secrets_typed_and_refuses_quietly_wrong_ones(vault: tuple[VaultServer, hvac.Client]) -> None:
    from shipyard.sdk import config
    from shipyard.sdk.secrets import Secrets, SecretsError

    class Db(config.Settings):
        password: str = ""
        pool: int = 5
        tls: bool = False

    server, admin = vault
    admin.secrets.kv.v2.create_or_update_secret("sdk/db", secret={"password": "pw", "pool": "12", "tls": "yes"})
    admin.secrets.kv.v1.create_or_update_secret("sdk/v1", secret={"key": "v1-value"}, mount_point="kv1")
    sdk = Secrets(server.vault_url, admin.token)
    assert sdk.load(Db, "secret/data/sdk/db") == Db(password="pw", pool=12, tls=True)
    assert sdk.get("kv1/sdk/v1#key") == "v1-value"
    with pytest.raises(SecretsError, match="no field"):
        sdk.get("secret/data/sdk/db#nope")
    with pytest.raises(SecretsError, match="404"):
        sdk.get("secret/data/sdk/missing#password")
    with pytest.raises(SecretsError, match="403 permission denied"):
        Secrets(server.vault_url, "not-a-token").get("secret/data/sdk/db#password")
    with pytest.raises(SecretsError, match="no token"):
        Secrets(server.vault_url, "").get("secret/data/sdk/db#password")
    admin.secrets.kv.v2.create_or_update_secret("sdk/bad", secret={"pool": "many"})
    with pytest.raises(SecretsError, match="pool"):
        sdk.load(Db, "secret/data/sdk/bad")


def test_kv_v2_concurrent_writers_each_get_their_own_version_and_cas_lets_one_win(
        vault: tuple[VaultServer, hvac.Client]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, admin = vault

    def write(n: int, cas: int | None = None, path: str = "race/one") -> requests.Response:
        body: dict[str, object] = {"data": {"n": str(n)}}
        if cas is not None:
            body["options"] = {"cas": cas}
        return server.raw("POST", f"secret/data/{path}", token=admin.token, json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(write, range(40)))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    versions = sorted(answer.json()["data"]["version"] for answer in answers)
    assert versions == list(range(1, 41))  # no two writes got the same version
    with ThreadPoolExecutor(8) as pool:
        raced = list(pool.map(lambda n: write(n, cas=0, path="race/create-once"), range(8)))
    assert sorted(answer.status_code for answer in raced) == [200] + [400] * 7


def test_transit_concurrent_rotations_each_add_a_version(vault: tuple[VaultServer, hvac.Client]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, admin = vault
    admin.secrets.transit.create_key("spin")
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: server.raw("POST", "transit/keys/spin/rotate", token=admin.token).status_code,
                              range(12)))
    assert codes == [200] * 12
    key = admin.secrets.transit.read_key("spin")["data"]
    assert key["latest_version"] == 13 and sorted(map(int, key["keys"])) == list(range(1, 14))


def test_kv_v2_concurrent_delete_undelete_destroy_lose_no_change(vault: tuple[VaultServer, hvac.Client]) -> None:
    """Each delete, undelete or destroy of one version is its own hvac call, all at once and racing new writes:
    every one of them shows in the metadata afterwards (they are compare-and-swap, none writes back a stale copy)."""
    from concurrent.futures import ThreadPoolExecutor

    _, admin = vault
    kv = admin.secrets.kv.v2
    kv.create_or_update_secret("race/meta", secret={"n": "0"})
    kv.update_metadata("race/meta", max_versions=50)
    for n in range(1, 30):
        kv.create_or_update_secret("race/meta", secret={"n": str(n)})
    kv.delete_secret_versions("race/meta", versions=list(range(21, 31)))  # to be undeleted, one call each
    calls = ([lambda n=n: kv.delete_secret_versions("race/meta", versions=[n]) for n in range(1, 11)]
             + [lambda n=n: kv.destroy_secret_versions("race/meta", versions=[n]) for n in range(11, 21)]
             + [lambda n=n: kv.undelete_secret_versions("race/meta", versions=[n]) for n in range(21, 31)]
             + [lambda n=n: kv.create_or_update_secret("race/meta", secret={"n": f"new-{n}"}) for n in range(10)])
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda call: call(), calls))
    versions = kv.read_secret_metadata("race/meta")["data"]["versions"]
    assert len(versions) == 40
    assert all(versions[str(n)]["deletion_time"] and not versions[str(n)]["destroyed"] for n in range(1, 11))
    assert all(versions[str(n)]["destroyed"] for n in range(11, 21))
    assert all(not versions[str(n)]["deletion_time"] for n in range(21, 31))
