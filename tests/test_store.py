"""The store contract of shipyard.store.base, checked against every backend: the embedded SQLite store, etcd (a
real etcd peer) and the remote store (RemoteStore against a real server's /api/v1/store).

They never look at SQLite rows or etcd keys directly. Each test runs in a fresh keyspace (a new SQLite file, or
its own namespace on the shared etcd / server) and counts revisions from where the store stood when it began.
The SQLite-only sections at the end cover what only the embedded store has: restart, group commit, dev mode,
its failure paths.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import shipyard.store.sqlite as sqlite_module
from shipyard.store import (
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    LeaseNotFound,
    Put,
    SqliteStore,
    Store,
    StoreError,
    WatchOverflow,
)
from shipyard.store.etcd import EtcdStore
from shipyard.store.remote import RemoteStore
from support import EtcdProcess, ServerProcess, need_peer

# Generous upper bound for anything that should happen "soon"; never a performance assertion.
SOON = 10.0
BACKENDS = ("sqlite", "etcd", "remote")
_namespaces = itertools.count()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "state.db"


@pytest.fixture(scope="module")
def etcd_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("store-server") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Any]:
    s: Any
    if request.param == "sqlite":
        s = await SqliteStore.open(db_path)
    elif request.param == "etcd":
        peer: EtcdProcess = request.getfixturevalue("etcd_peer")
        s = await EtcdStore.open(peer.url, namespace=f"test-{next(_namespaces)}/")
    else:
        server: ServerProcess = request.getfixturevalue("store_server")
        s = RemoteStore(server.url, namespace=f"test-{next(_namespaces)}/")
        await s.range("")  # learns where the server's revision stands
    yield s
    await s.close()


@pytest.fixture
async def sqlite(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(db_path)
    yield s
    await s.close()


async def next_batch(watcher) -> list[Event]:  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(watcher.__anext__(), SOON)


async def collect_revisions(watcher, until: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Revisions of every event the watcher yields, until one at revision `until` arrives."""
    seen: list[int] = []
    while not seen or seen[-1] < until:
        batch = await next_batch(watcher)
        assert len({ev.revision for ev in batch}) == 1, "a batch holds the events of exactly one revision"
        seen.extend(ev.revision for ev in batch)
    return seen


async def now(store: Store) -> int:
    """The store's current revision, asked of the store (a remote client's own figure only moves with its calls)."""
    return (await store.range("no/such/key")).revision


def watch_from_next(store: Store, key: str, *, prefix: bool = False) -> Any:
    """A watch from the next revision: nothing written after this call is missed, whatever the backend (a stream
    that opens on first use would miss writes made before it is read, were it asked to start from 'now')."""
    return store.watch(key, prefix=prefix, from_revision=store.revision + 1)


def is_sqlite(store: object) -> bool:
    return isinstance(store, SqliteStore)


# ---- revision / create / mod / version bookkeeping -------------------------------------------------


async def test_a_fresh_keyspace_is_empty(store: Store) -> None:
    assert await store.get("missing") is None
    result = await store.range("", prefix=True)
    assert result.kvs == []
    assert result.revision == store.revision
    assert result.index == 0


async def test_put_bookkeeping(store: Store) -> None:
    base = store.revision
    r1 = await store.put("a", b"1")
    r2 = await store.put("b", b"2")
    r3 = await store.put("a", b"3")
    assert (r1, r2, r3) == (base + 1, base + 2, base + 3)
    assert store.revision == base + 3
    assert await store.get("a") == KeyValue("a", b"3", create_revision=r1, mod_revision=r3, version=2, lease=0)
    assert await store.get("b") == KeyValue("b", b"2", create_revision=r2, mod_revision=r2, version=1, lease=0)


async def test_delete_and_recreate_resets_create_revision_and_version(store: Store) -> None:
    base = store.revision
    await store.put("k", b"v1")
    await store.put("k", b"v2")
    count, rev = await store.delete("k")
    assert (count, rev) == (1, base + 3)
    assert await store.get("k") is None
    r = await store.put("k", b"v3")
    assert r == base + 4
    assert await store.get("k") == KeyValue("k", b"v3", create_revision=r, mod_revision=r, version=1)


async def test_deleting_nothing_leaves_revision_unchanged(store: Store) -> None:
    rev = await store.put("k", b"v")
    assert await store.delete("other") == (0, rev)
    assert await store.delete("nothing/", prefix=True) == (0, rev)
    assert await now(store) == rev


async def test_delete_prefix_takes_one_revision(store: Store) -> None:
    base = store.revision
    for k in ("dir/a", "dir/b", "dir/c/d", "dirx", "other"):
        await store.put(k, b"v")
    count, rev = await store.delete("dir/", prefix=True)
    assert (count, rev) == (3, base + 6)
    assert [kv.key for kv in (await store.range("", prefix=True)).kvs] == ["dirx", "other"]


