"""Consul KV semantics over the store: entries, cas, locks, listings and multi-op transactions under `kv/`.

Every conditional write is one store txn guarded by compares on what it read; it never writes on a stale read.
"""

from __future__ import annotations

import base64
import builtins
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from shipyard.errors import BadRequest, PayloadTooLarge, ShipyardError
from shipyard.registry.sessions import SESSION_PREFIX, SessionRecord
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store
from shipyard.store.base import Op

KV_PREFIX = "kv/"
MAX_VALUE_SIZE = 512 * 1024  # Consul's default kv_max_value_size
MAX_TXN_OPS = 128
# Optimistic retries when a compare fails because something else wrote in between.
_MAX_ATTEMPTS = 64

# Stored value: magic/version, flags, lock index, behaviour of the holding session (0 none, 1 release,
# 2 delete), its lock delay in ms, then the session id and the raw value. Behaviour and lock delay
# travel with the lock so the key can be released correctly after the session record has vanished.
_HEADER = struct.Struct("!BQQBIB")
_MAGIC = 0xC1
_BEHAVIOURS = {"": 0, "release": 1, "delete": 2}
_BEHAVIOUR_NAMES = {v: k for k, v in _BEHAVIOURS.items()}

Verb = Literal[
    "set", "delete", "delete-tree", "delete-cas", "cas", "lock", "unlock",
    "get", "get-tree", "check-index", "check-session", "check-not-exists",
]
VERBS: frozenset[str] = frozenset(Verb.__args__)  # type: ignore[attr-defined]
WRITE_VERBS = frozenset({"set", "delete", "delete-tree", "delete-cas", "cas", "lock", "unlock"})


class InvalidSession(ShipyardError):
    """A lock named a session that does not exist; Consul answers this with a 500."""

    status = 500


def store_key(key: str) -> str:
    return KV_PREFIX + key


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Rejects keys that could escape their place: `..` segments, NUL bytes, empty names."""
    if not key and not allow_empty:
        raise BadRequest("Missing key name")
    if "\x00" in key:
        raise BadRequest("Invalid key: key contains a NUL byte")
    if ".." in key and ".." in key.split("/"):
        raise BadRequest('Invalid key: key contains a ".." path segment')
    if not key.isascii() and any(0xD800 <= ord(ch) <= 0xDFFF for ch in key):  # ASCII: none, at C speed
        raise BadRequest("Invalid key escape: key is not valid UTF-8")
    return key


def value_too_large_message(size: int) -> str:
    """Consul's wording for a KV body over kv_max_value_size."""
    return (
        f"Request body({size} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. "
        "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
    )


