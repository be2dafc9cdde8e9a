"""What only the etcd backend has, against a real etcd: its range_end, namespaces and the follow stream that
remembers deletions. The store contract itself is checked on etcd by tests/test_store.py (every backend)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from shipyard.store import Compacted, Event, EventType
from shipyard.store.etcd import EtcdStore, FollowedWatcher, prefix_range_end
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


async def test_a_watch_without_previous_versions_is_served_by_the_follow_stream(store: EtcdStore) -> None:
    # One etcd watch per server: a prev_kv=False watch (the session manager's on kv/) is fed from it, and sees
    # exactly what an etcd watch of its own sees.
    start = store.revision + 1
    followed = store.watch("kv/", prefix=True, from_revision=start, prev_kv=False)
    own = store.watch("kv/", prefix=True, from_revision=start)
    assert isinstance(followed, FollowedWatcher)
    try:
        await asyncio.gather(*(store.put(f"kv/{i}", b"%d" % i) for i in range(50)),
                             *(store.put(f"other/{i}", b"x") for i in range(20)))
        await store.delete("kv/", prefix=True)
        final = store.revision

        async def changes(watcher: Any) -> list[tuple[int, EventType, str, bytes]]:
            seen: list[tuple[int, EventType, str, bytes]] = []
            while not seen or seen[-1][0] < final:
                batch = await asyncio.wait_for(watcher.__anext__(), 5)
                assert len({event.revision for event in batch}) == 1
                seen += [(event.revision, event.type, event.kv.key, event.kv.value) for event in batch]
            return seen

        expected = await changes(own)
        assert len(expected) == 100  # 50 puts, 50 deletions, nothing from other/
        assert await changes(followed) == expected
    finally:
        followed.cancel()
        own.cancel()
    with pytest.raises(StopAsyncIteration):
        await followed.__anext__()


async def test_a_watch_from_a_revision_the_stream_has_passed_asks_etcd(store: EtcdStore) -> None:
    first = await store.put("old", b"1")
    await store.put("old", b"2")
    await asyncio.wait_for(_followed_up_to(store, store.revision), 5)
    watcher = store.watch("old", from_revision=first, prev_kv=False)
    try:
        assert not isinstance(watcher, FollowedWatcher)
        batch = await asyncio.wait_for(watcher.__anext__(), 5)
        assert [event.kv.value for event in batch] == [b"1"]
    finally:
        watcher.cancel()


async def test_a_gap_in_the_follow_stream_ends_the_watches_it_serves(store: EtcdStore) -> None:
    watcher = store.watch("gap/", prefix=True, from_revision=store.revision + 1, prev_kv=False)
    assert isinstance(watcher, FollowedWatcher)
    await store.put("gap/a", b"1")
    batch = await asyncio.wait_for(watcher.__anext__(), 5)
    assert [event.kv.key for event in batch] == ["gap/a"]
    store._lost_events(store.revision)  # what the stream does when compaction took revisions it had not seen
    with pytest.raises(Compacted):  # follow_prefix then reads everything again
        await asyncio.wait_for(watcher.__anext__(), 5)
    watcher.cancel()


async def _followed_up_to(store: EtcdStore, revision: int) -> None:
    while store._followed < revision:
        await asyncio.sleep(0.01)