async def test_non_bytes_value_is_rejected_without_harm(store: Store) -> None:
    base = store.revision
    with pytest.raises(StoreError) as err:
        await store.put("k", "text")  # type: ignore[arg-type]
    assert err.value.status == 400
    with pytest.raises(StoreError):
        await store.txn([], [Put("k", "text")])  # type: ignore[arg-type]
    assert await now(store) == base
    assert await store.put("k", b"ok") == base + 1


# ---- range --------------------------------------------------------------------------------------------


async def test_range_prefix_is_sorted_and_exact(store: Store) -> None:
    for k in ("app/z", "app/a", "ap", "app", "app/m/n", "apq", "app0", "app/\U0010ffffx", "b"):
        await store.put(k, k.encode())
    result = await store.range("app/", prefix=True)
    assert [kv.key for kv in result.kvs] == ["app/a", "app/m/n", "app/z", "app/\U0010ffffx"]
    assert all(kv.value == kv.key.encode() for kv in result.kvs)
    assert result.revision == store.revision
    every = await store.range("", prefix=True)
    assert [kv.key for kv in every.kvs] == sorted(kv.key for kv in every.kvs)
    assert len(every.kvs) == 9
    single = await store.range("app")
    assert [kv.key for kv in single.kvs] == ["app"]


async def test_range_index_is_max_mod_revision(store: Store) -> None:
    r1 = await store.put("p/a", b"1")
    r2 = await store.put("p/b", b"2")
    r3 = await store.put("q", b"3")
    assert (await store.range("p/", prefix=True)).index == r2
    assert (await store.range("p/a")).index == r1
    assert (await store.range("q")).index == r3
    assert (await store.range("p/", prefix=True)).revision == r3


async def test_range_index_counts_tombstones(store: Store) -> None:
    await store.put("p/a", b"1")
    await store.put("p/b", b"2")
    _, deleted = await store.delete("p/a")
    await store.put("other", b"x")
    prefix = await store.range("p/", prefix=True)
    assert [kv.key for kv in prefix.kvs] == ["p/b"]
    assert prefix.index == deleted, "the deletion of p/a must move the prefix index"
    gone = await store.range("p/a")
    assert gone.kvs == []
    assert gone.index == deleted
    assert (await store.range("never")).index == 0
    # Re-creating the key replaces its tombstone with the live entry.
    again = await store.put("p/a", b"again")
    assert (await store.range("p/a")).index == again
    # A prefix with only tombstones still reports the deletion.
    _, emptied_at = await store.delete("p/", prefix=True)
    emptied = await store.range("p/", prefix=True)
    assert emptied.kvs == []
    assert emptied.index == emptied_at


async def test_prefix_index_counts_the_deletion_of_a_key_with_the_highest_character(store: Store) -> None:
    # A scan bounded by prefix + U+10FFFF (etcd.py did this) misses keys that hold that character after it.
    await store.put("t/a", b"1")
    await store.put("t/\U0010ffffz", b"1")
    _, deleted = await store.delete("t/\U0010ffffz")
    await store.put("u", b"later")
    assert (await store.range("t/", prefix=True)).index == deleted


# ---- txn ------------------------------------------------------------------------------------------------


# Revisions in these cases count from the store's revision before _compare_store wrote (0 stays 0: "absent").
COMPARE_CASES = [
    # existing key "k": value b"v2", version 2, create 1, mod 3, lease 0 (see _compare_store)
    ("version", "=", 2, True),
    ("version", "!=", 2, False),
    ("version", "<", 3, True),
    ("version", ">", 2, False),
    ("create", "=", 1, True),
    ("create", ">", 0, True),
    ("create", "<", 1, False),
    ("mod", "=", 3, True),
    ("mod", "!=", 3, False),
    ("mod", ">", 2, True),
    ("mod", "<", 3, False),
    ("value", "=", b"v2", True),
    ("value", "!=", b"v2", False),
    ("value", ">", b"v1", True),
    ("value", "<", b"v1", False),
    ("lease", "=", 0, True),
    ("lease", "!=", 0, False),
    ("lease", ">", 0, False),
]

MISSING_CASES = [
    # a missing key has version/create/mod/lease 0 and value None
    ("version", "=", 0, True),
    ("version", ">", 0, False),
    ("create", "=", 0, True),
    ("create", "<", 1, True),
    ("mod", "=", 0, True),
    ("mod", "!=", 0, False),
    ("lease", "=", 0, True),
    ("value", "=", None, True),
    ("value", "=", b"", False),
    ("value", "!=", b"x", True),
    ("value", ">", b"", False),
    ("value", "<", b"z", False),
]


async def _compare_store(store: Store) -> int:
    base = store.revision
    await store.put("k", b"v1")  # base + 1
    await store.put("other", b"x")  # base + 2
    await store.put("k", b"v2")  # base + 3
    return base


