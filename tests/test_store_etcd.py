"""What only the etcd backend has, against a real etcd: its range_end, namespaces and the follow stream that
remembers deletions. The store contract itself is checked on etcd by tests/test_store.py (every backend)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from shipyard.store import Event, EventType
from shipyard.store.etcd import EtcdStore, prefix_range_end
from support import EtcdProcess


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory):
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
async def store(etcd: EtcdProcess, request: pytest.FixtureRequest):
    s = await EtcdStore.open(etcd.url, namespace=f"t-{request.node.name}/")
    yield s
    await s.close()


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"a/") == b"a0"
    assert prefix_range_end(b"a\xff") == b"b"


async def test_namespaces_do_not_see_each_other(etcd: EtcdProcess, tmp_path: Path) -> None:
    a = await EtcdStore.open(etcd.url, namespace="ns-a/")
    b = await EtcdStore.open(etcd.url, namespace="ns-b/")
    try:
        await a.put("k", b"a")
        assert await b.get("k") is None
        assert (await a.get("k")).value == b"a"
    finally:
        await a.close()
        await b.close()


async def test_a_late_put_from_the_follow_stream_does_not_erase_a_newer_tombstone(store: EtcdStore) -> None:
    # The follow stream can lag behind this process's own delete: replaying the older put it then delivers must
    # keep the prefix's index at the deletion, or a blocking query on the prefix would never see it (a flake once).
    # The follower is stopped so that this test, not the scheduling of the stream, decides the order.
    assert store._follower is not None
    store._follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await store._follower
    await store.put("tree/a", b"1")
    await store.put("tree/b", b"2")
    old_b = await store.get("tree/b")
    assert old_b is not None
    _, deleted_at = await store.delete("tree/b")
    store._note_change(Event(EventType.PUT, old_b))
    assert (await store.range("tree/", prefix=True)).index == deleted_at
    await store.put("tree/b", b"3")
    again = await store.get("tree/b")
    assert again is not None
    store._note_change(Event(EventType.PUT, again))  # a newer put does end the tombstone
    assert (await store.range("tree/", prefix=True)).index == again.mod_revision


async def test_a_watch_without_previous_versions_gets_the_changes_alone(store: EtcdStore) -> None:
    # prev_kv=False (the session manager's watch on kv/): etcd neither reads nor sends the version replaced
    await store.put("w", b"1")
    watcher = store.watch("w", from_revision=store.revision + 1, prev_kv=False)
    try:
        await store.put("w", b"2")
        batch = await asyncio.wait_for(watcher.__anext__(), 5)
        assert [(event.kv.value, event.prev_kv) for event in batch] == [(b"2", None)]
    finally:
        watcher.cancel()
