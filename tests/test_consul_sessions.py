"""Consul sessions over the real server: create/info/list/node/renew/destroy, invalidation and held locks."""

from __future__ import annotations

import threading
import time
import uuid

import consul
import pytest
import requests

from support import ServerProcess


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def eventually(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Polls until predicate() is truthy; the bound is generous, it is not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_create_with_defaults_and_info_list_node(client: consul.Consul, server: ServerProcess) -> None:
    sid = client.session.create(name="defaults")
    _, info = client.session.info(sid)
    me = info["Node"]
    assert info["ID"] == sid and info["Name"] == "defaults"
    assert info["Behavior"] == "release"
    assert info["LockDelay"] == 15_000_000_000
    assert info["NodeChecks"] == ["serfHealth"]
    assert info["TTL"] == ""
    assert info["CreateIndex"] == info["ModifyIndex"] > 0

    _, listed = client.session.list()
    assert sid in [s["ID"] for s in listed]
    _, on_node = client.session.node(me)
    assert sid in [s["ID"] for s in on_node]
    _, elsewhere = client.session.node("no-such-node")
    assert elsewhere == []
    assert client.session.info(str(uuid.uuid4()))[1] is None

    assert client.session.destroy(sid) is True
    assert client.session.info(sid)[1] is None
    # destroying what is gone is fine, as in Consul
    assert client.session.destroy(sid) is True


def test_create_options_are_kept(client: consul.Consul) -> None:
    sid = client.session.create(name="opts", behavior="delete", ttl=30, lock_delay=5, checks=[])
    _, info = client.session.info(sid)
    assert info["Behavior"] == "delete"
    assert info["TTL"] == "30s"
    assert info["LockDelay"] == 5_000_000_000
    assert info["NodeChecks"] is None and info["Checks"] == []
    client.session.destroy(sid)


def test_renew(client: consul.Consul) -> None:
    sid = client.session.create(ttl=10)
    renewed = client.session.renew(sid)
    assert renewed["ID"] == sid and renewed["TTL"] == "10s"
    with pytest.raises(consul.NotFound):
        client.session.renew(str(uuid.uuid4()))
    client.session.destroy(sid)


def test_renew_unknown_is_404_with_consul_text(server: ServerProcess) -> None:
    missing = str(uuid.uuid4())
    r = requests.put(f"{server.url}/v1/session/renew/{missing}")
    assert r.status_code == 404
    assert r.text == f"Session id '{missing}' not found"


def test_destroy_releases_held_keys_keeping_lock_index(client: consul.Consul) -> None:
    key = unique("held")
    sid = client.session.create(behavior="release", lock_delay=0)
    assert client.kv.put(key, "mine", acquire=sid) is True
    assert client.kv.put(f"{key}/2", "mine too", acquire=sid) is True
    client.session.destroy(sid)
    for k in (key, f"{key}/2"):
        _, item = client.kv.get(k)
        assert item is not None, "release keeps the key"
        assert "Session" not in item
        assert item["LockIndex"] == 1


def test_destroy_with_behavior_delete_removes_held_keys(client: consul.Consul) -> None:
    key = unique("ephemeral")
    sid = client.session.create(behavior="delete", lock_delay=0)
    assert client.kv.put(key, "x", acquire=sid) is True
    client.kv.put(f"{key}-bystander", "stays")
    client.session.destroy(sid)
    assert client.kv.get(key)[1] is None
    assert client.kv.get(f"{key}-bystander")[1] is not None


def test_ttl_expiry_with_behavior_delete_removes_keys(client: consul.Consul) -> None:
    key = unique("ttl")
    sid = client.session.create(behavior="delete", ttl=10, lock_delay=30)
    assert client.kv.put(key, "alive", acquire=sid) is True
    assert client.kv.get(key)[1]["Session"] == sid
    # never renewed: Consul invalidates after the TTL (it may take up to twice as long)
    assert eventually(lambda: client.session.info(sid)[1] is None, timeout=40)
    assert eventually(lambda: client.kv.get(key)[1] is None, timeout=10)
    # the expired holder's lock delay keeps others from taking the key straight away
    other = client.session.create(lock_delay=0)
    assert client.kv.put(key, "next", acquire=other) is False
    client.session.destroy(other)


def test_renewed_session_outlives_its_ttl(client: consul.Consul) -> None:
    key = unique("kept")
    sid = client.session.create(ttl=10, lock_delay=0)
    assert client.kv.put(key, "alive", acquire=sid) is True
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        client.session.renew(sid)
        time.sleep(2)
    assert client.session.info(sid)[1] is not None
    assert client.kv.get(key)[1]["Session"] == sid
    client.session.destroy(sid)


def test_check_going_critical_invalidates_session(client: consul.Consul) -> None:
    check_id = unique("ttlcheck")
    try:
        registered = client.agent.check.register(check_id, check=consul.Check.ttl("60s"), check_id=check_id)
    except consul.ConsulException as exc:  # the agent endpoints belong to another part
        pytest.fail(f"could not register a TTL check through the agent API: {exc}")
    assert registered
    client.agent.check.ttl_pass(check_id)
    key = unique("guarded")
    sid = client.session.create(checks=["serfHealth", check_id], lock_delay=0)
    assert client.kv.put(key, "x", acquire=sid) is True
    client.agent.check.ttl_fail(check_id)
    assert eventually(lambda: client.session.info(sid)[1] is None)
    assert eventually(lambda: "Session" not in client.kv.get(key)[1])
    # a critical check refuses new sessions, with Consul's 500 text
    with pytest.raises(consul.ConsulException, match=f"Check '{check_id}' is in critical state"):
        client.session.create(checks=[check_id])
    client.agent.check.deregister(check_id)


def test_session_list_blocking_wakes_on_create(client: consul.Consul) -> None:
    index, _ = client.session.list()
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", client.session.list(index=index, wait="30s")))
    t.start()
    sid = client.session.create()
    t.join(timeout=20)
    assert not t.is_alive()
    new_index, sessions = out["r"]  # type: ignore[misc]
    assert int(new_index) > int(index)
    assert sid in [s["ID"] for s in sessions]
    client.session.destroy(sid)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "Request decode failed"),
        (b"[1, 2]", 400, "Request decode failed"),
        (b'{"TTL": "10x"}', 400, "Session TTL '10x' invalid"),
        (b'{"TTL": "5s"}', 400, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"),
        (b'{"TTL": "86401s"}', 400, "Invalid Session TTL"),
        (b'{"TTL": 10}', 400, "Request decode failed"),
        (b'{"Name": 5}', 400, "Request decode failed"),
        (b'{"Behavior": "explode"}', 400, "Invalid Behavior setting 'explode'"),
        (b'{"LockDelay": "soon"}', 400, "Request decode failed"),
        (b'{"Checks": "serfHealth"}', 400, "Request decode failed"),
        (b'{"Checks": ["no-such-check"]}', 500, "Missing check 'no-such-check' registration"),
        (b'{"Node": "no-such-node"}', 500, "Missing node registration"),
    ],
)
def test_bad_create_requests(server: ServerProcess, body: bytes, status: int, needle: str) -> None:
    before = requests.get(f"{server.url}/v1/session/list").json()
    r = requests.put(f"{server.url}/v1/session/create", data=body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert requests.get(f"{server.url}/v1/session/list").json() == before


def test_missing_ids_are_400(server: ServerProcess) -> None:
    for method, path, text in [
        ("PUT", "destroy/", "Missing session"),
        ("PUT", "renew/", "Missing session"),
        ("GET", "info/", "Missing session"),
        ("GET", "node/", "Missing node name"),
    ]:
        r = requests.request(method, f"{server.url}/v1/session/{path}")
        assert r.status_code == 400 and r.text == text


def test_sessions_and_locks_survive_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = ServerProcess(tmp_path / "data").start()
    try:
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        sid = c.session.create(name="durable")
        assert c.kv.put("svc/leader", "me", acquire=sid)
        proc.restart()
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        assert c.session.info(sid)[1]["Name"] == "durable"
        assert c.kv.get("svc/leader")[1]["Session"] == sid
        c.session.destroy(sid)
        assert "Session" not in c.kv.get("svc/leader")[1]
    finally:
        proc.stop()


def test_node_deregistration_invalidates_its_sessions(client: consul.Consul) -> None:
    node = unique("node")
    assert client.catalog.register(node, "127.0.0.2")
    sid = client.session.create(node=node, checks=[], lock_delay=0)
    key = unique("on-node")
    assert client.kv.put(key, "x", acquire=sid) is True
    _, on_node = client.session.node(node)
    assert [s["ID"] for s in on_node] == [sid]
    assert client.catalog.deregister(node)
    assert eventually(lambda: client.session.info(sid)[1] is None)
    assert eventually(lambda: "Session" not in client.kv.get(key)[1])