def _relative(target: str, value: object, base: int) -> object:
    return base + value if target in ("create", "mod") and isinstance(value, int) and value else value


@pytest.mark.parametrize(("target", "op", "value", "expected"), COMPARE_CASES)
async def test_txn_compare_existing_key(store: Store, target, op, value, expected) -> None:  # type: ignore[no-untyped-def]
    base = await _compare_store(store)
    value = _relative(target, value, base)
    result = await store.txn([Compare("k", target, op, value)], [Get("k")], [Get("other")])
    assert result.succeeded is expected
    assert result.responses[0][0].key == ("k" if expected else "other")  # type: ignore[index]
    assert result.revision == base + 3


@pytest.mark.parametrize(("target", "op", "value", "expected"), MISSING_CASES)
async def test_txn_compare_missing_key(store: Store, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                       target, op, value, expected) -> None:
    if isinstance(store, EtcdStore) and target == "value" and isinstance(value, bytes) and op == "!=":
        request.applymarker(pytest.mark.xfail(strict=True, reason="etcd fails every value compare on a missing key "
                                              "(it cannot tell an absent value from an empty one)"))
    base = await _compare_store(store)
    value = _relative(target, value, base)
    result = await store.txn([Compare("absent", target, op, value)], [Put("won", b"1")], [Put("lost", b"1")])
    assert result.succeeded is expected
    assert await store.get("won" if expected else "lost") is not None
    assert await store.get("lost" if expected else "won") is None


async def test_txn_compare_lease_of_leased_key(store: Store) -> None:
    lease = await store.grant_lease(60)
    await store.put("k", b"v", lease=lease.id)
    assert (await store.txn([Compare("k", "lease", "=", lease.id)], [])).succeeded
    assert not (await store.txn([Compare("k", "lease", "=", 0)], [])).succeeded
    await store.revoke_lease(lease.id)


async def test_txn_all_compares_must_hold(store: Store) -> None:
    await _compare_store(store)
    both = [Compare("k", "version", "=", 2), Compare("other", "value", "=", b"x")]
    assert (await store.txn(both, [])).succeeded
    one_off = [Compare("k", "version", "=", 2), Compare("other", "value", "=", b"y")]
    assert not (await store.txn(one_off, [])).succeeded
    assert (await store.txn([], [])).succeeded, "no compares means success"


async def test_txn_compare_of_mismatched_types_fails_alone(store: Store) -> None:
    rev = await store.put("k", b"v")
    with pytest.raises(StoreError) as err:
        await store.txn([Compare("k", "value", "<", 5)], [Put("x", b"1")])
    assert err.value.status == 400
    with pytest.raises(StoreError):
        await store.txn([Compare("k", "version", ">", b"1")], [Get("k")])
    assert await store.get("x") is None
    assert await store.put("y", b"1") == rev + 1


async def test_txn_responses(store: Store) -> None:
    base = store.revision
    await store.put("a/1", b"one")  # base + 1
    await store.put("a/2", b"two")  # base + 2
    await store.put("b", b"bee")  # base + 3
    result = await store.txn(
        [],
        [
            Get("a/", prefix=True),
            Put("b", b"bee2"),
            Put("c", b"new"),
            Delete("a/", prefix=True),
            Get("a/", prefix=True),
            Get("c"),
            Delete("nothing"),
        ],
    )
    assert result.succeeded
    assert result.revision == base + 4, "one txn is one revision"
    got, prev_b, prev_c, deleted, got_after, got_c, deleted_none = result.responses
    assert [kv.key for kv in got] == ["a/1", "a/2"]  # type: ignore[attr-defined]
    assert prev_b == KeyValue("b", b"bee", base + 3, base + 3, 1)
    assert prev_c is None
    assert [(kv.key, kv.value) for kv in deleted] == [("a/1", b"one"), ("a/2", b"two")]  # type: ignore[attr-defined]
    assert got_after == []
    assert got_c == [KeyValue("c", b"new", base + 4, base + 4, 1)]
    assert deleted_none == []
    assert await store.get("b") == KeyValue("b", b"bee2", base + 3, base + 4, 2)


async def test_a_put_answers_the_version_it_replaced_also_when_a_compare_pins_it(store: Store) -> None:
    # etcd: a compare naming the version replaced lets the store answer from what it saw, without etcd's prev_kv
    lease = await store.grant_lease(30)
    await store.put("p", b"one", lease=lease.id)
    before = await store.get("p")
    assert before is not None
    pinned = await store.txn([Compare("p", "mod", "=", before.mod_revision)], [Put("p", b"two")])
    assert pinned.responses == [before]  # its value, revisions, version and lease
    after = await store.get("p")
    again = await store.txn([Compare("p", "mod", "=", after.mod_revision)] if after else [], [Put("p", b"three")])
    assert again.responses == [after]
    assert (await store.txn([Compare("q", "version", "=", 0)], [Put("q", b"new")])).responses == [None]
    assert (await store.txn([Compare("p", "version", "=", 0)], [Put("p", b"x")], [Get("p")])).succeeded is False
    await store.revoke_lease(lease.id)


