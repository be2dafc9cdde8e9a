"""Consul /v1/txn over the real server: all-or-nothing KV ops, results, rollback errors and bad bodies."""

from __future__ import annotations

import base64
import uuid

import consul
import pytest
import requests

from support import ServerProcess


def unique(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kv(verb: str, key: str, **fields) -> dict:  # type: ignore[no-untyped-def]
    return {"KV": {"Verb": verb, "Key": key, **fields}}


def put_txn(server: ServerProcess, payload: object) -> requests.Response:
    return requests.put(f"{server.url}/v1/txn", json=payload)


def test_txn_success_returns_results(client: consul.Consul) -> None:
    base = unique()
    result = client.txn.put(
        [
            kv("set", f"{base}/a", Value=b64(b"one"), Flags=3),
            kv("set", f"{base}/b", Value=b64(b"two")),
            kv("get", f"{base}/a"),
            kv("get-tree", f"{base}/"),
            kv("check-not-exists", f"{base}/c"),
        ]
    )
    assert result["Errors"] is None
    results = [r["KV"] for r in result["Results"]]
    # writes report the entry without its value; get returns it
    assert results[0]["Key"] == f"{base}/a" and results[0]["Value"] is None and results[0]["Flags"] == 3
    assert results[2]["Value"] == b64(b"one")
    assert [r["Key"] for r in results[3:]] == [f"{base}/a", f"{base}/b"]
    index = results[0]["ModifyIndex"]
    assert all(r["ModifyIndex"] == index for r in results)  # one txn, one revision
    assert client.kv.get(f"{base}/b")[1]["Value"] == b"two"


def test_txn_rollback_leaves_nothing_and_reports_errors(client: consul.Consul, server: ServerProcess) -> None:
    base = unique()
    client.kv.put(f"{base}/existing", "v")
    _, existing = client.kv.get(f"{base}/existing")
    r = put_txn(
        server,
        [
            kv("set", f"{base}/new", Value=b64(b"should not appear")),
            kv("cas", f"{base}/existing", Value=b64(b"x"), Index=existing["ModifyIndex"] + 99),
            kv("delete", f"{base}/existing"),
            kv("get", f"{base}/missing"),
        ],
    )
    assert r.status_code == 409
    body = r.json()
    assert body["Results"] is None
    assert body["Errors"] == [
        {"OpIndex": 1, "What": f'failed to set key "{base}/existing", index is stale'},
        {"OpIndex": 3, "What": f'key "{base}/missing" doesn\'t exist'},
    ]
    assert client.kv.get(f"{base}/new")[1] is None
    assert client.kv.get(f"{base}/existing")[1]["Value"] == b"v"


def test_txn_cas_delete_tree_and_checks(client: consul.Consul, server: ServerProcess) -> None:
    base = unique()
    for k in ("t/1", "t/2", "keep"):
        client.kv.put(f"{base}/{k}", k)
    _, keep = client.kv.get(f"{base}/keep")
    r = put_txn(
        server,
        [
            kv("check-index", f"{base}/keep", Index=keep["ModifyIndex"]),
            kv("cas", f"{base}/keep", Value=b64(b"updated"), Index=keep["ModifyIndex"]),
            kv("delete-tree", f"{base}/t/"),
            kv("check-not-exists", f"{base}/t/1"),
            kv("cas", f"{base}/created", Value=b64(b"new"), Index=0),
            kv("delete-cas", f"{base}/created", Index=0),
        ],
    )
    # delete-cas with Index 0 on a key created earlier in the same txn is stale: all rolled back
    assert r.status_code == 409
    assert r.json()["Errors"][0]["OpIndex"] == 5
    assert client.kv.get(f"{base}/keep")[1]["Value"] == b"keep"
    assert client.kv.get(f"{base}/t/1")[1] is not None

    r = put_txn(
        server,
        [
            kv("check-index", f"{base}/keep", Index=keep["ModifyIndex"]),
            kv("cas", f"{base}/keep", Value=b64(b"updated"), Index=keep["ModifyIndex"]),
            kv("delete-tree", f"{base}/t/"),
            kv("check-not-exists", f"{base}/t/1"),
        ],
    )
    assert r.status_code == 200, r.text
    assert client.kv.get(f"{base}/keep")[1]["Value"] == b"updated"
    assert client.kv.get(f"{base}/t/", recurse=True)[1] is None


def test_txn_lock_unlock_and_check_session(client: consul.Consul, server: ServerProcess) -> None:
    key = unique("lock")
    sid = client.session.create(lock_delay=0)
    r = put_txn(server, [kv("lock", key, Value=b64(b"held"), Session=sid), kv("check-session", key, Session=sid)])
    assert r.status_code == 200, r.text
    assert r.json()["Results"][0]["KV"]["Session"] == sid
    assert r.json()["Results"][0]["KV"]["LockIndex"] == 1
    other = client.session.create(lock_delay=0)
    r = put_txn(server, [kv("lock", key, Session=other)])
    assert r.status_code == 409
    assert r.json()["Errors"][0]["What"] == f'failed to lock key "{key}", lock is already held'
    r = put_txn(server, [kv("lock", unique(), Session="not-a-session")])
    assert r.status_code == 409
    assert r.json()["Errors"][0]["What"] == 'invalid session "not-a-session"'
    r = put_txn(server, [kv("unlock", key, Session=other)])
    assert r.status_code == 409
    r = put_txn(server, [kv("unlock", key, Session=sid), kv("check-session", key, Session="")])
    assert r.status_code == 200, r.text
    assert "Session" not in client.kv.get(key)[1]
    client.session.destroy(sid)
    client.session.destroy(other)


def test_read_only_txn(client: consul.Consul, server: ServerProcess) -> None:
    key = unique()
    client.kv.put(key, "v")
    r = put_txn(server, [kv("get", key), kv("check-not-exists", f"{key}-nope")])
    assert r.status_code == 200
    assert r.json()["Results"][0]["KV"]["Value"] == b64(b"v")


def test_too_many_operations_is_413(server: ServerProcess) -> None:
    r = put_txn(server, [kv("get", f"k{i}") for i in range(129)])
    assert r.status_code == 413
    assert r.text == "Transaction contains too many operations (129 > 128)"
    ok = put_txn(server, [kv("check-not-exists", unique()) for _ in range(128)])
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{broken", 400, "Failed to parse body"),
        (b"", 400, "Failed to parse body"),
        (b'{"KV": {}}', 400, "Failed to parse body"),
        (b'[{"KV": {"Verb": "set", "Key": "a", "Value": "***"}}]', 400, "failed to decode value"),
        (b'[{"KV": {"Verb": "set", "Key": "a", "Value": 5}}]', 400, "unexpected value type"),
        (b'[{"KV": {"Verb": "set", "Key": "a", "Flags": -1}}]', 400, "Flags"),
        (b'[{"KV": {"Verb": "cas", "Key": "a", "Index": "7"}}]', 400, "Index"),
        (b'[{"KV": {"Verb": 1, "Key": "a"}}]', 400, "Verb"),
        (b'[{"KV": {"Verb": "set", "Key": "a/../b"}}]', 400, '".." path segment'),
        (b'[{"KV": {"Verb": "set", "Key": "a\\u0000b"}}]', 400, "NUL"),
        (b'[{"KV": {"Verb": "set", "Key": ""}}]', 400, "Missing key name"),
        (b'[{"Node": {"Verb": "get"}}]', 400, "only KV operations"),
        (b'["set"]', 400, "Failed to parse body"),
    ],
)
def test_malformed_txn_bodies(server: ServerProcess, body: bytes, status: int, needle: str) -> None:
    r = requests.put(f"{server.url}/v1/txn", data=body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert requests.get(f"{server.url}/v1/status/leader").status_code == 200


def test_unknown_verb_rolls_back(server: ServerProcess, client: consul.Consul) -> None:
    key = unique()
    r = put_txn(server, [kv("set", key, Value=b64(b"v")), kv("explode", key)])
    assert r.status_code == 409
    assert r.json()["Errors"] == [{"OpIndex": 1, "What": 'unknown KV verb "explode"'}]
    assert client.kv.get(key)[1] is None


def test_oversize_txn_value_is_413(server: ServerProcess) -> None:
    r = put_txn(server, [kv("set", "big", Value=b64(b"x" * (300 * 1024)))])
    assert r.status_code == 200
    r = requests.put(f"{server.url}/v1/txn", data=b"[" + b" " * (600 * 1024) + b"]")
    assert r.status_code == 413
    assert "Request body too large" in r.text
