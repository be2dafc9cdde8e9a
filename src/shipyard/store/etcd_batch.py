"""Group commit for the etcd store: txns that wait at the same time, on disjoint keys, go to etcd as ONE txn (one
gateway call, one raft entry, one fsync), and concurrent point reads as one read-only (linearizable) txn.

It owns batching only. It never sends a request that may have been applied a second time, never reports one
member failed because another's compare failed, and never applies a member whose compare failed.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shipyard.store.base import LeaseNotFound, StoreError
from shipyard.tasks import cancel_all_and_wait

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: compares, success ops and failure ops each
MAX_BATCH_BYTES = 1 << 20  # under etcd's default --max-request-bytes (1.5 MiB), JSON and base64 included
_OP_OVERHEAD = 96  # JSON field names and framing of one op or compare, in bytes
# etcd refusals that are certain to have applied nothing, decided for the batch as a whole: its members are then sent
# one by one, and each gets its own answer (a lease not found is checked before a txn applies anything).
_REFUSED_WHOLE = ("duplicate key given in txn request", "too many operations in txn request",
                  "request is too large", "larger than max", "key is not provided")
_FIELDS = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision", "LEASE": "lease"}


class Answer(NamedTuple):
    """One member's share of etcd's answer: as if its txn had been sent alone."""

    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]


Send = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(slots=True, eq=False)
class Member:
    """One caller's txn, encoded for etcd, with the keys it reads (compares, point ranges) and writes."""

    compare: list[dict[str, Any]]
    success: list[dict[str, Any]]
    failure: list[dict[str, Any]] = field(default_factory=list)
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)
    size: int = 0
    alone: bool = False  # never combined: a key range, a key written twice, or too large for a batch
    future: asyncio.Future[Answer] | None = None

    @classmethod
    def of(cls, compare: list[dict[str, Any]], success: list[dict[str, Any]],
           failure: list[dict[str, Any]] | None = None, *, max_ops: int = MAX_TXN_OPS,
           max_bytes: int = MAX_BATCH_BYTES) -> Member:
        member = cls(compare, success, failure or [])
        for cmp in compare:
            member.reads.add(cmp["key"])
            member.size += len(cmp["key"]) + len(cmp.get("value", "")) + _OP_OVERHEAD
        writes = 0
        for op in success:
            member.size += member._footprint(op)
            writes += "request_range" not in op
        member.alone = (member.alone or len(member.writes) < writes or member.size > max_bytes
                        or max(len(compare), len(success)) > max_ops)
        return member

    def _footprint(self, op: dict[str, Any]) -> int:
        """Records the key `op` touches; returns its size. A key range is not tracked: its txn goes alone."""
        kind, request = next(iter(op.items()))
        self.alone = self.alone or "range_end" in request
        (self.reads if kind == "request_range" else self.writes).add(request["key"])
        return len(request["key"]) + len(request.get("value", "")) + _OP_OVERHEAD

    def body(self) -> dict[str, Any]:
        return {"compare": self.compare, "success": self.success, "failure": self.failure}

    def settle(self, answer: Answer | BaseException) -> None:
        assert self.future is not None
        if self.future.done():
            return  # its caller gave up (cancelled) while it was on its way: the outcome is nobody's now
        if isinstance(answer, BaseException):
            self.future.set_exception(answer)
        else:
            self.future.set_result(answer)


def _conflicts(member: Member, reads: set[str], writes: set[str]) -> bool:
    """Whether `member` touches a key the batch writes, or writes one it reads: then the order of the two would
    matter, and one etcd txn (every compare before every op) could not stand for both in some order."""
    return not (member.writes.isdisjoint(writes) and member.writes.isdisjoint(reads)
                and member.reads.isdisjoint(writes))


def holds(cmp: dict[str, Any], kv: dict[str, Any] | None) -> bool:
    """etcd's own evaluation of one encoded compare on a key's current version (None: absent): a value compare on
    an absent key fails, any other target of an absent key is 0."""
    if cmp["target"] == "VALUE":
        if kv is None:
            return False
        actual: Any = base64.b64decode(kv.get("value", ""))
        wanted: Any = base64.b64decode(cmp.get("value", ""))
    else:
        name = _FIELDS[cmp["target"]]
        actual, wanted = int((kv or {}).get(name, 0)), int(cmp.get(name, 0))
    result = cmp.get("result", "EQUAL")
    if result == "EQUAL":
        return bool(actual == wanted)
    if result == "NOT_EQUAL":
        return bool(actual != wanted)
    return bool(actual < wanted) if result == "LESS" else bool(actual > wanted)