async def test_read_only_txn_takes_no_revision(store: Store) -> None:
    rev = await store.put("a", b"1")
    result = await store.txn([Compare("a", "version", "=", 1)], [Get("a")], [])
    assert result.succeeded
    assert result.revision == rev
    assert await now(store) == rev
    failed_write = await store.txn([Compare("a", "version", "=", 9)], [Put("a", b"x")], [])
    assert not failed_write.succeeded
    assert failed_write.revision == rev
    assert await now(store) == rev


async def test_txn_is_atomic_when_an_op_is_rejected(store: Store) -> None:
    rev = await store.put("a", b"old")
    with pytest.raises(LeaseNotFound):
        await store.txn([], [Put("a", b"new"), Put("b", b"x", lease=424242)])
    assert (await store.get("a")).value == b"old"  # type: ignore[union-attr]
    assert await store.get("b") is None
    assert await now(store) == rev
    assert await store.put("c", b"ok") == rev + 1, "a rejected txn consumes no revision"


async def test_rejected_txn_does_not_disturb_its_group(store: Store) -> None:
    base = store.revision
    results = await asyncio.gather(
        store.put("x", b"1"),
        store.txn([], [Put("y", b"1"), Put("z", b"1", lease=99)]),
        store.put("w", b"1"),
        return_exceptions=True,
    )
    assert isinstance(results[1], LeaseNotFound)
    assert sorted([results[0], results[2]]) == [base + 1, base + 2]  # type: ignore[type-var]
    assert [kv.key for kv in (await store.range("", prefix=True)).kvs] == ["w", "x"]


async def test_concurrent_compare_and_swap_is_serialised(store: Store) -> None:
    await store.put("counter", b"0")
    writers = 50 if is_sqlite(store) else 15  # over HTTP every lost race is a round trip: fewer, same point

    async def increment() -> None:
        while True:
            kv = await store.get("counter")
            assert kv is not None
            new = str(int(kv.value) + 1).encode()
            result = await store.txn([Compare("counter", "mod", "=", kv.mod_revision)], [Put("counter", new)])
            if result.succeeded:
                return

    await asyncio.gather(*(increment() for _ in range(writers)))
    assert (await store.get("counter")).value == str(writers).encode()  # type: ignore[union-attr]


# ---- watch ----------------------------------------------------------------------------------------------


async def test_watch_from_past_revision_replays_then_goes_live(store: Store) -> None:
    base = store.revision
    for i in range(10):
        await store.put(f"w/{i}", str(i).encode())  # base + 1..10
    await store.put("elsewhere", b"x")  # base + 11
    watcher = store.watch("w/", prefix=True, from_revision=base + 4)

    async def writer() -> None:
        for i in range(10, 20):
            await store.put(f"w/{i}", str(i).encode())  # base + 12..21

    task = asyncio.create_task(writer())
    revisions = await collect_revisions(watcher, until=base + 21)
    await task
    watcher.cancel()
    expected = [*range(base + 4, base + 11), *range(base + 12, base + 22)]
    assert revisions == expected, "no gaps, no duplicates, nothing from other keys"


async def test_watch_registered_while_writes_are_in_flight_has_no_gap(store: Store) -> None:
    base = store.revision
    await store.put("k", b"0")
    writers = [asyncio.create_task(store.put("k", str(i).encode())) for i in range(1, 30)]
    await asyncio.sleep(0)  # let the writes queue up and the writer take a group
    start = store.revision + 1
    watcher = store.watch("k", from_revision=start)
    await asyncio.gather(*writers)
    revisions = await collect_revisions(watcher, until=base + 30)
    watcher.cancel()
    assert revisions == list(range(start, base + 31))


async def test_watch_events_carry_values_and_prev(store: Store) -> None:
    base = store.revision
    watcher = watch_from_next(store, "k")
    await store.put("k", b"a")
    await store.put("k", b"b")
    await store.delete("k")
    first, second, third = [await next_batch(watcher) for _ in range(3)]
    watcher.cancel()
    assert first == [Event(EventType.PUT, KeyValue("k", b"a", base + 1, base + 1, 1), None)]
    assert second[0].type == EventType.PUT
    assert second[0].kv == KeyValue("k", b"b", base + 1, base + 2, 2)
    assert second[0].prev_kv == KeyValue("k", b"a", base + 1, base + 1, 1)
    assert third[0].type == EventType.DELETE
    assert third[0].kv.key == "k"
    assert third[0].revision == base + 3
    assert third[0].prev_kv == KeyValue("k", b"b", base + 1, base + 2, 2)


