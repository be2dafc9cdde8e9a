"""Consul sessions under `sessions/`: create, renew (store leases), destroy, and invalidation that frees held locks.

A level-triggered loop releases or deletes every key whose session is gone; it never edits the catalog.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from shipyard.errors import BadRequest, ShipyardError
from shipyard.store import Compare, Delete, KeyValue, LeaseNotFound, Put, follow_prefix
from shipyard.store.base import Event, EventType, Op
from shipyard.tasks import cancel_all_and_wait

if TYPE_CHECKING:
    from shipyard.registry.kv import ConsulKV
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

log = logging.getLogger(__name__)

SESSION_PREFIX = "sessions/"
NODES_PREFIX = "catalog/nodes/"
CHECKS_PREFIX = "catalog/checks/"
SERF_CHECK = "serfHealth"
TTL_MIN = 10.0
TTL_MAX = 86400.0
MAX_LOCK_DELAY = 60.0  # Consul's structs.MaxLockDelay
DEFAULT_LOCK_DELAY = 15.0
_RESYNC_SECONDS = 30.0
_MAX_ATTEMPTS = 32


def session_key(session_id: str) -> str:
    return SESSION_PREFIX + session_id


def node_key(node: str) -> str:
    return NODES_PREFIX + quote(node, safe="")


def check_key(node: str, check_id: str) -> str:
    return f"{CHECKS_PREFIX}{quote(node, safe='')}/{quote(check_id, safe='')}"


class SessionError(ShipyardError):
    """What Consul reports from its state store (missing node, missing/critical check): a 500."""

    status = 500


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    node: str
    name: str = ""
    lock_delay: float = DEFAULT_LOCK_DELAY  # seconds
    behavior: str = "release"
    ttl: str = ""
    node_checks: list[str] = field(default_factory=list)
    service_checks: list[dict[str, str]] = field(default_factory=list)
    create_index: int = 0
    modify_index: int = 0
    lease: int = 0

    @property
    def check_ids(self) -> list[str]:
        ids = list(self.node_checks)
        ids += [c["ID"] for c in self.service_checks if c["ID"] not in ids]
        return ids

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "ID": self.id, "Name": self.name, "Node": self.node,
                "LockDelay": round(self.lock_delay * 1e9), "Behavior": self.behavior, "TTL": self.ttl,
                "NodeChecks": self.node_checks, "ServiceChecks": self.service_checks,
            }
        )

    @classmethod
    def decode(cls, kv: KeyValue) -> SessionRecord:
        data = orjson.loads(kv.value)
        return cls(
            data["ID"], data["Node"], data.get("Name", ""), data.get("LockDelay", 0) / 1e9,
            data.get("Behavior", "release"), data.get("TTL", ""), list(data.get("NodeChecks") or []),
            list(data.get("ServiceChecks") or []), kv.create_revision, kv.mod_revision, kv.lease,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": round(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "Checks": self.check_ids,
            "NodeChecks": self.node_checks or None,
            "ServiceChecks": self.service_checks or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def _fields(body: Any) -> dict[str, Any]:
    """Go decodes JSON field names case-insensitively; so do we."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"Request decode failed: expected a JSON object, got {type(body).__name__}")
    return {str(k).lower(): v for k, v in body.items()}


def _string(fields: dict[str, Any], name: str, label: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"Request decode failed: {label} must be a string, got {type(value).__name__}")
    return value


def _string_list(value: Any, label: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"Request decode failed: {label} must be a list of strings")
    out: list[str] = []
    for v in value:
        if v not in out:
            out.append(v)
    return out


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-zµ]*)")


def _parse_go_duration(text: str) -> float:
    """Seconds from a Go duration, with Go's error wording (Consul echoes it back)."""
    units = _DURATION_UNITS
    if text == "0":
        return 0.0
    body = text[1:] if text[:1] in "+-" else text
    if not body:
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0.0, 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise ValueError(f'time: invalid duration "{text}"')
        unit = m.group(2)
        if not unit:
            raise ValueError(f'time: missing unit in duration "{text}"')
        if unit not in units:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{text}"')
        total += float(m.group(1)) * units[unit]
        pos = m.end()
    if total * 1e9 > (1 << 63) - 1:  # past Go's int64 nanoseconds: Go's own overflow error
        raise ValueError(f'time: invalid duration "{text}"')
    return -total if text.startswith("-") else total


