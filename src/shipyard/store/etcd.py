"""The store on an etcd v3 cluster, through etcd's HTTP/JSON gateway: the 1:1 mapping of our model.

Keys live under a namespace prefix; nothing above the store can tell this backend from SQLite, and
this module never keeps state that etcd does not have, except the deletion memory described below.
"""

from __future__ import annotations

import asyncio
import logging
from binascii import a2b_base64, b2a_base64
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from sortedcontainers import SortedDict

from shipyard.store.base import (
    Compacted,
    Compare,
    CompareOp,
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
    require_bytes,
)
from shipyard.store.etcd_batch import Answer, GroupCommit
from shipyard.store.etcd_http import EtcdHttp, MaybeSent, Unreachable
from shipyard.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_TARGETS = {
    "version": ("VERSION", "version"),
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "value": ("VALUE", "value"),
    "lease": ("LEASE", "lease"),
}
_RESULTS = {"=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
# "value is (not) absent" as a compare of the version with 0
_ABSENT_VERSION_OPS: dict[str, CompareOp] = {"=": "=", "!=": ">"}
RECENT_MAX = 100_000  # keys remembered as write hints (recent())...
RECENT_BYTES = 64 << 20  # ...and the bytes of their values at most
RECENT_EVENTS = 10_000  # (revision, key) of the latest changes the follow stream saw, for wait_for_change()
FOLLOWED_BACKLOG = 10_000  # revisions a watch served from the follow stream may lag before it must resync


def _b64(data: bytes) -> str:
    return b2a_base64(data, newline=False).decode()  # base64.b64encode's own work, without its Python layer


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's GetPrefixRangeEnd: the prefix with its last non-0xff byte incremented."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"  # the whole keyspace


class EtcdWatcher:
    """One etcd watch stream; yields one batch per revision. Opens on first use or `start()`."""

    def __init__(self, store: EtcdStore, key: str, prefix: bool, from_revision: int, *, prev_kv: bool = True) -> None:
        self._store = store
        self._request = store._key_range(key, prefix)
        if prev_kv:
            self._request["prev_kv"] = True
        if from_revision:
            self._request["start_revision"] = str(from_revision)
        self._response: aiohttp.ClientResponse | None = None
        self._pending: list[list[Event]] = []
        self._cancelled = False
        self._buffer = bytearray()
        self._answer_revision = 0  # etcd's revision when it sent the message being handed out
        self.progress = 0  # every change in the watched range up to this revision has been handed out

    def __aiter__(self) -> EtcdWatcher:
        return self

    async def start(self) -> EtcdWatcher:
        if self._response is None:
            session = await self._store.session()
            url = self._store.url
            try:
                self._response = await session.post(
                    url + "/v3/watch",
                    data=orjson.dumps({"create_request": self._request}),
                    timeout=aiohttp.ClientTimeout(total=None),
                )
            except aiohttp.ClientError as exc:
                self._store.next_endpoint(url)  # the caller's retry watches through another member
                raise StoreError(f"etcd at {url} unreachable: {exc}", status=503) from None
            if self._response.status != 200:
                text = await self._response.text()
                raise StoreError(f"etcd watch failed ({self._response.status}): {text}")
        return self

    async def __anext__(self) -> list[Event]:
        if self._cancelled:
            raise StopAsyncIteration
        await self.start()
        assert self._response is not None
        while not self._pending:
            line = await self._next_line()
            if not line.strip():
                continue
            result = orjson.loads(line).get("result", {})
            self._answer_revision = int((result.get("header") or {}).get("revision", 0))
            if result.get("canceled"):
                if "compact_revision" in result:
                    raise Compacted(int(result["compact_revision"]))
                raise StoreError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
            batch: list[Event] = []
            for raw in result.get("events", []):
                event = self._store._event(raw)
                if batch and batch[-1].revision != event.revision:
                    self._pending.append(batch)
                    batch = []
                batch.append(event)
            if batch:
                self._pending.append(batch)
        batch = self._pending.pop(0)
        # etcd sent this message at its revision then, with every change in range up to it: once the message's last
        # batch is out, nothing older can come
        self.progress = max(batch[-1].revision, self._answer_revision if not self._pending else 0)
        return batch

    async def _next_line(self) -> bytes:
        """One message of the stream, however long (aiohttp's readline refuses lines past 64 KiB: a batch of events
        with a large value would break the stream at that revision, again at each reconnection)."""
        assert self._response is not None
        while (cut := self._buffer.find(b"\n")) < 0:
            chunk = await self._response.content.readany()
            if not chunk:
                raise StopAsyncIteration
            self._buffer += chunk
        line = bytes(self._buffer[:cut])
        del self._buffer[: cut + 1]
        return line

    def cancel(self) -> None:
        self._cancelled = True
        if self._response is not None:
            self._response.close()


class FollowedWatcher:
    """A watch without previous versions served from the store's follow stream instead of an etcd watch of its own:
    etcd sends each change once to this process, not once more per such watcher (the session manager follows kv/,
    every Consul KV write). Made only from a revision the stream has not reached yet, so it misses nothing; a gap in
    the stream (compaction) or a consumer too far behind ends it with the error that makes its follower resync."""

    def __init__(self, store: EtcdStore, key: str, prefix: bool, from_revision: int) -> None:
        self._store = store
        self._key = key
        self._prefix = prefix
        self._from = from_revision
        self._batches: deque[list[Event]] = deque()
        self._error: StoreError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._cancelled = False

    def __aiter__(self) -> FollowedWatcher:
        return self

    def offer(self, batch: list[Event]) -> None:
        """One revision's changes as the follow stream saw them (the stream's order is etcd's)."""
        key, prefix = self._key, self._prefix
        mine = [e for e in batch if e.revision >= self._from
                and (e.kv.key.startswith(key) if prefix else e.kv.key == key)]
        if not mine or self._error is not None:
            return
        if len(self._batches) >= FOLLOWED_BACKLOG:
            self.fail(WatchOverflow(f"watcher of {key!r} fell {FOLLOWED_BACKLOG} revisions behind"))
            return
        self._batches.append(mine)
        self._wake()

    def fail(self, error: StoreError) -> None:
        """Ends the watch with `error` once what it already has is handed out."""
        if self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __anext__(self) -> list[Event]:
        while not self._batches:
            if self._cancelled:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._batches.popleft()

    def cancel(self) -> None:
        self._cancelled = True
        self._store._followed_watchers.discard(self)
        self._wake()


class EtcdStore:
    """Store protocol on etcd. `url` is a client URL such as http://127.0.0.1:2379, or several members' URLs
    separated by commas: a member that cannot be reached is skipped for the next one (any member serves every
    request of an etcd cluster, linearizably).

    etcd forgets deletions once they are compacted and does not report them in a range, so this
    backend follows every change under its namespace with one watch and remembers deletions seen
    since it started: that is what makes a prefix's index include tombstones, as with SQLite."""

    def __init__(self, url: str, *, namespace: str = "shipyard/") -> None:
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        self.url = self.urls[0]
        self.namespace = namespace
        self._ns = namespace.encode()
        self._session: aiohttp.ClientSession | None = None  # watch streams
        # Unary calls: a lighter client than aiohttp's (a KV request through the Consul API is one or two of them,
        # and aiohttp's client cost about a third of the server's CPU per request).
        self._members = {u: EtcdHttp(u) for u in self.urls}
        # Group commit: txns (and point reads) that wait at the same time share one etcd txn (etcd_batch.py).
        # One txn on its way at a time for each: measured on the KV bench, two or four in flight made smaller batches
        # and cost etcd more CPU per write and per read, for no more throughput.
        self._writes = GroupCommit(self._send_txn)
        self._reads = GroupCommit(self._send_txn)
        self._revision = 0
        self._compact_revision = 0
        self._tombstones: SortedDict = SortedDict()
        # The latest version of each key this process saw (follow stream, own writes; None: deleted): a hint for
        # optimistic writers (see recent()), never an answer to a read.
        self._recent: dict[str, KeyValue | None] = {}
        self._recent_bytes = 0
        # Changes the follow stream saw, and who waits for one (blocking queries): a thousand blocking queries share
        # that one stream instead of opening a thousand etcd watches.
        self._events: deque[tuple[int, str]] = deque(maxlen=RECENT_EVENTS)
        self._events_from = 0  # every change after this revision is in _events
        self._following = False  # the follow stream is connected (else waiters watch etcd themselves)
        self._followed = 0  # the last revision the follow stream applied
        self._next_read: asyncio.Future[int] | None = None  # callers of revision_now() waiting for the next read
        self._reading = False
        self._reader: asyncio.Future[None] | None = None
        self._key_waiters: dict[str, list[tuple[int, asyncio.Future[bool]]]] = {}
        self._prefix_waiters: list[tuple[str, int, asyncio.Future[bool]]] = []
        self._follower: asyncio.Task[None] | None = None
        self._followed_watchers: set[FollowedWatcher] = set()

    @classmethod
    async def open(cls, url: str, *, namespace: str = "shipyard/") -> EtcdStore:
        store = cls(url, namespace=namespace)
        status = await store._call("/v3/maintenance/status", {})
        store._revision = int(status["header"].get("revision", 0))
        store._events_from = store._followed = store._revision
        ready = asyncio.Event()
        store._follower = asyncio.create_task(store._follow(ready), name="etcd-follow")
        await asyncio.wait_for(ready.wait(), 10)
        return store

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    def next_endpoint(self, failed: str) -> None:
        """After `failed` could not be reached: use the next member (once, however many requests saw it fail)."""
        if self.url == failed and len(self.urls) > 1:
            self.url = self.urls[(self.urls.index(failed) + 1) % len(self.urls)]
            log.warning("etcd member %s unreachable; using %s", failed, self.url)

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = orjson.dumps(body)
        # Only a request that never reached a member is sent again (to the next one): one that may have been
        # applied (a timeout after sending) is reported, never repeated.
        for _ in range(len(self.urls)):
            url = self.url
            try:
                status, answer = await self._members[url].post(path, raw)
                break
            except Unreachable as exc:
                self.next_endpoint(url)
                error = f"etcd at {url} unreachable: {exc}"
            except MaybeSent as exc:
                raise StoreError(f"etcd at {url} unreachable: {exc}", status=503) from None
        else:
            raise StoreError(error, status=503)
        try:
            data = orjson.loads(answer)
        except orjson.JSONDecodeError:
            raise StoreError(f"etcd at {url} answered {status} with no JSON: {answer[:200]!r}", status=503) from None
        if status != 200 or "error" in data:
            message = data.get("error") or data.get("message") or f"HTTP {status}"
            if "lease not found" in message:
                raise LeaseNotFound(int(body.get("ID", 0)))
            if "compacted" in message:
                raise Compacted(self._compact_revision)
            raise StoreError(f"etcd: {message}")
        header = data.get("header") or {}
        if "revision" in header:
            self._revision = max(self._revision, int(header["revision"]))
        return data

    async def _send_txn(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("/v3/kv/txn", body)

    # ---- encoding -----------------------------------------------------------------------------

    def _key_range(self, key: str, prefix: bool) -> dict[str, Any]:
        raw = self._ns + key.encode()
        request: dict[str, Any] = {"key": _b64(raw)}
        if prefix:
            request["range_end"] = _b64(prefix_range_end(raw))
        return request

    def _kv(self, raw: dict[str, Any]) -> KeyValue:
        key = a2b_base64(raw["key"])[len(self._ns) :].decode()  # = base64.b64decode, not strict, in half the time
        return KeyValue(
            key,
            a2b_base64(raw.get("value", "")),
            int(raw.get("create_revision", 0)),
            int(raw.get("mod_revision", 0)),
            int(raw.get("version", 0)),
            int(raw.get("lease", 0)),
        )

    def _event(self, raw: dict[str, Any]) -> Event:
        kind = EventType.DELETE if raw.get("type") == "DELETE" else EventType.PUT
        prev = raw.get("prev_kv")
        return Event(kind, self._kv(raw["kv"]), self._kv(prev) if prev else None)

    def _compare(self, cmp: Compare) -> dict[str, Any]:
        if cmp.target == "value" and cmp.value is None:
            # "value is absent" is "version is 0" in etcd's terms
            version_op = _ABSENT_VERSION_OPS.get(cmp.op)
            if version_op is None:
                raise StoreError("value compares with None support only = and !=", status=400)
            return self._compare(Compare(cmp.key, "version", version_op, 0))
        # The same refusal (400) as the embedded store's, instead of whatever etcd would make of the mismatch.
        if (cmp.target == "value") != isinstance(cmp.value, bytes) or (
                cmp.value is not None and not isinstance(cmp.value, bytes | int)):
            raise StoreError(f"cannot compare {cmp.target} of {cmp.key!r} with {cmp.value!r}", status=400)
        target, field = _TARGETS[cmp.target]
        value: Any = _b64(cmp.value) if isinstance(cmp.value, bytes) else str(cmp.value or 0)
        return {
            "key": _b64(self._ns + cmp.key.encode()),
            "target": target,
            "result": _RESULTS[cmp.op],
            field: value,
        }

    def _op(self, op: Op, *, prev: bool = True) -> dict[str, Any]:
        if isinstance(op, Put):
            put: dict[str, Any] = {"key": _b64(self._ns + op.key.encode()), "value": _b64(op.value)}
            if prev:
                put["prev_kv"] = True
            if op.lease:
                put["lease"] = str(op.lease)
            return {"request_put": put}
        if isinstance(op, Delete):
            return {"request_delete_range": {**self._key_range(op.key, op.prefix), "prev_kv": True}}
        assert isinstance(op, Get)
        return {"request_range": self._key_range(op.key, op.prefix)}

    # ---- protocol -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    async def get(self, key: str) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def range(self, key: str, *, prefix: bool = False) -> RangeResult:
        if prefix:
            data = await self._call("/v3/kv/range", self._key_range(key, prefix))
            found, revision = data.get("kvs", []), int(data["header"]["revision"])
        else:  # one of the point reads waiting together, all in one read-only txn
            answer = await self._reads.run(self._reads.member([], [{"request_range": self._key_range(key, False)}]))
            found, revision = answer.responses[0].get("response_range", {}).get("kvs", []), answer.revision
        kvs = [self._kv(raw) for raw in found]
        index = max((kv.mod_revision for kv in kvs), default=0)
        if prefix:
            # Walked to the first key outside the prefix, as etcd's range_end (the prefix with its last byte
            # incremented) bounds it: an upper bound of prefix + max-char would miss keys holding that character.
            for k in self._tombstones.irange(minimum=key):
                if not k.startswith(key):
                    break
                index = max(index, self._tombstones[k])
        elif not kvs:
            index = self._tombstones.get(key, 0)
        return RangeResult(kvs, revision, index)

    async def prefix_index(self, prefix: str) -> tuple[int, int]:
        """(range index of `prefix`, store revision): what range(prefix, prefix=True) reports, without the values:
        etcd sends only the key modified last (and the deletions remembered here count, as in range)."""
        request = {**self._key_range(prefix, True), "limit": "1", "sort_order": "DESCEND", "sort_target": "MOD",
                   "keys_only": True}
        data = await self._call("/v3/kv/range", request)
        index = max((int(raw.get("mod_revision", 0)) for raw in data.get("kvs", [])), default=0)
        for k in self._tombstones.irange(minimum=prefix):
            if not k.startswith(prefix):
                break
            index = max(index, self._tombstones[k])
        return index, int(data["header"]["revision"])

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return (await self.txn((), (Put(key, value, lease),))).revision

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        result = await self.txn((), (Delete(key, prefix),))
        deleted = result.responses[0]
        assert isinstance(deleted, list)
        return len(deleted), result.revision

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        require_bytes((*success, *failure))
        reads_only = not compares and not failure and all(isinstance(op, Get) for op in success)
        batcher = self._reads if reads_only else self._writes
        pinned = self._pinned(compares)
        member = batcher.member([self._compare(c) for c in compares],
                                [self._op(op, prev=op.key not in pinned) for op in success],
                                [self._op(op) for op in failure])
        return self._txn_result(await batcher.run(member), success, failure, pinned)

    def _pinned(self, compares: Sequence[Compare]) -> dict[str, KeyValue | None]:
        """The versions this txn's compares pin (absent, or a mod revision whose version this process has seen): if
        they hold, that is what a put of such a key replaces, so etcd need not read and send it (prev_kv cost it
        about a sixth of its CPU per Consul PUT). A (key, mod revision) names one version for good."""
        pinned: dict[str, KeyValue | None] = {}
        for cmp in compares:
            if cmp.op != "=" or cmp.target not in ("mod", "version", "create"):
                continue
            if cmp.value == 0:
                pinned[cmp.key] = None
            elif cmp.target == "mod" and (kv := self._recent.get(cmp.key)) is not None and kv.mod_revision == cmp.value:
                pinned[cmp.key] = kv
        return pinned

    def _txn_result(self, answer: Answer, success: Sequence[Op], failure: Sequence[Op],
                    pinned: dict[str, KeyValue | None]) -> TxnResult:
        succeeded, revision = answer.succeeded, answer.revision
        ops = success if succeeded else failure
        responses: list[object] = []
        for op, raw in zip(ops, answer.responses, strict=False):
            if "response_put" in raw:
                prev = raw["response_put"].get("prev_kv")
                before = pinned[op.key] if succeeded and op.key in pinned else self._kv(prev) if prev else None
                responses.append(before)
                if isinstance(op, Put):
                    self._remember(op.key, KeyValue(op.key, op.value, before.create_revision if before else revision,
                                                    revision, before.version + 1 if before else 1, op.lease), revision)
            elif "response_delete_range" in raw:
                deleted = [self._kv(kv) for kv in raw["response_delete_range"].get("prev_kvs", [])]
                for kv in deleted:
                    self._tombstones[kv.key] = revision
                    self._remember(kv.key, None, revision)
                responses.append(deleted)
            else:
                responses.append([self._kv(kv) for kv in raw.get("response_range", {}).get("kvs", [])])
        return TxnResult(succeeded, revision, responses)

    def watch(self, key: str, *, prefix: bool = False, from_revision: int = 0,
              prev_kv: bool = True) -> EtcdWatcher | FollowedWatcher:
        # Every change after self._followed is still to come through the follow stream (it hands a revision to the
        # followed watchers before it counts it as followed, with no await in between).
        if not prev_kv and self._following and from_revision > self._followed:
            watcher = FollowedWatcher(self, key, prefix, from_revision)
            self._followed_watchers.add(watcher)
            return watcher
        return EtcdWatcher(self, key, prefix, from_revision, prev_kv=prev_kv)

    async def _follow(self, ready: asyncio.Event) -> None:
        """Keeps the revision current and remembers deletions (see the class docstring)."""
        next_revision = self._revision + 1
        while True:
            # No previous values: this stream only tracks revisions and deletions, and etcd would read the previous
            # version of every key written (a second read per write) to send it.
            watcher = EtcdWatcher(self, "", True, next_revision, prev_kv=False)
            try:
                await watcher.start()
                ready.set()
                self._following = True
                async for batch in watcher:
                    for event in batch:
                        self._note_change(event)
                        self._seen(event.revision, event.kv.key)
                    for followed in list(self._followed_watchers):
                        followed.offer(batch)
                    next_revision = batch[-1].revision + 1
                    self._followed = max(self._followed, watcher.progress)
                    self._revision = max(self._revision, self._followed)
            except asyncio.CancelledError:
                watcher.cancel()
                raise
            except Compacted as exc:
                self._compact_revision = exc.compact_revision
                next_revision = exc.compact_revision + 1
                self._lost_events(exc.compact_revision)
            except Exception as exc:
                log.warning("etcd follow stream broke (%s); reconnecting", exc)
                self._following = False
                self._wake_all()  # they wait through etcd watches of their own until it is back
                await asyncio.sleep(0.5)
            finally:
                watcher.cancel()

    def recent(self, key: str) -> tuple[bool, KeyValue | None]:
        """(seen, the latest version of `key` this process has seen, None if deleted). It may be behind etcd:
        only for a txn that compares the mod revision it read (a stale hint fails the compare and the writer reads
        again), which saves that writer its read."""
        if key in self._recent:
            return True, self._recent[key]
        return False, None

    def _remember(self, key: str, kv: KeyValue | None, revision: int) -> None:
        if key in self._recent:
            known = self._recent[key]
            if revision <= (known.mod_revision if known is not None else 0):
                return  # never back to an older version (the follow stream lags behind this process's own txns)
            self._recent_bytes -= len(known.value) if known is not None else 0
        size = len(kv.value) if kv is not None else 0
        if len(self._recent) >= RECENT_MAX or self._recent_bytes + size > RECENT_BYTES:
            self._recent.clear()  # a bounded hint, not a mirror: forgetting costs a read, nothing else
            self._recent_bytes = 0
        self._recent[key] = kv
        self._recent_bytes += size

    async def wait_for_change(self, key: str, *, prefix: bool, after: int, timeout: float) -> bool | None:
        """Waits for a change of `key` (or under it) at a revision after `after`, as seen by the follow stream: True
        once there is one, False after `timeout`; None when this process cannot tell (`after` is older than the
        changes it remembers): the caller watches etcd instead."""
        if after < self._events_from or not self._following:
            return None
        for revision, changed in reversed(self._events):
            if revision <= after:
                break
            if changed == key or (prefix and changed.startswith(key)):
                return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if prefix:
            entry: tuple[str, int, asyncio.Future[bool]] = (key, after, future)
            self._prefix_waiters.append(entry)
        else:
            self._key_waiters.setdefault(key, []).append((after, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            if prefix:
                self._prefix_waiters.remove(entry)
            else:
                waiting = self._key_waiters.get(key, [])
                waiting[:] = [w for w in waiting if w[1] is not future]
                if not waiting:
                    self._key_waiters.pop(key, None)

    async def revision_now(self) -> int:
        """etcd's revision at some moment after this call (one key counted, not read). Callers that come while a
        read is on its way share the next one (a read that started before them could predate their request): a
        thousand blocking queries woken together cost two reads, not a thousand."""
        future = self._next_read
        if future is None:
            future = self._next_read = asyncio.get_running_loop().create_future()
            if not self._reading:
                self._reading = True  # from now: a caller after this one joins the queue, never a second reader
                self._reader = asyncio.ensure_future(self._read_revisions())
        return await asyncio.shield(future)

    async def _read_revisions(self) -> None:
        try:
            while self._next_read is not None:
                future, self._next_read = self._next_read, None
                try:
                    data = await self._call("/v3/kv/range", {"key": _b64(self._ns), "count_only": True})
                    future.set_result(int(data["header"]["revision"]))
                except Exception as exc:  # handed to every caller waiting for this read
                    future.set_exception(exc)
        finally:
            self._reading = False

    async def changes_known(self, prefix: str, after: int, *,
                            wait: float = 0.5) -> tuple[int, list[tuple[int, str]] | None]:
        """(etcd's revision now, changes_since(prefix, after) up to it once the follow stream has caught up with it,
        waiting up to `wait`; None instead when it cannot name them all: writes outside the namespace may hold the
        follow stream back, or `after` is older than what it remembers)."""
        target = await self.revision_now()  # so that a change made through another server is included
        deadline = asyncio.get_running_loop().time() + wait
        while self._followed < target and self._following and after >= self._events_from:
            if asyncio.get_running_loop().time() >= deadline:
                return target, None
            await asyncio.sleep(0.005)
        return target, self.changes_since(prefix, after, target)

    def changes_since(self, prefix: str, after: int, upto: int) -> list[tuple[int, str]] | None:
        """(revision, key) of every change under `prefix` after revision `after`, as the follow stream saw them, once
        it has seen revision `upto`; None when it cannot name them all (not following, not there yet, or `after` is
        older than the changes it remembers)."""
        if not self._following or after < self._events_from or self._followed < upto:
            return None
        out = []
        for revision, key in reversed(self._events):
            if revision <= after:
                break
            if key.startswith(prefix):
                out.append((revision, key))
        return out

    def _seen(self, revision: int, key: str) -> None:
        if len(self._events) == self._events.maxlen:
            self._events_from = self._events[0][0]  # about to be forgotten
        self._events.append((revision, key))
        for after, future in self._key_waiters.get(key, ()):
            if revision > after and not future.done():
                future.set_result(True)
        for prefix, after, future in self._prefix_waiters:
            if revision > after and key.startswith(prefix) and not future.done():
                future.set_result(True)

    def _lost_events(self, revision: int) -> None:
        """The follow stream skipped to `revision` (compaction): whoever waits is woken, to read again."""
        for followed in list(self._followed_watchers):
            followed.fail(Compacted(revision))
        self._events.clear()
        self._events_from = revision
        self._wake_all()

    def _wake_all(self) -> None:
        for waiting in self._key_waiters.values():
            for _, future in waiting:
                if not future.done():
                    future.set_result(True)
        for _, _, future in self._prefix_waiters:
            if not future.done():
                future.set_result(True)

    def _note_change(self, event: Event) -> None:
        self._remember(event.kv.key, event.kv if event.type == EventType.PUT else None, event.revision)
        # The follow stream may lag behind this process's own txn, which records its deletions at once: an older
        # put seen late must not erase a newer tombstone, or a prefix's index would go back and a blocking query
        # on it would miss the deletion.
        known = self._tombstones.get(event.kv.key)
        if known is not None and event.revision <= known:
            return
        if event.type == EventType.DELETE:
            self._tombstones[event.kv.key] = event.revision
        elif known is not None:
            del self._tombstones[event.kv.key]

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise StoreError("lease TTL must be positive", status=400)
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return Lease(int(data["ID"]), int(data["TTL"]))

    async def keepalive(self, lease: int) -> int:
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = int(data.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseNotFound(lease)
        return ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    async def compact(self, revision: int) -> None:
        await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        self._compact_revision = max(self._compact_revision, revision)
        for key in [k for k, rev in self._tombstones.items() if rev <= revision]:
            del self._tombstones[key]

    async def close(self) -> None:
        for followed in list(self._followed_watchers):
            followed.fail(StoreError("store closed", status=503))
        await cancel_and_wait(self._follower)
        await self._writes.close()
        await self._reads.close()
        for member in self._members.values():
            member.close()
        if self._session is not None:
            await self._session.close()