async def test_watch_of_exact_key_is_not_woken_by_other_keys(store: Store) -> None:
    watcher = watch_from_next(store, "svc")
    for k in ("svc2", "svc/x", "sv", "other"):
        await store.put(k, b"noise")
    await store.delete("svc/", prefix=True)
    rev = await store.put("svc", b"mine")
    batch = await next_batch(watcher)
    watcher.cancel()
    assert [(ev.kv.key, ev.revision) for ev in batch] == [("svc", rev)]


async def test_prefix_watch_gets_one_batch_per_revision(store: Store) -> None:
    watcher = watch_from_next(store, "p/", prefix=True)
    first_rev = (await store.txn([], [Put("p/a", b"1"), Put("q", b"1"), Put("p/b", b"1")])).revision
    _, second_rev = await store.delete("p/", prefix=True)
    first = await next_batch(watcher)
    second = await next_batch(watcher)
    watcher.cancel()
    assert [(ev.type, ev.kv.key) for ev in first] == [(EventType.PUT, "p/a"), (EventType.PUT, "p/b")]
    assert [(ev.type, ev.kv.key) for ev in second] == [(EventType.DELETE, "p/a"), (EventType.DELETE, "p/b")]
    assert {ev.revision for ev in first} == {first_rev}
    assert {ev.revision for ev in second} == {second_rev}


async def test_watch_from_future_revision_skips_earlier_writes(store: Store) -> None:
    base = store.revision
    await store.put("k", b"0")  # base + 1
    watcher = store.watch("k", from_revision=base + 4)
    for i in range(1, 5):
        await store.put("k", str(i).encode())  # base + 2..5
    revisions = await collect_revisions(watcher, until=base + 5)
    watcher.cancel()
    assert revisions == [base + 4, base + 5]


async def test_cancelled_watch_stops_iterating(store: Store) -> None:
    watcher = watch_from_next(store, "k")
    await store.put("k", b"1")
    watcher.cancel()
    await store.put("k", b"2")
    seen = [batch async for batch in watcher]
    assert len(seen) <= 1
    if isinstance(store, SqliteStore):
        assert store.watcher_count() == 0


# ---- compaction -----------------------------------------------------------------------------------------


async def test_compaction_trims_history(store: Store) -> None:
    base = store.revision
    for i in range(10):
        await store.put("k", str(i).encode())  # base + 1..10
    await store.put("gone", b"x")  # base + 11
    await store.delete("gone")  # base + 12
    await store.compact(base + 6)
    assert store.compact_revision == base + 6
    # etcd keeps the compact revision itself (it removes what is below it); the others remove it too.
    below = base + 5 if isinstance(store, EtcdStore) else base + 6
    with pytest.raises(Compacted) as err:
        await next_batch(store.watch("k", from_revision=below))
    assert err.value.compact_revision == base + 6
    assert err.value.status == 410
    with pytest.raises(Compacted):
        await next_batch(store.watch("k", from_revision=base + 1))
    watcher = store.watch("k", from_revision=base + 7)
    assert await collect_revisions(watcher, until=base + 10) == [base + 7, base + 8, base + 9, base + 10]
    watcher.cancel()
    # Current state is untouched by compaction.
    assert await store.get("k") == KeyValue("k", b"9", base + 1, base + 10, 10)
    assert (await store.range("gone")).index == base + 12, "a tombstone newer than the compaction stays"


async def test_compaction_forgets_old_tombstones(store: Store) -> None:
    base = store.revision
    await store.put("t/a", b"1")  # base + 1
    await store.delete("t/a")  # base + 2
    await store.put("x", b"1")  # base + 3
    await store.compact(base + 2)
    assert (await store.range("t/", prefix=True)).index == 0


async def test_compaction_bounds(store: Store) -> None:
    base = store.revision
    await store.put("k", b"1")
    await store.put("k", b"2")
    with pytest.raises(StoreError):
        await store.compact(base + 5)
    await store.compact(base + 1)
    with pytest.raises(Compacted):
        await store.compact(base + 1)
    await store.compact(base + 2)
    assert store.compact_revision == base + 2
    watcher = store.watch("k", from_revision=base + 3)
    rev = await store.put("k", b"3")
    assert await collect_revisions(watcher, until=rev) == [base + 3]
    watcher.cancel()


# ---- leases ---------------------------------------------------------------------------------------------


async def test_lease_expiry_deletes_attached_keys(store: Store) -> None:
    lease = await store.grant_lease(1)
    assert lease.ttl >= 1  # etcd may round a TTL up to its minimum
    await store.put("session/a", b"1", lease=lease.id)
    await store.put("session/b", b"1", lease=lease.id)
    await store.put("plain", b"1")
    watcher = watch_from_next(store, "session/", prefix=True)
    batch = await next_batch(watcher)
    watcher.cancel()
    assert sorted((ev.type, ev.kv.key) for ev in batch) == [
        (EventType.DELETE, "session/a"),
        (EventType.DELETE, "session/b"),
    ]
    assert await store.get("plain") is not None
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.put("late", b"1", lease=lease.id)