def validate_value(key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE_SIZE:
        raise PayloadTooLarge(value_too_large_message(len(value)))


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A Consul DirEntry. create_index/modify_index of 0 mean "written by the txn being built"."""

    key: str
    value: bytes
    flags: int = 0
    session: str = ""
    lock_index: int = 0
    create_index: int = 0
    modify_index: int = 0
    behavior: str = ""
    lock_delay_ms: int = 0

    def to_json(self, *, with_value: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            # Consul stores an empty body as nil, which JSON renders as null.
            "Value": base64.b64encode(self.value).decode() if (with_value and self.value) else None,
        }
        if self.session:
            out["Session"] = self.session
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def same_content(self, other: KVEntry) -> bool:
        return (
            self.value == other.value
            and self.flags == other.flags
            and self.session == other.session
            and self.lock_index == other.lock_index
        )


def encode_entry(entry: KVEntry) -> bytes:
    session = entry.session.encode()
    header = _HEADER.pack(
        _MAGIC, entry.flags, entry.lock_index, _BEHAVIOURS.get(entry.behavior, 0),
        min(entry.lock_delay_ms, 0xFFFFFFFF), len(session),
    )
    return header + session + entry.value


def decode_entry(kv: KeyValue) -> KVEntry:
    key = kv.key[len(KV_PREFIX):]
    raw = kv.value
    if len(raw) >= _HEADER.size and raw[0] == _MAGIC:
        _, flags, lock_index, behaviour, delay_ms, slen = _HEADER.unpack_from(raw)
        start = _HEADER.size
        if len(raw) >= start + slen:
            return KVEntry(
                key,
                raw[start + slen:],
                flags,
                raw[start:start + slen].decode(errors="replace"),
                lock_index,
                kv.create_revision,
                kv.mod_revision,
                _BEHAVIOUR_NAMES.get(behaviour, "release"),
                delay_ms,
            )
    # Written by something other than this module: show it as a plain value.
    return KVEntry(key, raw, create_index=kv.create_revision, modify_index=kv.mod_revision)


def _set_value(kv: KeyValue | None, key: str, value: bytes, flags: int) -> bytes | None:
    """What a plain set stores over `kv`: the new value and flags, the lock (session, LockIndex, behaviour, delay)
    kept, as Consul does; None when that is what is stored already (Consul then skips the write, and the ModifyIndex
    stays). The same entry as ConsulKV._set's."""
    if kv is None:
        return encode_entry(KVEntry(key, value, flags))
    existing = decode_entry(kv)
    if existing.value == value and existing.flags == flags:
        return None
    return encode_entry(KVEntry(key, value, flags, existing.session, existing.lock_index,
                                behavior=existing.behavior, lock_delay_ms=existing.lock_delay_ms))


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One Consul txn KV operation, already validated for types."""

    verb: str
    key: str
    value: bytes = b""
    flags: int = 0
    index: int = 0
    session: str = ""


@dataclass(slots=True)
class TxnOutcome:
    """Either results (entries, in op order) or errors as (op index, what)."""

    results: list[KVEntry] | None
    errors: list[tuple[int, str]] | None
    revision: int


class _OpFailed(Exception):
    pass


def _index_matches(entry: KVEntry, index: int) -> bool:
    """An entry written earlier in the same txn gets the commit's revision, unknown while playing:
    no client-supplied index can be known to match it, so index checks against it fail."""
    return entry.modify_index != 0 and entry.modify_index == index


class _Simulation:
    """Plays a Consul txn against what the store holds, recording what it read so the write can be guarded."""

    def __init__(self, store: Store, *, optimistic: bool = False) -> None:
        self.store = store
        # First attempt: a key's version may come from the store's hint of what it last saw (etcd: no read, one round
        # trip less); the commit compares its mod revision, so a stale hint only fails it and the retry reads.
        self.hints = getattr(store, "recent", None) if optimistic else None
        self.base_mods: dict[str, int] = {}  # store key -> mod_revision seen (0: absent)
        self.current: dict[str, KVEntry | None] = {}  # consul key -> state after the ops so far
        self.deleted_prefixes: list[str] = []
        self.ops: list[Op] = []
        self.sessions: dict[str, SessionRecord | None] = {}
        # per Consul op: how to build its results once the commit revision is known
        self.plans: list[tuple[str, Any]] = []

    async def entry(self, key: str) -> KVEntry | None:
        if key in self.current:
            return self.current[key]
        if any(key.startswith(p) for p in self.deleted_prefixes):
            return None
        skey = store_key(key)
        seen, kv = self.hints(skey) if self.hints is not None else (False, None)
        if not seen:
            kv = await self.store.get(skey)
        self.base_mods[skey] = kv.mod_revision if kv else 0
        entry = decode_entry(kv) if kv else None
        self.current[key] = entry
        return entry

    async def session(self, session_id: str) -> SessionRecord | None:
        if session_id in self.sessions:
            return self.sessions[session_id]
        skey = SESSION_PREFIX + session_id
        kv = await self.store.get(skey)
        self.base_mods[skey] = kv.mod_revision if kv else 0
        record = SessionRecord.decode(kv) if kv else None
        self.sessions[session_id] = record
        return record

    def write(self, entry: KVEntry) -> KVEntry:
        self.current[entry.key] = entry
        self.ops.append(Put(store_key(entry.key), encode_entry(entry)))
        return entry

    def delete(self, key: str) -> None:
        self.current[key] = None
        self.ops.append(Delete(store_key(key)))

    def compares(self) -> list[Compare]:
        return [Compare(k, "mod", "=", mod) for k, mod in self.base_mods.items()]


class ConsulKV:
    """Consul's KV store: reads, conditional writes, locks and transactions over `kv/` in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # key -> monotonic time until which acquires are refused after its holder was invalidated.
        # In memory only, as in Consul: a restart forgets lock delays.
        self._lock_delays: dict[str, float] = {}

    # ---- reads --------------------------------------------------------------------------------

    async def get(self, key: str) -> tuple[KVEntry | None, int, int]:
        """(entry or None, Consul index, store revision read at)."""
        res = await self.store.range(store_key(key))
        entry = decode_entry(res.kvs[0]) if res.kvs else None
        return entry, res.index, res.revision

    async def list(self, prefix: str) -> tuple[list[KVEntry], int, int]:
        res = await self.store.range(store_key(prefix), prefix=True)
        return [decode_entry(kv) for kv in res.kvs], res.index, res.revision

    # Below list(), `list` in this class's annotations is that method: the type is spelt builtins.list.
    async def keys(self, prefix: str, separator: str = "") -> tuple[builtins.list[str], int, int]:
        res = await self.store.range(store_key(prefix), prefix=True)
        out: list[str] = []
        for kv in res.kvs:
            key = kv.key[len(KV_PREFIX):]
            if separator:
                cut = key.find(separator, len(prefix))
                if cut >= 0:
                    key = key[: cut + len(separator)]
            if not out or out[-1] != key:
                out.append(key)
        return out, res.index, res.revision

    # ---- single-key writes (Consul's KVS.Apply) --------------------------------------------------

    async def put(
        self, key: str, value: bytes, *, flags: int = 0, cas: int | None = None,
        acquire: str | None = None, release: str | None = None,
    ) -> bool:
        """PUT /v1/kv/<key>: set, cas, lock or unlock. Returns whether it applied."""
        validate_key(key)
        validate_value(key, value)
        if acquire is not None:
            if not acquire:
                raise InvalidSession("missing session")
            if self.lock_delay_remaining(key) > 0:
                return False
            op = TxnOp("lock", key, value, flags, session=acquire)
        elif release is not None:
            if not release:
                raise InvalidSession("missing session")
            op = TxnOp("unlock", key, value, flags, session=release)
        elif cas is not None:
            op = TxnOp("cas", key, value, flags, index=cas)
        else:
            await self._set_plain(key, value, flags)
            return True
        outcome = await self.transact([op])
        if outcome.errors:
            what = outcome.errors[0][1]
            if what.startswith("invalid session") or what == "missing session":
                raise InvalidSession(what)
            return False
        return True

    async def _set_plain(self, key: str, value: bytes, flags: int) -> None:
        """PUT without cas, acquire or release, the most common write: what transact([set]) does (one read, one
        write guarded on the version read, again on a conflict), without the general play of a Consul txn, which
        cost about a sixth of the server's CPU per such PUT."""
        skey = store_key(key)
        hints = getattr(self.store, "recent", None)  # as _Simulation's optimistic first attempt
        for attempt in range(_MAX_ATTEMPTS):
            seen, kv = hints(skey) if hints is not None and attempt == 0 else (False, None)
            if not seen:
                kv = await self.store.get(skey)
            stored = _set_value(kv, key, value, flags)
            guard = [Compare(skey, "mod", "=", kv.mod_revision if kv is not None else 0)]
            if (await self.store.txn(guard, [Put(skey, stored)] if stored is not None else [])).succeeded:
                return
        raise ShipyardError("transaction kept conflicting with concurrent writes; retry", status=500)

    async def delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        validate_key(key, allow_empty=recurse)
        if recurse:
            await self.store.delete(store_key(key), prefix=True)
            return True
        if cas is None:
            await self.store.delete(store_key(key))
            return True
        outcome = await self.transact([TxnOp("delete-cas", key, index=cas)])
        return not outcome.errors

    # ---- lock delay -------------------------------------------------------------------------------

    def lock_delay_remaining(self, key: str) -> float:
        until = self._lock_delays.get(key)
        if until is None:
            return 0.0
        remaining = until - time.monotonic()
        if remaining <= 0:
            self._lock_delays.pop(key, None)
            return 0.0
        return remaining

    def start_lock_delay(self, key: str, seconds: float) -> None:
        """After a holder's session is invalidated, other sessions may not take the key for `seconds`."""
        if seconds <= 0:
            return
        until = time.monotonic() + seconds
        if until > self._lock_delays.get(key, 0.0):
            self._lock_delays[key] = until
        if len(self._lock_delays) > 10_000:
            now = time.monotonic()
            for k in [k for k, t in self._lock_delays.items() if t <= now]:
                del self._lock_delays[k]

    # ---- transactions -------------------------------------------------------------------------

    async def transact(self, ops: Sequence[TxnOp]) -> TxnOutcome:
        """Applies Consul txn ops all-or-nothing through ONE store txn.

        The ops are first played against the current state (reads are in memory); the resulting
        writes are then committed guarded by compares on every key and session that play read. If
        anything changed in between, the play is repeated on the new state. Prefix verbs
        (delete-tree, get-tree) act at commit time on whatever is under the prefix then."""
        if len(ops) > MAX_TXN_OPS:
            raise PayloadTooLarge(f"Transaction contains too many operations ({len(ops)} > {MAX_TXN_OPS})")
        for attempt in range(_MAX_ATTEMPTS):
            sim = _Simulation(self.store, optimistic=attempt == 0)
            errors: list[tuple[int, str]] = []
            for i, op in enumerate(ops):
                try:
                    await self._play(sim, op)
                except _OpFailed as exc:
                    errors.append((i, str(exc)))
                    sim.plans.append(("none", None))
            compares = sim.compares()
            if errors:
                # Confirm the failure was real on one consistent state before reporting it.
                check = await self.store.txn(compares, ())
                if check.succeeded:
                    return TxnOutcome(None, errors, check.revision)
                continue
            result = await self.store.txn(compares, sim.ops)
            if not result.succeeded:
                continue
            return TxnOutcome(self._results(sim, result.responses, result.revision), None, result.revision)
        raise ShipyardError("transaction kept conflicting with concurrent writes; retry", status=500)

    def _results(self, sim: _Simulation, responses: builtins.list[object],
                 revision: int) -> builtins.list[KVEntry]:
        out: list[KVEntry] = []
        for kind, payload in sim.plans:
            if kind == "entry":
                entry, with_value = payload
                entry = replace(
                    entry,
                    create_index=entry.create_index or revision,
                    modify_index=entry.modify_index or revision,
                )
                out.append(entry if with_value else replace(entry, value=b""))
            elif kind == "tree":
                kvs = responses[payload]
                assert isinstance(kvs, list)
                out.extend(decode_entry(kv) for kv in kvs)
        return out

    async def _play(self, sim: _Simulation, op: TxnOp) -> None:
        verb, key = op.verb, op.key
        if verb not in VERBS:
            raise _OpFailed(f'unknown KV verb "{verb}"')
        plan: tuple[str, Any] = ("none", None)
        if verb == "set":
            existing = await sim.entry(key)
            plan = ("entry", (self._set(sim, existing, op), False))
        elif verb == "cas":
            existing = await sim.entry(key)
            if (op.index == 0 and existing is not None) or (
                op.index != 0 and (existing is None or not _index_matches(existing, op.index))
            ):
                raise _OpFailed(f'failed to set key "{key}", index is stale')
            plan = ("entry", (self._set(sim, existing, op), False))
        elif verb == "delete":
            if await sim.entry(key) is not None:
                sim.delete(key)
        elif verb == "delete-cas":
            existing = await sim.entry(key)
            if existing is not None:
                if not _index_matches(existing, op.index):
                    raise _OpFailed(f'failed to delete key "{key}", index is stale')
                sim.delete(key)
        elif verb == "delete-tree":
            for k in [k for k, e in sim.current.items() if e is not None and k.startswith(key)]:
                sim.current[k] = None
            sim.deleted_prefixes.append(key)
            sim.ops.append(Delete(store_key(key), prefix=True))
        elif verb == "lock":
            plan = ("entry", (await self._lock(sim, op), False))
        elif verb == "unlock":
            if not op.session:
                raise _OpFailed("missing session")
            existing = await sim.entry(key)
            if existing is None or existing.session != op.session:
                raise _OpFailed(f'failed to unlock key "{key}", lock isn\'t held, or is held by another session')
            entry = sim.write(
                KVEntry(key, op.value, op.flags, "", existing.lock_index, existing.create_index, 0)
            )
            plan = ("entry", (entry, False))
        elif verb == "get":
            existing = await sim.entry(key)
            if existing is None:
                raise _OpFailed(f'key "{key}" doesn\'t exist')
            plan = ("entry", (existing, True))
        elif verb == "get-tree":
            sim.ops.append(Get(store_key(key), prefix=True))
            plan = ("tree", len(sim.ops) - 1)
        elif verb == "check-index":
            existing = await sim.entry(key)
            if existing is None:
                raise _OpFailed(f'failed to check index, key "{key}" doesn\'t exist')
            if not _index_matches(existing, op.index):
                raise _OpFailed(
                    f'failed index check for key "{key}", current modify index '
                    f"{existing.modify_index or 'of this transaction'} != {op.index}"
                )
            plan = ("entry", (existing, False))
        elif verb == "check-session":
            existing = await sim.entry(key)
            if existing is None:
                raise _OpFailed(f'failed to check session, key "{key}" doesn\'t exist')
            if existing.session != op.session:
                raise _OpFailed(
                    f'failed session check for key "{key}", current session "{existing.session}" != "{op.session}"'
                )
            plan = ("entry", (existing, False))
        elif verb == "check-not-exists" and await sim.entry(key) is not None:
            raise _OpFailed(f'key "{key}" exists')
        sim.plans.append(plan)

    @staticmethod
    def _set(sim: _Simulation, existing: KVEntry | None, op: TxnOp) -> KVEntry:
        # A plain set keeps whoever holds the lock, as Consul does.
        if existing is None:
            return sim.write(KVEntry(op.key, op.value, op.flags))
        entry = replace(existing, value=op.value, flags=op.flags)
        if entry.same_content(existing):
            return existing  # unchanged: Consul skips the write and keeps the ModifyIndex
        return sim.write(replace(entry, modify_index=0))

    @staticmethod
    async def _lock(sim: _Simulation, op: TxnOp) -> KVEntry:
        if not op.session:
            raise _OpFailed("missing session")
        record = await sim.session(op.session)
        if record is None:
            raise _OpFailed(f'invalid session "{op.session}"')
        existing = await sim.entry(op.key)
        if existing is None:
            lock_index, create_index = 1, 0
        elif existing.session == op.session:
            lock_index, create_index = existing.lock_index, existing.create_index
        elif existing.session:
            raise _OpFailed(f'failed to lock key "{op.key}", lock is already held')
        else:
            lock_index, create_index = existing.lock_index + 1, existing.create_index
        return sim.write(
            KVEntry(
                op.key, op.value, op.flags, op.session, lock_index, create_index, 0,
                record.behavior, int(record.lock_delay * 1000),
            )
        )

    # ---- used by the session manager ------------------------------------------------------------

    async def release_held(self, key: str, session_id: str) -> bool:
        """Lets go of `key` if `session_id` still holds it, per the behaviour recorded at acquire time.

        Returns False when the key changed under us (the caller reconciles again)."""
        kv = await self.store.get(store_key(key))
        if kv is None:
            return True
        entry = decode_entry(kv)
        if entry.session != session_id:
            return True
        guard = [Compare(kv.key, "mod", "=", kv.mod_revision)]
        ops: list[Op] = [self.release_op(entry)]
        result = await self.store.txn(guard, ops)
        if result.succeeded:
            self.start_lock_delay(key, entry.lock_delay_ms / 1000)
        return result.succeeded

    @staticmethod
    def release_op(entry: KVEntry) -> Op:
        """The store op that ends `entry`'s lock: clear the session (keeping LockIndex) or delete the key."""
        if entry.behavior == "delete":
            return Delete(store_key(entry.key))
        released = replace(entry, session="", behavior="", lock_delay_ms=0)
        return Put(store_key(entry.key), encode_entry(released))