class GroupCommit:
    """Sends members through `send` (one etcd /v3/kv/txn call): alone when nothing else waits, else as many
    waiting, disjoint ones as fit in one txn. Up to `max_inflight` txns are on their way at once: callers who come
    while they are join the next batch, so an idle store adds no delay and a busy one sends fewer, larger txns."""

    def __init__(self, send: Send, *, max_inflight: int = 1, max_ops: int = MAX_TXN_OPS,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        self._send = send
        self.max_inflight = max_inflight
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._queue: deque[Member] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches = 0  # txns sent for more than one member (what tests and benchmarks look at)

    def member(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
               failure: list[dict[str, Any]] | None = None) -> Member:
        return Member.of(compare, success, failure, max_ops=self.max_ops, max_bytes=self.max_bytes)

    async def run(self, member: Member) -> Answer:
        if member.alone:
            return _answer(await self._send(member.body()))
        member.future = asyncio.get_running_loop().create_future()
        self._queue.append(member)
        if self._inflight < self.max_inflight:
            self._inflight += 1
            self._spawn(self._drain())
        return await member.future

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        batch: list[Member] = []
        try:
            while self._queue:
                batch = self._take()
                try:
                    if len(batch) == 1:
                        await self._alone(batch[0])
                    elif batch:
                        await self._commit(batch)
                except Exception as exc:  # whatever went wrong reaches every caller: none is left waiting
                    for member in batch:
                        member.settle(exc)
        except asyncio.CancelledError:
            for member in batch:
                member.settle(_closed())
            raise
        finally:
            self._inflight -= 1

    def _take(self) -> list[Member]:
        """The members that go next: the oldest waiting one, then every later one that fits beside it (members
        left out keep their order)."""
        batch: list[Member] = []
        reads: set[str] = set()
        writes: set[str] = set()
        compares = ops = size = 0
        left: deque[Member] = deque()
        while self._queue:
            member = self._queue.popleft()
            assert member.future is not None
            if member.future.done():
                continue  # its caller gave up before it was sent: nothing of it is sent
            if batch and (compares + len(member.compare) > self.max_ops or ops + len(member.success) > self.max_ops
                          or size + member.size > self.max_bytes or _conflicts(member, reads, writes)):
                left.append(member)
                continue
            batch.append(member)
            reads |= member.reads
            writes |= member.writes
            compares, ops, size = compares + len(member.compare), ops + len(member.success), size + member.size
        self._queue = left
        return batch

    async def _alone(self, member: Member) -> None:
        try:
            member.settle(_answer(await self._send(member.body())))
        except asyncio.CancelledError:
            member.settle(_closed())
            raise
        except Exception as exc:  # exactly what a caller of a txn sent alone gets
            member.settle(exc)

    async def _commit(self, batch: list[Member]) -> None:
        compared: dict[str, bool] = {}  # key -> whether a compare on it needs its value
        for member in batch:
            for cmp in member.compare:
                compared[cmp["key"]] = compared.get(cmp["key"], False) or cmp["target"] == "VALUE"
        body = {
            "compare": [cmp for member in batch for cmp in member.compare],
            "success": [op for member in batch for op in member.success],
            # If the batch's compares fail: the compared keys as they are then, to tell whose compare failed.
            "failure": [{"request_range": {"key": key, **({} if value else {"keys_only": True})}}
                        for key, value in compared.items()],
        }
        try:
            data = await self._send(body)
        except StoreError as exc:
            if isinstance(exc, LeaseNotFound) or any(reason in str(exc) for reason in _REFUSED_WHOLE):
                for member in batch:  # nothing was applied: each member on its own, with its own answer
                    self._spawn(self._alone(member))
            else:  # the outcome is unknown (or an error of the whole txn): every member hears it, none is resent
                for member in batch:
                    member.settle(exc)
            return
        self.batches += 1
        answer = _answer(data)
        if answer.succeeded:
            start = 0
            for member in batch:
                member.settle(Answer(True, answer.revision, answer.responses[start:start + len(member.success)]))
                start += len(member.success)
            return
        self._split_failed(batch, answer)

    def _split_failed(self, batch: list[Member], answer: Answer) -> None:
        """The batch's compares failed: etcd applied nothing. Members whose compares failed on the state it read
        are sent alone (their own txn says failed, and runs their failure ops); the others wait for the next batch."""
        kvs = {kv["key"]: kv for response in answer.responses
               for kv in response.get("response_range", {}).get("kvs", [])}
        failed = [m for m in batch if not all(holds(cmp, kvs.get(cmp["key"])) for cmp in m.compare)]
        if not failed:
            failed = batch  # cannot be (some compare failed); were it so, each member alone is still right
        for member in failed:
            self._spawn(self._alone(member))
        self._queue.extendleft(reversed([m for m in batch if m not in failed]))  # the running _drain takes them

    async def close(self) -> None:
        """Stops sending; whoever still waits is told the store closed (a batch on its way may have applied)."""
        await cancel_all_and_wait(list(self._tasks))
        for member in self._queue:
            member.settle(StoreError("store closed", status=503))
        self._queue.clear()


def _closed() -> StoreError:
    return StoreError("store closed before etcd answered: the txn may have been applied", status=503)


def _answer(data: dict[str, Any]) -> Answer:
    return Answer(bool(data.get("succeeded", False)), int(data["header"]["revision"]), data.get("responses", []))
