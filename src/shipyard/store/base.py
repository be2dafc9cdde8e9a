"""The store contract: a revisioned key/value store with etcd v3's data model.

Owns the types and the protocol every backend implements; holds no state and does no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shipyard.errors import ShipyardError


class StoreError(ShipyardError):
    """The store could not do what was asked (I/O failure, closed store)."""

    status = 500


class Compacted(StoreError):
    """A watch asked for revisions that compaction has already removed (etcd's ErrCompacted)."""

    status = 410

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"required revision has been compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class LeaseNotFound(StoreError):
    status = 404

    def __init__(self, lease: int) -> None:
        super().__init__(f"lease {lease} not found")
        self.lease = lease


class WatchOverflow(StoreError):
    """The watcher fell too far behind; re-watch from its last seen revision + 1."""

    status = 503


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(enum.IntEnum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For DELETE, `kv` holds the key, an empty value and mod_revision = the delete's revision."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class RangeResult:
    """What a read saw: the entries, the store revision it read at, and the Consul-style index.

    `index` is the highest mod_revision among the entries and among deletions (tombstones) still
    remembered under the same key or prefix, so a blocking reader wakes for removals too.
    """

    kvs: list[KeyValue]
    revision: int
    index: int


CompareTarget = Literal["version", "create", "mod", "value", "lease"]
CompareOp = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn guard on one key. A missing key has version/create/mod/lease 0 and value None."""

    key: str
    target: CompareTarget
    op: CompareOp
    value: int | bytes | None


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


def require_bytes(ops: Sequence[object]) -> None:
    """Every backend refuses (400) a put whose value is not bytes, before anything is sent or written."""
    for op in ops:
        if isinstance(op, Put) and not isinstance(op.value, bytes):
            raise StoreError(f"value of {op.key!r} must be bytes, not {type(op.value).__name__}", status=400)


@dataclass(slots=True)
class TxnResult:
    """`responses[i]` answers the i-th op of the branch taken:
    Get -> list[KeyValue]; Put -> previous KeyValue or None; Delete -> list of deleted KeyValues."""

    succeeded: bool
    revision: int
    responses: list[object] = field(default_factory=list)

    def ranges(self) -> list[list[KeyValue]]:
        """The responses of a branch of Gets only, typed: one list of KeyValues per Get, in order."""
        out: list[list[KeyValue]] = []
        for response in self.responses:
            if not isinstance(response, list):
                raise TypeError(f"ranges() is for a branch of Gets only, got {type(response).__name__}")
            out.append(response)
        return out


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


class Watcher(Protocol):
    """An async iterator of event batches (each batch: the events of one revision, in order)."""

    def __aiter__(self) -> AsyncIterator[list[Event]]: ...

    async def __anext__(self) -> list[Event]: ...

    def cancel(self) -> None: ...


class Store(Protocol):
    """The operations every backend offers. Writes return only once durable."""

    @property
    def revision(self) -> int: ...

    @property
    def compact_revision(self) -> int: ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, key: str, *, prefix: bool = False) -> RangeResult: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Returns the revision of the write."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        """Returns (number deleted, revision). Deleting nothing leaves the revision unchanged."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...

    def watch(self, key: str, *, prefix: bool = False, from_revision: int = 0, prev_kv: bool = True) -> Watcher:
        """Every change to key (or under prefix) with revision >= from_revision (0: from now on).

        prev_kv=False: the caller never looks at Event.prev_kv, which a backend may then leave None (etcd reads and
        sends no previous version: about a third of its CPU per write seen by such a watch).
        Raises Compacted when from_revision is at or below the compact revision."""
        ...

    async def grant_lease(self, ttl: int) -> Lease: ...

    async def keepalive(self, lease: int) -> int:
        """Resets the lease's timer; returns its TTL. Raises LeaseNotFound."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...

    async def compact(self, revision: int) -> None: ...

    async def close(self) -> None: ...