def parse_session_request(body: Any, default_node: str) -> SessionRecord:
    """A new session from a /v1/session/create body (None: all defaults), validated like Consul."""
    fields = _fields(body)
    name = _string(fields, "name", "Name")
    node = _string(fields, "node", "Node") or default_node
    behavior = _string(fields, "behavior", "Behavior") or "release"
    if behavior not in ("release", "delete"):
        raise BadRequest(f"Invalid Behavior setting '{behavior}'")
    ttl = _string(fields, "ttl", "TTL")
    if ttl:
        try:
            seconds = _parse_go_duration(ttl)
        except ValueError as exc:
            raise BadRequest(f"Session TTL '{ttl}' invalid: {exc}") from None
        if seconds != 0 and not (TTL_MIN <= seconds <= TTL_MAX):
            raise BadRequest(f"Invalid Session TTL '{round(seconds * 1e9)}', must be between [10s=24h0m0s]")
        if seconds == 0:
            ttl = ""
    lock_delay = DEFAULT_LOCK_DELAY
    if "lockdelay" in fields:
        raw = fields["lockdelay"]
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise BadRequest("Request decode failed: LockDelay must be a duration string or a number")
        if isinstance(raw, str):
            try:
                nanos = _parse_go_duration(raw) * 1e9
            except ValueError as exc:
                raise BadRequest(f"Request decode failed: {exc}") from None
        else:
            nanos = float(raw)
        # Consul: values under 1000ns were meant as seconds ("LockDelay": 5).
        lock_delay = nanos if nanos < 1000 else nanos / 1e9
        if lock_delay < 0:
            raise BadRequest("Request decode failed: LockDelay must not be negative")
        if lock_delay > MAX_LOCK_DELAY:
            raise BadRequest(f"Lock delay must be less than {int(MAX_LOCK_DELAY)}s")
    has_checks = any(k in fields for k in ("checks", "nodechecks", "servicechecks"))
    node_checks = [SERF_CHECK] if not has_checks else []
    for c in _string_list(fields.get("checks"), "Checks") + _string_list(fields.get("nodechecks"), "NodeChecks"):
        if c not in node_checks:
            node_checks.append(c)
    service_checks: list[dict[str, str]] = []
    raw_service = fields.get("servicechecks")
    if raw_service is not None:
        if not isinstance(raw_service, list):
            raise BadRequest("Request decode failed: ServiceChecks must be a list of objects")
        for item in raw_service:
            item_fields = _fields(item) if isinstance(item, dict) else None
            if item_fields is None or not isinstance(item_fields.get("id"), str) or not item_fields["id"]:
                raise BadRequest('Request decode failed: each ServiceChecks entry needs a string "ID"')
            service_checks.append({"ID": item_fields["id"], "Namespace": str(item_fields.get("namespace") or "")})
    return SessionRecord(
        str(uuid.uuid4()), node, name, lock_delay, behavior, ttl, node_checks, service_checks
    )