async def test_keepalive_holds_the_lease(store: Store) -> None:
    lease = await store.grant_lease(1)
    await store.put("held", b"1", lease=lease.id)
    watcher = watch_from_next(store, "held")
    # Keep it alive for well over its TTL; the key must stay.
    for _ in range(4 * lease.ttl):
        assert await store.keepalive(lease.id) == lease.ttl
        if isinstance(store, SqliteStore):
            assert store.lease_remaining(lease.id) > 0
        await asyncio.sleep(0.5)
    assert await store.get("held") is not None
    # Once the keepalives stop, it expires.
    batch = await next_batch(watcher)
    watcher.cancel()
    assert batch[0].type == EventType.DELETE
    assert await store.get("held") is None


async def test_revoke_deletes_attached_keys_at_once(store: Store) -> None:
    lease = await store.grant_lease(600)
    await store.put("a", b"1", lease=lease.id)
    before = await store.put("b", b"1", lease=lease.id)
    await store.revoke_lease(lease.id)
    assert await store.get("a") is None
    assert await store.get("b") is None
    assert await now(store) == before + 1, "a revoke deletes its keys in one revision"
    with pytest.raises(LeaseNotFound):
        await store.revoke_lease(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)


async def test_revoking_a_lease_without_keys(store: Store) -> None:
    base = store.revision
    lease = await store.grant_lease(600)
    await store.revoke_lease(lease.id)
    assert await now(store) == base
    with pytest.raises(LeaseNotFound):
        await store.put("k", b"v", lease=lease.id)


async def test_reput_without_lease_detaches_the_key(store: Store) -> None:
    lease = await store.grant_lease(600)
    other = await store.grant_lease(600)
    await store.put("detached", b"1", lease=lease.id)
    await store.put("detached", b"2")
    await store.put("moved", b"1", lease=lease.id)
    await store.put("moved", b"2", lease=other.id)
    await store.put("stays", b"1", lease=lease.id)
    await store.revoke_lease(lease.id)
    assert (await store.get("detached")).lease == 0  # type: ignore[union-attr]
    assert (await store.get("moved")).lease == other.id  # type: ignore[union-attr]
    assert await store.get("stays") is None
    await store.revoke_lease(other.id)
    assert await store.get("moved") is None


async def test_put_with_unknown_lease_is_rejected(store: Store) -> None:
    base = store.revision
    with pytest.raises(LeaseNotFound) as err:
        await store.put("k", b"v", lease=12345)
    assert err.value.status == 404
    assert await now(store) == base


async def test_bad_lease_ttl_is_rejected(store: Store) -> None:
    with pytest.raises(StoreError) as err:
        await store.grant_lease(0)
    assert err.value.status == 400


async def test_put_racing_a_revoke_never_leaves_an_orphan(store: Store) -> None:
    # The put and the revoke land in the same group; whichever order, no key may outlive its lease.
    for i in range(20):
        lease = await store.grant_lease(600)
        await store.put(f"anchor/{i}", b"v", lease=lease.id)  # so the revoke has keys to delete
        key = f"race/{i}"
        if i % 2:
            outcome = await asyncio.gather(
                store.put(key, b"v", lease=lease.id), store.revoke_lease(lease.id), return_exceptions=True
            )
        else:
            outcome = await asyncio.gather(
                store.revoke_lease(lease.id), store.put(key, b"v", lease=lease.id), return_exceptions=True
            )
        assert not any(isinstance(o, BaseException) and not isinstance(o, LeaseNotFound) for o in outcome)
        assert await store.get(key) is None, f"{key} outlived its revoked lease ({outcome})"
        assert await store.get(f"anchor/{i}") is None


# ---- SQLite only: a fresh file, closing, restart ---------------------------------------------------------


async def test_fresh_store_is_empty_at_revision_zero(sqlite: SqliteStore) -> None:
    assert sqlite.revision == 0
    assert sqlite.compact_revision == 0
    assert await sqlite.get("missing") is None
    result = await sqlite.range("", prefix=True)
    assert (result.kvs, result.revision, result.index) == ([], 0, 0)


