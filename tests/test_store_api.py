"""The store over HTTP (/api/v1/store) through RemoteStore, against a real server process."""

from __future__ import annotations

import asyncio

import pytest
import requests

from shipyard.store import Compacted, Compare, Delete, EventType, Get, LeaseNotFound, Put
from shipyard.store.remote import RemoteStore
from support import ServerProcess


@pytest.fixture
async def remote(server: ServerProcess):
    store = RemoteStore(server.url)
    yield store
    await store.close()


async def test_put_get_range_delete(remote: RemoteStore) -> None:
    rev1 = await remote.put("t/a", b"\x00\x01binary")
    rev2 = await remote.put("t/b", b"")
    assert rev2 > rev1
    kv = await remote.get("t/a")
    assert kv is not None and kv.value == b"\x00\x01binary" and kv.version == 1
    result = await remote.range("t/", prefix=True)
    assert [k.key for k in result.kvs] == ["t/a", "t/b"]
    assert result.index == rev2
    deleted, rev3 = await remote.delete("t/", prefix=True)
    assert deleted == 2 and rev3 > rev2
    assert (await remote.range("t/", prefix=True)).index == rev3  # tombstones count


async def test_txn_compare_and_swap(remote: RemoteStore) -> None:
    await remote.put("cas/x", b"1")
    ok = await remote.txn([Compare("cas/x", "value", "=", b"1")], [Put("cas/x", b"2"), Get("cas/x")], [])
    assert ok.succeeded and ok.responses[1][0].value == b"2"
    lost = await remote.txn([Compare("cas/x", "value", "=", b"1")], [Put("cas/x", b"3")], [Delete("cas/x")])
    assert not lost.succeeded
    assert await remote.get("cas/x") is None


async def test_watch_stream_replays_and_follows(remote: RemoteStore) -> None:
    start = await remote.put("w/one", b"1")
    watcher = await remote.watch("w/", prefix=True, from_revision=start).start()
    await remote.put("w/two", b"2")
    await remote.delete("w/one")
    seen = []
    async def collect() -> None:
        async for batch in watcher:
            seen.extend(batch)
            if len(seen) == 3:
                return
    await asyncio.wait_for(collect(), 10)
    watcher.cancel()
    assert [(e.type, e.kv.key) for e in seen] == [
        (EventType.PUT, "w/one"), (EventType.PUT, "w/two"), (EventType.DELETE, "w/one")
    ]


async def test_watch_from_compacted_revision_is_an_error(remote: RemoteStore, server: ServerProcess) -> None:
    first = await remote.put("c/k", b"1")
    last = await remote.put("c/k", b"2")
    r = requests.post(server.url + "/api/v1/store/compact", json={"revision": last})
    assert r.status_code == 200 and r.json()["compact_revision"] == last
    with pytest.raises(Compacted):
        await remote.watch("c/k", from_revision=first).start()
    r = requests.post(server.url + "/api/v1/store/compact", json={"revision": "x"})
    assert r.status_code == 400
    r = requests.get(server.url + "/api/v1/store/watch/w/", params={"from_revision": "-1"})
    assert r.status_code == 400


async def test_leases_expire_keys(remote: RemoteStore) -> None:
    lease = await remote.grant_lease(1)
    await remote.put("lease/k", b"v", lease=lease.id)
    assert await remote.keepalive(lease.id) == 1
    for _ in range(60):
        if await remote.get("lease/k") is None:
            break
        await asyncio.sleep(0.1)
    assert await remote.get("lease/k") is None
    with pytest.raises(LeaseNotFound):
        await remote.keepalive(lease.id)


def test_bad_input_gets_json_errors(server: ServerProcess) -> None:
    base = server.url + "/api/v1/store"
    r = requests.post(base + "/txn", data=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = requests.post(base + "/txn", json={"compare": [{"key": "a", "target": "bogus"}]})
    assert r.status_code == 400 and "target" in r.json()["error"]
    r = requests.post(base + "/txn", json={"success": [{"op": "put", "key": "a", "value": "***"}]})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = requests.put(base + "/kv/big", data=b"x" * (2 << 20))
    assert r.status_code == 413
    r = requests.post(base + "/leases", json={"ttl": "ten"})
    assert r.status_code == 400
    r = requests.put(base + "/leases/12345/keepalive")
    assert r.status_code == 404
    r = requests.put(base + "/kv/x", params={"lease": "999"}, data=b"v")
    assert r.status_code == 404 and "lease" in r.json()["error"]
    assert requests.get(base + "/kv/x").status_code == 200  # still serving
