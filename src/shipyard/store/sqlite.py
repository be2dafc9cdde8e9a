"""Embedded store: current state and recent history in memory, made durable in SQLite (WAL).

Writes queue up and are committed in groups, one fsync per group, off the event loop; a write's
future resolves only after its group is durable. Reads never touch SQLite after start-up.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sortedcontainers import SortedDict

from shipyard.store.base import (
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    RangeResult,
    StoreError,
    TxnResult,
    WatchOverflow,
)
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL, idx INTEGER NOT NULL, type INTEGER NOT NULL, key TEXT NOT NULL,
    value BLOB, create_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL,
    PRIMARY KEY (rev, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# A watcher that has this many undelivered batches is cut off (it re-watches from history).
_WATCH_QUEUE_LIMIT = 50_000


def _keys_under(keys: SortedDict, prefix: str) -> list[str]:
    """The sorted keys of `keys` that start with prefix.

    Walks from prefix and stops at the first key that does not start with it, rather than using an
    upper bound like prefix + max-char, which would miss keys containing that very character."""
    out = []
    for k in keys.irange(minimum=prefix):
        if not k.startswith(prefix):
            break
        out.append(k)
    return out


def _rollback(db: sqlite3.Connection) -> None:
    """Ends a failed transaction without hiding why it failed.

    SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR); a ROLLBACK then fails with "no
    transaction is active", which must not replace the real cause the caller is raising."""
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("store rollback failed: %s", exc)


class _SqliteWatcher:
    """Queue of event batches fed by the store; iterate it, cancel it when done."""

    def __init__(self, store: SqliteStore, key: str, prefix: bool, min_revision: int = 0) -> None:
        self._store = store
        self.key = key
        self.prefix = prefix
        # A watch from a revision still in the future must not see the writes before it.
        self.min_revision = min_revision
        self._queue: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self._cancelled = False
        self.cut_off = False  # fell behind and was dropped by the store
        self.last_revision = 0

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    def deliver(self, batch: list[Event]) -> None:
        if self._cancelled or batch[0].revision < self.min_revision:
            return
        if self._queue.qsize() >= _WATCH_QUEUE_LIMIT:
            self._queue.put_nowait(WatchOverflow(f"watcher on {self.key!r} fell behind"))
            self._store._remove_watcher(self)
            self._cancelled = True
            self.cut_off = True
            return
        self._queue.put_nowait(batch)

    def fail(self, exc: BaseException) -> None:
        self._queue.put_nowait(exc)

    def __aiter__(self) -> _SqliteWatcher:
        return self

    async def __anext__(self) -> list[Event]:
        if self._cancelled and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._cancelled = True
            if isinstance(item, StopAsyncIteration):
                raise StopAsyncIteration
            raise item
        self.last_revision = item[-1].revision
        return item

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._store._remove_watcher(self)
            self._queue.put_nowait(StopAsyncIteration())

    async def __aenter__(self) -> _SqliteWatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


@dataclass(frozen=True, slots=True)
class _DeleteLeaseKeys:
    """Internal op: delete every key that, at commit time, is still attached to the lease."""

    lease: int


_WriteOp = Op | _DeleteLeaseKeys  # what the writer applies: the public ops and this internal one


@dataclass(slots=True)
class _WriteRequest:
    compares: Sequence[Compare]
    success: Sequence[_WriteOp]
    failure: Sequence[_WriteOp]
    future: asyncio.Future[TxnResult]