async def test_close_ends_watchers(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    watcher = s.watch("k")
    await s.close()
    with pytest.raises(StopAsyncIteration):
        await next_batch(watcher)
    with pytest.raises(StoreError):
        s.watch("k")
    with pytest.raises(StoreError):
        await s.put("k", b"v")


async def test_reopen_keeps_compact_revision_and_remaining_history(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    for i in range(8):
        await s.put(f"k{i % 2}", str(i).encode())  # 1..8
    await s.compact(5)
    await s.close()

    s = await SqliteStore.open(db_path)
    try:
        assert s.compact_revision == 5
        assert s.revision == 8
        with pytest.raises(Compacted):
            s.watch("k0", from_revision=5)
        watcher = s.watch("k", prefix=True, from_revision=6)
        assert await collect_revisions(watcher, until=8) == [6, 7, 8]
        watcher.cancel()
    finally:
        await s.close()


async def test_automatic_compaction_keeps_the_retention(db_path: Path) -> None:
    s = await SqliteStore.open(db_path, history_retention=5)
    try:
        for i in range(20):
            await s.put("k", str(i).encode())
        # The background compactor runs on its own schedule; compacting by hand exercises the same path.
        await s.compact(s.revision - 5)
        assert s.compact_revision == 15
        watcher = s.watch("k", from_revision=16)
        assert await collect_revisions(watcher, until=20) == [16, 17, 18, 19, 20]
        watcher.cancel()
    finally:
        await s.close()


async def test_leases_survive_reopen(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    lease = await s.grant_lease(600)
    await s.put("leased", b"1", lease=lease.id)
    revoked = await s.grant_lease(600)
    await s.put("revoked", b"1", lease=revoked.id)
    await s.revoke_lease(revoked.id)
    await s.close()

    s = await SqliteStore.open(db_path)
    try:
        assert (await s.get("leased")).lease == lease.id  # type: ignore[union-attr]
        assert await s.get("revoked") is None
        with pytest.raises(LeaseNotFound):
            await s.keepalive(revoked.id)
        assert await s.keepalive(lease.id) == 600
        fresh = await s.grant_lease(600)
        assert fresh.id != lease.id
        await s.revoke_lease(lease.id)
        assert await s.get("leased") is None
    finally:
        await s.close()


# ---- SQLite only: group commit and durability ----------------------------------------------------------------------


class CountingStore(SqliteStore):
    """A real SqliteStore that also counts its SQLite commits (one fsync each)."""

    commits = 0

    def _commit(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._commit(*args, **kwargs)
        self.commits += 1


async def test_group_commit_gives_each_write_its_own_revision(db_path: Path) -> None:
    s = await CountingStore.open(db_path)
    n = 300
    revisions = await asyncio.gather(*(s.put(f"g/{i:04d}", f"value-{i}".encode()) for i in range(n)))
    assert sorted(revisions) == list(range(1, n + 1)), "every write has its own revision"
    assert s.revision == n
    assert 1 <= s.commits < n, "concurrent writes share commits"
    for i, rev in enumerate(revisions):
        assert await s.get(f"g/{i:04d}") == KeyValue(f"g/{i:04d}", f"value-{i}".encode(), rev, rev, 1)
    await s.close()

    s = await SqliteStore.open(db_path)
    try:
        assert s.revision == n
        kvs = (await s.range("g/", prefix=True)).kvs
        assert [(kv.key, kv.value, kv.mod_revision) for kv in kvs] == [
            (f"g/{i:04d}", f"value-{i}".encode(), revisions[i]) for i in range(n)
        ]
    finally:
        await s.close()


async def test_same_key_written_many_times_in_one_group(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    revisions = await asyncio.gather(*(s.put("hot", str(i).encode()) for i in range(100)))
    final = await s.get("hot")
    assert final is not None
    assert final.version == 100
    assert final.mod_revision == max(revisions)
    await s.close()
    s = await SqliteStore.open(db_path)
    try:
        assert await s.get("hot") == final
    finally:
        await s.close()


async def test_reopen_after_close_keeps_everything(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    await s.put("a", b"1")  # 1
    await s.put("b", b"\x00\xffbinary")  # 2
    await s.put("a", b"2")  # 3
    await s.put("dead", b"x")  # 4
    await s.delete("dead")  # 5
    await s.txn([], [Put("t/1", b"1"), Put("t/2", b"2")])  # 6
    before = {kv.key: kv for kv in (await s.range("", prefix=True)).kvs}
    await s.close()

    s = await SqliteStore.open(db_path)
    try:
        assert s.revision == 6
        after = {kv.key: kv for kv in (await s.range("", prefix=True)).kvs}
        assert after == before
        assert (await s.range("dead")).index == 5, "tombstones survive a restart"
        watcher = s.watch("", prefix=True, from_revision=1)
        assert await collect_revisions(watcher, until=6) == [1, 2, 3, 4, 5, 6, 6]
        watcher.cancel()
        assert await s.put("c", b"1") == 7, "revisions continue after a restart"
    finally:
        await s.close()


async def test_close_answers_every_inflight_write(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    writes = [asyncio.create_task(s.put(f"c/{i}", b"v")) for i in range(200)]
    # Let the writer take the group and start committing it, then close under it.
    for _ in range(3):
        await asyncio.sleep(0)
    await s.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), SOON)
    acknowledged = [i for i, o in enumerate(outcomes) if isinstance(o, int)]
    assert all(isinstance(o, int | StoreError) for o in outcomes)
    s = await SqliteStore.open(db_path)
    try:
        for i in acknowledged:
            assert await s.get(f"c/{i}") is not None, "an acknowledged write is durable"
    finally:
        await s.close()


# ---- SQLite only: dev mode -------------------------------------------------------------------------------------------


async def test_dev_mode_keeps_state_in_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = await SqliteStore.open(None)
    try:
        revs = await asyncio.gather(*(s.put(f"d/{i}", b"v") for i in range(50)))
        assert sorted(revs) == list(range(1, 51))
        lease = await s.grant_lease(600)
        await s.put("d/leased", b"v", lease=lease.id)
        watcher = s.watch("d/", prefix=True, from_revision=10)
        assert (await next_batch(watcher))[0].revision == 10
        watcher.cancel()
        await s.revoke_lease(lease.id)
        assert await s.get("d/leased") is None
        assert (await s.delete("d/", prefix=True))[0] == 50
        await s.compact(s.revision)
        result = await s.txn([Compare("d/1", "version", "=", 0)], [Put("x", b"1")])
        assert result.succeeded
    finally:
        await s.close()
    assert list(tmp_path.iterdir()) == [], "dev mode writes no files"
    fresh = await SqliteStore.open(None)
    try:
        assert fresh.revision == 0
    finally:
        await fresh.close()


# ---- SQLite only: failure paths (issue 11, item 12) -----------------------------------------------------------------


async def test_watcher_cut_off_during_replay_is_not_left_registered(
    sqlite: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite
    # A small queue limit stands for a watcher far behind: the replay alone overflows it.
    monkeypatch.setattr(sqlite_module, "_WATCH_QUEUE_LIMIT", 3)
    for i in range(10):
        await store.put("r/k", str(i).encode())
    watcher = store.watch("r/", prefix=True, from_revision=1)
    watcher.cancel()
    assert store.watcher_count() == 0
    replayed = store.watch("r/k", from_revision=1)
    with pytest.raises(WatchOverflow):
        for _ in range(10):
            await next_batch(replayed)
    replayed.cancel()
    assert store.watcher_count() == 0


async def test_failed_compaction_leaves_no_open_transaction(db_path: Path) -> None:
    s = await SqliteStore.open(db_path)
    try:
        for i in range(5):
            await s.put("k", str(i).encode())
        # A real SQLite failure of the compaction's DELETE, from a trigger another connection installs.
        other = sqlite3.connect(db_path)
        other.execute("CREATE TRIGGER no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'refused'); END")
        other.commit()
        other.close()
        with pytest.raises(Exception, match="refused"):
            await s.compact(3)
        # Later group commits still work, and are durable.
        assert await s.put("after", b"1") == 6
        assert await s.put("after", b"2") == 7
    finally:
        await s.close()
    s = await SqliteStore.open(db_path)
    try:
        assert (await s.get("after")).value == b"2"  # type: ignore[union-attr]
    finally:
        await s.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
                             capture_output=True, check=False).returncode == 0
    need_peer("a mountable tmpfs", mounted, "mounting a 1 MiB tmpfs needs root (CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_reports_sqlite_full_and_recovers(tiny_fs: Path) -> None:
    ballast = tiny_fs / "ballast"
    ballast.write_bytes(b"\0" * 262_144)  # removed later: the operator freeing space
    s = await SqliteStore.open(tiny_fs / "state.db")
    try:
        error = None
        for i in range(200):
            try:
                await s.put(f"fill/{i}", os.urandom(16_384))
            except StoreError as exc:
                error = exc
                break
        assert error is not None, "a 1 MiB disk must fill up"
        assert "full" in str(error), f"the real cause (SQLITE_FULL) must be reported, not {error}"
        assert "rollback" not in str(error)
        ballast.unlink()
        rev = await s.put("after", b"1")
        assert (await s.get("after")).mod_revision == rev  # type: ignore[union-attr]
    finally:
        await s.close()


async def test_indexed_prefix_watchers_each_get_exactly_their_keys(sqlite: SqliteStore) -> None:
    store = sqlite
    prefixes = ["", "a", "a/", "a/b", "a/b", "b/", "a/bc"]
    watchers = [store.watch(p, prefix=True) for p in prefixes]
    rev = await store.txn([], [Put("a/bcd", b"1"), Put("b/x", b"1"), Put("c", b"1")])
    for p, w in zip(prefixes, watchers, strict=True):
        expected = [k for k in ("a/bcd", "b/x", "c") if k.startswith(p)]
        if expected:
            assert [ev.kv.key for ev in await next_batch(w)] == expected, p
    for w in watchers[:4]:
        w.cancel()
    assert store.watcher_count() == 3
    await store.put("a/bz", b"2")
    assert [ev.kv.key for ev in await next_batch(watchers[4])] == ["a/bz"]
    for w in watchers[4:]:
        w.cancel()
    assert store.watcher_count() == 0
    assert rev.succeeded