class SessionManager:
    """Owns session records and makes their invalidation free the locks they hold."""

    def __init__(self, store: Store, catalog: object, kv: ConsulKV, node: NodeIdentity) -> None:
        self.store = store
        self.catalog = catalog
        self.kv = kv
        self.node = node
        # Which keys each session holds, kept from a watch on kv/ so invalidation need not scan every key.
        self._held: dict[str, set[str]] = {}
        self._holder: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Invalidating sessions must run once per cluster: only the leader reaps (a single server always does).
        self.reaping = True

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        kv_revision = await self._rebuild_index()
        await self.reconcile()
        revision = self.store.revision
        self._tasks = [
            asyncio.create_task(self._follow("kv/", self._on_kv_events, self._rebuild_index, kv_revision)),
            asyncio.create_task(self._follow(SESSION_PREFIX, self._on_change, self._resync, revision)),
            asyncio.create_task(self._follow("catalog/", self._on_change, self._resync, revision)),
            asyncio.create_task(self._reconcile_loop(), name="session-reconciler"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        await cancel_all_and_wait(self._tasks)
        self._tasks = []

    # ---- API operations ----------------------------------------------------------------------

    async def create(self, body: Any) -> SessionRecord:
        record = parse_session_request(body, self.node.name)
        lease = 0
        try:
            for _ in range(_MAX_ATTEMPTS):
                compares = await self._validate_attachments(record)
                if record.ttl and not lease:
                    ttl = _parse_go_duration(record.ttl)
                    lease = (await self.store.grant_lease(max(1, math.ceil(ttl)))).id
                compares.append(Compare(session_key(record.id), "version", "=", 0))
                result = await self.store.txn(compares, [Put(session_key(record.id), record.encode(), lease)])
                if result.succeeded:
                    kv = await self.store.get(session_key(record.id))
                    if kv is not None:
                        return SessionRecord.decode(kv)
                    return record
            raise ShipyardError("session create kept conflicting with catalog changes; retry", status=500)
        except BaseException:
            if lease:
                with contextlib.suppress(Exception):
                    await self.store.revoke_lease(lease)
            raise

    async def _validate_attachments(self, record: SessionRecord) -> list[Compare]:
        """The node and checks must exist and not be critical; returns compares pinning what was seen."""
        node_kv = await self.store.get(node_key(record.node))
        if node_kv is None:
            raise SessionError("Missing node registration")
        compares = [Compare(node_kv.key, "mod", "=", node_kv.mod_revision)]
        for check_id in record.check_ids:
            ckv = await self.store.get(check_key(record.node, check_id))
            if ckv is None:
                raise SessionError(f"Missing check '{check_id}' registration")
            status = _check_status(ckv)
            if status == "critical":
                raise SessionError(f"Check '{check_id}' is in critical state")
            compares.append(Compare(ckv.key, "mod", "=", ckv.mod_revision))
        return compares

    async def destroy(self, session_id: str) -> bool:
        kv = await self.store.get(session_key(session_id))
        if kv is not None:
            await self._invalidate(SessionRecord.decode(kv))
        return True

    async def renew(self, session_id: str) -> SessionRecord | None:
        kv = await self.store.get(session_key(session_id))
        if kv is None:
            return None
        if kv.lease:
            try:
                await self.store.keepalive(kv.lease)
            except LeaseNotFound:
                return None
        return SessionRecord.decode(kv)

    async def info(self, session_id: str) -> tuple[list[SessionRecord], int, int]:
        res = await self.store.range(SESSION_PREFIX, prefix=True)
        found = [SessionRecord.decode(kv) for kv in res.kvs if kv.key == session_key(session_id)]
        return found, res.index, res.revision

    async def list(self, node: str | None = None) -> tuple[list[SessionRecord], int, int]:
        res = await self.store.range(SESSION_PREFIX, prefix=True)
        records = [SessionRecord.decode(kv) for kv in res.kvs]
        if node is not None:
            records = [r for r in records if r.node == node]
        return records, res.index, res.revision

    # ---- invalidation -------------------------------------------------------------------------

    async def _invalidate(self, record: SessionRecord) -> None:
        """Deletes the session and frees every key it holds, in one store txn."""
        from shipyard.registry import kv as kvmod

        skey = session_key(record.id)
        for _ in range(_MAX_ATTEMPTS):
            current = await self.store.get(skey)
            if current is None:
                break  # already gone: the reconciler releases whatever it still holds
            compares = [Compare(skey, "mod", "=", current.mod_revision)]
            ops: list[Op] = [Delete(skey)]
            released: list[kvmod.KVEntry] = []
            for key in sorted(self._held.get(record.id, ())):
                ekv = await self.store.get(kvmod.store_key(key))
                if ekv is None:
                    continue
                entry = kvmod.decode_entry(ekv)
                if entry.session != record.id:
                    continue
                compares.append(Compare(ekv.key, "mod", "=", ekv.mod_revision))
                ops.append(self.kv.release_op(entry))
                released.append(entry)
            result = await self.store.txn(compares, ops)
            if result.succeeded:
                for entry in released:
                    # Consul applies the session's lock delay, not the one recorded at acquire time.
                    self.kv.start_lock_delay(entry.key, record.lock_delay)
                break
        if record.lease:
            with contextlib.suppress(LeaseNotFound):
                await self.store.revoke_lease(record.lease)
        self._wake.set()

    async def reconcile(self) -> bool:
        """One pass: invalidate sessions whose node or checks failed; free keys of vanished sessions.

        Returns False when something changed underneath and another pass is needed."""
        sessions = await self.store.range(SESSION_PREFIX, prefix=True)
        records = {}
        for kv in sessions.kvs:
            try:
                record = SessionRecord.decode(kv)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("ignoring undecodable session record %s", kv.key)
                continue
            records[record.id] = record
        converged = True
        for record in list(records.values()):
            reason = await self._invalid_reason(record)
            if reason:
                log.info("invalidating session %s: %s", record.id, reason)
                await self._invalidate(record)
                records.pop(record.id, None)
        existing = {kv.key[len(SESSION_PREFIX):] for kv in sessions.kvs}
        for session_id, keys in list(self._held.items()):
            if session_id in existing and session_id in records:
                continue
            # Re-read: the snapshot above may predate an acquire by a session created since.
            if await self.store.get(session_key(session_id)) is not None:
                continue
            for key in sorted(keys):
                if not await self.kv.release_held(key, session_id):
                    converged = False
        return converged

    async def _invalid_reason(self, record: SessionRecord) -> str:
        if await self.store.get(node_key(record.node)) is None:
            return f"node {record.node!r} is not registered"
        for check_id in record.check_ids:
            ckv = await self.store.get(check_key(record.node, check_id))
            if ckv is None:
                return f"check {check_id!r} was deregistered"
            if _check_status(ckv) == "critical":
                return f"check {check_id!r} is critical"
        return ""

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _RESYNC_SECONDS)
            self._wake.clear()
            if not self.reaping:
                continue
            try:
                if not await self.reconcile():
                    self._wake.set()
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session reconcile failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    # ---- watching -----------------------------------------------------------------------------

    # Below list(), `list` in this class's annotations is that method: the type is spelt builtins.list.
    def _on_change(self, batch: builtins.list[Event]) -> None:
        self._wake.set()

    def _on_kv_events(self, batch: builtins.list[Event]) -> None:
        from shipyard.registry import kv as kvmod

        for ev in batch:
            key = ev.kv.key[len(kvmod.KV_PREFIX):]
            session = ""
            if ev.type == EventType.PUT:
                session = kvmod.decode_entry(ev.kv).session
            self._set_holder(key, session)
            if session and self.store_has_no_session(session):
                self._wake.set()

    def store_has_no_session(self, session_id: str) -> bool:
        get_now = getattr(self.store, "get_now", None)
        if get_now is None:
            return True  # can't tell cheaply: let the reconciler look
        return get_now(session_key(session_id)) is None

    def _set_holder(self, key: str, session: str) -> None:
        old = self._holder.pop(key, None)
        if old is not None:
            keys = self._held.get(old)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._held[old]
        if session:
            self._holder[key] = session
            self._held.setdefault(session, set()).add(key)

    async def _rebuild_index(self) -> int:
        from shipyard.registry import kv as kvmod

        res = await self.store.range(kvmod.KV_PREFIX, prefix=True)
        self._held.clear()
        self._holder.clear()
        for kv in res.kvs:
            session = kvmod.decode_entry(kv).session
            if session:
                self._set_holder(kv.key[len(kvmod.KV_PREFIX):], session)
        self._wake.set()
        return res.revision

    async def _resync(self) -> int:
        self._wake.set()
        return self.store.revision

    async def _follow(self, prefix: str, on_batch: Any, resync: Any, revision: int) -> None:
        """Feeds every change under prefix to on_batch; after a gap (compaction, overflow, error) resyncs. None of
        them looks at previous versions: on etcd, kv/ without them saves etcd a read per Consul KV write."""
        await follow_prefix(self.store, prefix, on_batch, resync, from_revision=revision, name=f"sessions {prefix}",
                            prev_kv=False)


def _check_status(kv: KeyValue) -> str:
    try:
        data = orjson.loads(kv.value)
    except orjson.JSONDecodeError:
        return ""
    return str(data.get("Status", "")) if isinstance(data, dict) else ""