@dataclass(slots=True)
class _LeaseState:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class SqliteStore:
    """The embedded backend. `path=None` keeps everything in memory only (`--dev`)."""

    def __init__(self, path: str | os.PathLike[str] | None, *, history_retention: int = 100_000) -> None:
        self._path = Path(path) if path is not None else None
        self._history_retention = history_retention
        self._kv: SortedDict = SortedDict()  # key -> KeyValue
        self._tombstones: SortedDict = SortedDict()  # deleted key -> revision of its deletion
        self._history: list[Event] = []  # events with revision > compact revision, in order
        self._history_revs: list[int] = []
        self._revision = 0
        self._compact_revision = 0
        self._exact_watchers: dict[str, set[_SqliteWatcher]] = {}
        # Prefix watchers indexed by their prefix, and the prefix lengths in use: an event looks up its key's
        # prefixes of those lengths instead of testing every prefix watcher.
        self._prefix_watchers: dict[str, set[_SqliteWatcher]] = {}
        self._prefix_lengths: dict[int, int] = {}  # length -> how many distinct prefixes have it
        self._leases: dict[int, _LeaseState] = {}
        self._lease_heap: list[tuple[float, int]] = []
        self._pending: list[_WriteRequest] = []
        self._wakeup = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shipyard-store")
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._next_lease = 0

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str] | None, *, history_retention: int = 100_000
    ) -> SqliteStore:
        store = cls(path, history_retention=history_retention)
        await store._start()
        return store

    async def _start(self) -> None:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        now = time.monotonic()
        for lease_id, state in self._leases.items():
            # As etcd does after a restart: a lease gets its full TTL again from now.
            state.deadline = now + state.ttl
            heapq.heappush(self._lease_heap, (state.deadline, lease_id))
        self._tasks.append(asyncio.create_task(self._write_loop(), name="store-writer"))
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="store-leases"))
        self._tasks.append(asyncio.create_task(self._compact_loop(), name="store-compactor"))

    def _load(self) -> None:
        assert self._path is not None
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        meta = dict(db.execute("SELECT name, value FROM meta"))
        self._revision = meta.get("revision", 0)
        self._compact_revision = meta.get("compact_revision", 0)
        for key, value, create_rev, mod_rev, version, lease in db.execute("SELECT * FROM kv"):
            self._kv[key] = KeyValue(key, bytes(value), create_rev, mod_rev, version, lease)
        for lease_id, ttl in db.execute("SELECT id, ttl FROM leases"):
            self._leases[lease_id] = _LeaseState(ttl, 0.0)
            self._next_lease = max(self._next_lease, lease_id)
        for kv in self._kv.values():
            if kv.lease and kv.lease in self._leases:
                self._leases[kv.lease].keys.add(kv.key)
        rows = db.execute(
            "SELECT rev, type, key, value, create_rev, version, lease FROM events WHERE rev > ? "
            "ORDER BY rev, idx",
            (self._compact_revision,),
        )
        for rev, etype, key, value, create_rev, version, lease in rows:
            kv = KeyValue(key, bytes(value or b""), create_rev, rev, version, lease)
            self._history.append(Event(EventType(etype), kv))
            self._history_revs.append(rev)
            if etype == EventType.DELETE and key not in self._kv:
                self._tombstones[key] = rev
            self._revision = max(self._revision, rev)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        writer, *others = self._tasks
        await cancel_all_and_wait(others)
        # The writer is not cancelled: a group it has taken is committed (or fails) and its callers
        # are answered, instead of being left waiting forever on futures nobody will resolve.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        for req in self._pending:
            if not req.future.done():
                req.future.set_exception(StoreError("store closed"))
        for group in [*self._prefix_watchers.values(), *self._exact_watchers.values()]:
            for watcher in group:
                watcher.fail(StopAsyncIteration())
        self._exact_watchers.clear()
        self._prefix_watchers.clear()
        self._prefix_lengths.clear()
        if self._db is not None:
            db = self._db
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)

    # ---- reads --------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    async def get(self, key: str) -> KeyValue | None:
        return self._kv.get(key)

    def get_now(self, key: str) -> KeyValue | None:
        """Synchronous read for in-process callers on the event loop (no await needed)."""
        return self._kv.get(key)

    async def range(self, key: str, *, prefix: bool = False) -> RangeResult:
        return self.range_now(key, prefix=prefix)

    def range_now(self, key: str, *, prefix: bool = False) -> RangeResult:
        if not prefix:
            kv = self._kv.get(key)
            kvs = [kv] if kv is not None else []
            index = kv.mod_revision if kv is not None else self._tombstones.get(key, 0)
            return RangeResult(kvs, self._revision, index)
        kvs = [self._kv[k] for k in _keys_under(self._kv, key)]
        index = max((kv.mod_revision for kv in kvs), default=0)
        for k in _keys_under(self._tombstones, key):
            index = max(index, self._tombstones[k])
        return RangeResult(kvs, self._revision, index)

    # ---- writes -------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        result = await self.txn((), (Put(key, value, lease),))
        return result.revision

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        result = await self.txn((), (Delete(key, prefix),))
        deleted = result.responses[0]
        assert isinstance(deleted, list)
        return len(deleted), result.revision

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[_WriteOp], failure: Sequence[_WriteOp] = ()
    ) -> TxnResult:
        if self._closed:
            raise StoreError("store closed")
        writes = False
        for op in (*success, *failure):
            if isinstance(op, Put):
                writes = True
                # Checked here so a bad value fails its caller alone, never a group's SQLite commit.
                if not isinstance(op.value, bytes):
                    raise StoreError(f"value of {op.key!r} must be bytes, not {type(op.value).__name__}", status=400)
            elif isinstance(op, Delete | _DeleteLeaseKeys):
                writes = True
        if not writes:
            # Read-only: answer from memory now; no revision, no fsync.
            return self._evaluate(compares, success, failure, {}, set(), self._revision)[0]
        future: asyncio.Future[TxnResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_WriteRequest(compares, success, failure, future))
        self._wakeup.set()
        return await future

    def _lookup(self, key: str, overlay: dict[str, KeyValue | None]) -> KeyValue | None:
        if key in overlay:
            return overlay[key]
        return self._kv.get(key)

    def _keys_with_prefix(self, prefix: str, overlay: dict[str, KeyValue | None]) -> list[str]:
        keys = set(_keys_under(self._kv, prefix))
        keys.update(k for k in overlay if k.startswith(prefix))
        return sorted(k for k in keys if self._lookup(k, overlay) is not None)

    def _compare(self, cmp: Compare, overlay: dict[str, KeyValue | None]) -> bool:
        kv = self._lookup(cmp.key, overlay)
        actual: int | bytes | None
        if cmp.target == "value":
            actual = kv.value if kv else None
        elif cmp.target == "version":
            actual = kv.version if kv else 0
        elif cmp.target == "create":
            actual = kv.create_revision if kv else 0
        elif cmp.target == "mod":
            actual = kv.mod_revision if kv else 0
        else:
            actual = kv.lease if kv else 0
        expected = cmp.value
        if cmp.op == "=":
            return actual == expected
        if cmp.op == "!=":
            return actual != expected
        if actual is None or expected is None:
            return False
        if isinstance(actual, bytes) != isinstance(expected, bytes):
            raise StoreError(f"cannot compare {cmp.target} of {cmp.key!r} with {expected!r}", status=400)
        if cmp.op == "<":
            return actual < expected  # type: ignore[operator]
        return actual > expected  # type: ignore[operator]

    def _evaluate(
        self,
        compares: Sequence[Compare],
        success: Sequence[_WriteOp],
        failure: Sequence[_WriteOp],
        overlay: dict[str, KeyValue | None],
        revoked: set[int],
        revision: int,
    ) -> tuple[TxnResult, list[Event]]:
        """Runs one txn against memory plus the group's overlay; records its writes in overlay.

        `revision` is the revision this txn's writes would get; `revoked` holds the leases revoked
        earlier in this group (gone for every later txn). Raises LeaseNotFound before touching the
        overlay, so a rejected txn leaves no trace."""
        succeeded = all(self._compare(c, overlay) for c in compares)
        ops = success if succeeded else failure
        for op in ops:
            if (
                isinstance(op, Put | _DeleteLeaseKeys)
                and op.lease
                and (op.lease not in self._leases or op.lease in revoked)
            ):
                raise LeaseNotFound(op.lease)
        responses: list[object] = []
        events: list[Event] = []
        for op in ops:
            if isinstance(op, Get):
                if op.prefix:
                    keys = self._keys_with_prefix(op.key, overlay)
                    responses.append([self._lookup(k, overlay) for k in keys])
                else:
                    kv = self._lookup(op.key, overlay)
                    responses.append([kv] if kv else [])
            elif isinstance(op, Put):
                prev = self._lookup(op.key, overlay)
                kv = KeyValue(
                    op.key,
                    op.value,
                    prev.create_revision if prev else revision,
                    revision,
                    prev.version + 1 if prev else 1,
                    op.lease,
                )
                overlay[op.key] = kv
                events.append(Event(EventType.PUT, kv, prev))
                responses.append(prev)
            else:
                if isinstance(op, _DeleteLeaseKeys):
                    # Keys attached by earlier txns of this same group are only in the overlay yet.
                    attached = set(self._leases[op.lease].keys)
                    attached.update(k for k, kv in overlay.items() if kv is not None and kv.lease == op.lease)
                    keys = [k for k in sorted(attached) if (cur := self._lookup(k, overlay)) and cur.lease == op.lease]
                    revoked.add(op.lease)
                elif op.prefix:
                    keys = self._keys_with_prefix(op.key, overlay)
                else:
                    keys = [op.key]
                deleted = []
                for k in keys:
                    prev = self._lookup(k, overlay)
                    if prev is None:
                        continue
                    overlay[k] = None
                    deleted.append(prev)
                    events.append(Event(EventType.DELETE, KeyValue(k, b"", 0, revision, 0, 0), prev))
                responses.append(deleted)
        return TxnResult(succeeded, revision if events else self._revision, responses), events

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, []
            overlay: dict[str, KeyValue | None] = {}
            revoked: set[int] = set()
            revision = self._revision
            outcomes: list[tuple[_WriteRequest, TxnResult | BaseException]] = []
            group_events: list[list[Event]] = []
            for req in batch:
                try:
                    result, events = self._evaluate(
                        req.compares, req.success, req.failure, overlay, revoked, revision + 1
                    )
                except Exception as exc:  # a bad request fails alone, never the group
                    outcomes.append((req, exc))
                    continue
                if events:
                    revision += 1
                    group_events.append(events)
                else:
                    result.revision = revision
                outcomes.append((req, result))
            if group_events or revoked:
                try:
                    if self._db is not None:
                        await loop.run_in_executor(self._executor, self._commit, group_events, revision, revoked)
                except Exception as exc:
                    log.error("store commit failed: %s", exc)
                    for req, _ in outcomes:
                        if not req.future.done():
                            req.future.set_exception(StoreError(f"commit failed: {exc}"))
                    continue
                self._apply(group_events, revision, revoked)
            for req, outcome in outcomes:
                if req.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    req.future.set_exception(outcome)
                else:
                    req.future.set_result(outcome)

    def _commit(self, group_events: list[list[Event]], revision: int, revoked: set[int]) -> None:
        """Writes one group in one SQLite transaction: one fsync for all of it."""
        db = self._db
        assert db is not None
        kv_rows: dict[str, tuple | None] = {}
        event_rows: list[tuple[int, int, int, str, bytes | None, int, int, int]] = []
        for events in group_events:
            for idx, ev in enumerate(events):
                kv = ev.kv
                if ev.type == EventType.PUT:
                    kv_rows[kv.key] = (
                        kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease
                    )
                    event_rows.append(
                        (kv.mod_revision, idx, 0, kv.key, kv.value, kv.create_revision, kv.version, kv.lease)
                    )
                else:
                    kv_rows[kv.key] = None
                    event_rows.append((kv.mod_revision, idx, 1, kv.key, None, 0, 0, 0))
        db.execute("BEGIN")
        try:
            puts = [row for row in kv_rows.values() if row is not None]
            if puts:
                db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)", puts)
            dels = [(k,) for k, row in kv_rows.items() if row is None]
            if dels:
                db.executemany("DELETE FROM kv WHERE key = ?", dels)
            if event_rows:
                db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", event_rows)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', ?)", (revision,))
            if revoked:
                db.executemany("DELETE FROM leases WHERE id = ?", [(lease,) for lease in revoked])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _apply(self, group_events: list[list[Event]], revision: int, revoked: set[int]) -> None:
        """Makes a durable group visible: memory state, history, leases, then watchers."""
        for events in group_events:
            for ev in events:
                key = ev.kv.key
                prev = ev.prev_kv
                if prev is not None and prev.lease and prev.lease in self._leases:
                    self._leases[prev.lease].keys.discard(key)
                if ev.type == EventType.PUT:
                    self._kv[key] = ev.kv
                    self._tombstones.pop(key, None)
                    if ev.kv.lease and ev.kv.lease in self._leases:
                        self._leases[ev.kv.lease].keys.add(key)
                else:
                    self._kv.pop(key, None)
                    self._tombstones[key] = ev.kv.mod_revision
                self._history.append(ev)
                self._history_revs.append(ev.kv.mod_revision)
        for lease in revoked:
            self._leases.pop(lease, None)
        self._revision = revision
        for events in group_events:
            self._notify(events)

    def _notify(self, events: list[Event]) -> None:
        if not self._prefix_watchers and not self._exact_watchers:
            return
        per_watcher: dict[_SqliteWatcher, list[Event]] = {}
        prefixes, lengths = self._prefix_watchers, self._prefix_lengths
        for ev in events:
            key = ev.kv.key
            for w in self._exact_watchers.get(key, ()):
                per_watcher.setdefault(w, []).append(ev)
            for length in lengths:
                if length <= len(key):
                    for w in prefixes.get(key[:length], ()):
                        per_watcher.setdefault(w, []).append(ev)
        for w, batch in per_watcher.items():
            w.deliver(batch)

    # ---- watches ------------------------------------------------------------------------------

    def watch(self, key: str, *, prefix: bool = False, from_revision: int = 0,
              prev_kv: bool = True) -> _SqliteWatcher:  # previous versions cost nothing here: always sent
        if self._closed:
            raise StoreError("store closed")
        if from_revision and from_revision <= self._compact_revision:
            raise Compacted(self._compact_revision)
        watcher = _SqliteWatcher(self, key, prefix, from_revision)
        if from_revision and from_revision <= self._revision:
            # Replay history; registration below happens in the same loop step, so no gap.
            start = bisect.bisect_left(self._history_revs, from_revision)
            batch: list[Event] = []
            for ev in self._history[start:]:
                if not watcher.matches(ev.kv.key):
                    continue
                if batch and batch[-1].revision != ev.revision:
                    watcher.deliver(batch)
                    batch = []
                batch.append(ev)
            if batch:
                watcher.deliver(batch)
            if watcher.cut_off:
                # It overflowed during the replay: it ends with WatchOverflow and must not stay registered.
                return watcher
        if prefix:
            group = self._prefix_watchers.get(key)
            if group is None:
                group = self._prefix_watchers[key] = set()
                self._prefix_lengths[len(key)] = self._prefix_lengths.get(len(key), 0) + 1
            group.add(watcher)
        else:
            self._exact_watchers.setdefault(key, set()).add(watcher)
        return watcher

    def _remove_watcher(self, watcher: _SqliteWatcher) -> None:
        if watcher.prefix:
            group = self._prefix_watchers.get(watcher.key)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._prefix_watchers[watcher.key]
                    n = len(watcher.key)
                    self._prefix_lengths[n] -= 1
                    if not self._prefix_lengths[n]:
                        del self._prefix_lengths[n]
        else:
            group = self._exact_watchers.get(watcher.key)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._exact_watchers[watcher.key]

    # ---- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise StoreError("lease TTL must be positive", status=400)
        self._next_lease = max(self._next_lease + 1, int(time.time() * 1000))
        lease_id = self._next_lease
        if self._db is not None:
            db = self._db

            def persist() -> None:
                db.execute("INSERT INTO leases VALUES (?, ?)", (lease_id, ttl))

            await asyncio.get_running_loop().run_in_executor(self._executor, persist)
        deadline = time.monotonic() + ttl
        self._leases[lease_id] = _LeaseState(ttl, deadline)
        heapq.heappush(self._lease_heap, (deadline, lease_id))
        return Lease(lease_id, ttl)

    async def keepalive(self, lease: int) -> int:
        state = self._leases.get(lease)
        if state is None:
            raise LeaseNotFound(lease)
        state.deadline = time.monotonic() + state.ttl
        heapq.heappush(self._lease_heap, (state.deadline, lease))
        return state.ttl

    def lease_remaining(self, lease: int) -> float:
        state = self._leases.get(lease)
        if state is None:
            raise LeaseNotFound(lease)
        return max(0.0, state.deadline - time.monotonic())

    async def revoke_lease(self, lease: int) -> None:
        if lease not in self._leases:
            raise LeaseNotFound(lease)
        # Always through the writer, even with no keys attached yet: a put with this lease may be in
        # the same or the in-flight group. The writer deletes the keys still attached at that point,
        # forgets the lease in the same commit, and rejects every later put with it.
        await self.txn((), (_DeleteLeaseKeys(lease),))

    async def _lease_loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            while self._lease_heap and self._lease_heap[0][0] <= now:
                _, lease_id = heapq.heappop(self._lease_heap)
                state = self._leases.get(lease_id)
                if state is None or state.deadline > now:
                    continue  # revoked, or renewed since this entry was pushed
                try:
                    await self.revoke_lease(lease_id)
                except LeaseNotFound:
                    pass
                except Exception as exc:
                    log.error("revoking expired lease %s failed: %s", lease_id, exc)
            await asyncio.sleep(0.1)

    # ---- compaction ---------------------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        if revision <= self._compact_revision:
            raise Compacted(self._compact_revision)
        if revision > self._revision:
            raise StoreError("compaction revision is in the future", status=400)
        cut = bisect.bisect_right(self._history_revs, revision)
        del self._history[:cut]
        del self._history_revs[:cut]
        for key in [k for k, rev in self._tombstones.items() if rev <= revision]:
            del self._tombstones[key]
        self._compact_revision = revision
        if self._db is not None:
            db = self._db

            def persist() -> None:
                db.execute("BEGIN")
                try:
                    db.execute("DELETE FROM events WHERE rev <= ?", (revision,))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('compact_revision', ?)", (revision,))
                    db.execute("COMMIT")
                except BaseException:
                    # Left open, the transaction would make every later group commit's BEGIN fail.
                    _rollback(db)
                    raise

            await asyncio.get_running_loop().run_in_executor(self._executor, persist)

    async def _compact_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(10)
            target = self._revision - self._history_retention
            if target > self._compact_revision:
                try:
                    await self.compact(target)
                except Exception as exc:
                    log.error("compaction failed: %s", exc)

    # ---- introspection ------------------------------------------------------------------------

    def watcher_count(self) -> int:
        return sum(len(s) for s in self._prefix_watchers.values()) + sum(len(s) for s in self._exact_watchers.values())
