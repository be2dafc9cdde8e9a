"""The service catalog: nodes, service instances and health checks, stored under catalog/ in Consul's shapes.

Owns every write under catalog/ and the read model the Consul endpoints answer from; it never runs a check.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import orjson

from shipyard.errors import NotFound
from shipyard.registry.node import NodeIdentity
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store

log = logging.getLogger("shipyard.catalog")

PREFIX = "catalog/"
NODES = "catalog/nodes/"
SERVICES = "catalog/services/"
CHECKS = "catalog/checks/"
# One key per service name, touched in the same txn as every change that alters that service's
# catalog or health answers: its mod_revision is the X-Consul-Index of per-service queries, and it
# survives the last instance's removal so a blocking reader still sees the removal as a change.
SERVICE_INDEX = "catalog/service-index/"
PATCH_MAX = 2000  # changed keys applied to a cached snapshot at most; past that the whole catalog is read again
TXN_GETS = 128  # etcd's default --max-txn-ops

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
NODE_MAINT_CHECK_ID = "_node_maintenance"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
# Types of checks the health checker runs; anything else (catalog-registered, maintenance) is only stored.
RUNNABLE_TYPES = ("http", "tcp", "ttl", "script")
MAX_CAS_RETRIES = 50


def _q(part: str) -> str:
    return quote(part, safe="")


def node_key(node: str) -> str:
    return NODES + _q(node)


def service_key(node: str, service_id: str) -> str:
    return f"{SERVICES}{_q(node)}/{_q(service_id)}"


def check_key(node: str, check_id: str) -> str:
    return f"{CHECKS}{_q(node)}/{_q(check_id)}"


def service_index_key(name: str) -> str:
    return SERVICE_INDEX + _q(name)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _split_key(key: str, prefix: str) -> tuple[str, str]:
    node, _, rest = key[len(prefix) :].partition("/")
    return unquote(node), unquote(rest)


def service_maintenance_check_id(service_id: str) -> str:
    return SERVICE_MAINT_PREFIX + service_id


@dataclass
class Entry:
    """A parsed catalog record with the store revisions Consul reports as CreateIndex/ModifyIndex."""

    data: dict[str, Any]
    create_index: int
    modify_index: int

    def with_indexes(self) -> dict[str, Any]:
        out = dict(self.data)
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out


def _add_record(snap: CatalogSnapshot, kv: KeyValue) -> None:
    key = kv.key
    if key.startswith(SERVICE_INDEX):
        snap.service_index[unquote(key[len(SERVICE_INDEX) :])] = kv.mod_revision
        return
    entry = _entry(kv)
    if entry is None:
        return
    if key.startswith(NODES):
        snap.nodes[unquote(key[len(NODES) :])] = entry
    elif key.startswith(SERVICES):
        snap.services[_split_key(key, SERVICES)] = entry
    elif key.startswith(CHECKS):
        snap.checks[_split_key(key, CHECKS)] = entry


def _drop_record(snap: CatalogSnapshot, key: str) -> None:
    if key.startswith(SERVICE_INDEX):
        snap.service_index.pop(unquote(key[len(SERVICE_INDEX) :]), None)
    elif key.startswith(NODES):
        snap.nodes.pop(unquote(key[len(NODES) :]), None)
    elif key.startswith(SERVICES):
        snap.services.pop(_split_key(key, SERVICES), None)
    elif key.startswith(CHECKS):
        snap.checks.pop(_split_key(key, CHECKS), None)


def _entry(kv: KeyValue) -> Entry | None:
    try:
        data = orjson.loads(kv.value)
    except orjson.JSONDecodeError:
        log.error("ignoring undecodable catalog record %s", kv.key)
        return None
    if not isinstance(data, dict):
        return None
    return Entry(data, kv.create_revision, kv.mod_revision)


@dataclass
class CatalogSnapshot:
    """Everything under catalog/ as of one store revision, indexed for the queries the API makes."""

    revision: int
    index: int  # range index of the whole catalog/ prefix (entries and remembered deletions)
    nodes: dict[str, Entry] = field(default_factory=dict)
    services: dict[tuple[str, str], Entry] = field(default_factory=dict)  # (node, service id)
    checks: dict[tuple[str, str], Entry] = field(default_factory=dict)  # (node, check id)
    service_index: dict[str, int] = field(default_factory=dict)  # service name -> mod revision
    nodes_index: int = 0
    services_index: int = 0
    checks_index: int = 0
    # Lookup tables, built on first use (a snapshot is complete before anyone queries it, and never changes after):
    # a health query of one service on a catalog of 10,000 instances scanned every check of every instance.
    _by_name: dict[str, list[tuple[str, Entry]]] | None = field(default=None, repr=False, compare=False)
    _services_by_node: dict[str, list[Entry]] | None = field(default=None, repr=False, compare=False)
    _checks_by_owner: dict[tuple[str, str], list[Entry]] | None = field(default=None, repr=False, compare=False)
    _checks_by_node: dict[str, list[Entry]] | None = field(default=None, repr=False, compare=False)

    # ---- lookups ----------------------------------------------------------------------------

    def _service_tables(self) -> tuple[dict[str, list[tuple[str, Entry]]], dict[str, list[Entry]]]:
        if self._by_name is None or self._services_by_node is None:
            by_name: dict[str, list[tuple[str, Entry]]] = {}
            by_node: dict[str, list[Entry]] = {}
            for (node, _), e in self.services.items():
                by_name.setdefault(e.data.get("Service"), []).append((node, e))  # type: ignore[arg-type]
                by_node.setdefault(node, []).append(e)
            for found in by_name.values():
                found.sort(key=lambda pair: (pair[0], pair[1].data.get("ID", "")))
            self._by_name, self._services_by_node = by_name, by_node
        return self._by_name, self._services_by_node

    def _check_tables(self) -> tuple[dict[tuple[str, str], list[Entry]], dict[str, list[Entry]]]:
        if self._checks_by_owner is None or self._checks_by_node is None:
            by_owner: dict[tuple[str, str], list[Entry]] = {}
            by_node: dict[str, list[Entry]] = {}
            for (node, _), e in self.checks.items():
                by_owner.setdefault((node, e.data.get("ServiceID") or ""), []).append(e)
                by_node.setdefault(node, []).append(e)
            self._checks_by_owner, self._checks_by_node = by_owner, by_node
        return self._checks_by_owner, self._checks_by_node

    def services_named(self, name: str) -> list[tuple[str, Entry]]:
        return list(self._service_tables()[0].get(name, ()))

    def node_checks(self, node: str) -> list[Entry]:
        return list(self._check_tables()[0].get((node, ""), ()))

    def service_checks(self, node: str, service_id: str) -> list[Entry]:
        if not service_id:
            return [e for (n, _), e in self.checks.items() if n == node and e.data.get("ServiceID") == service_id]
        return list(self._check_tables()[0].get((node, service_id), ()))

    def checks_of_node(self, node: str) -> list[Entry]:
        return list(self._check_tables()[1].get(node, ()))

    def services_of_node(self, node: str) -> list[Entry]:
        return list(self._service_tables()[1].get(node, ()))

    def name_index(self, name: str) -> int:
        """X-Consul-Index of per-service-name queries."""
        return self.service_index.get(name, 0)

    # ---- Consul shapes ----------------------------------------------------------------------

    def node_shape(self, node: str) -> dict[str, Any]:
        entry = self.nodes.get(node)
        if entry is None:
            # Services registered for a node that has since vanished still need a node body.
            return {"ID": "", "Node": node, "Address": "", "Datacenter": "", "TaggedAddresses": {}, "Meta": {},
                    "CreateIndex": 0, "ModifyIndex": 0}
        return entry.with_indexes()

    def check_shape(self, entry: Entry) -> dict[str, Any]:
        out = entry.with_indexes()
        definition = out.get("Definition")
        if isinstance(definition, dict):
            # The *Duration fields (nanoseconds) are for the checker; clients see Consul's strings.
            out["Definition"] = _go_durations({k: v for k, v in definition.items() if not k.endswith("Duration")})
        out.setdefault("ServiceTags", [])
        return _go_durations(out)

    def catalog_service_shape(self, node: str, entry: Entry) -> dict[str, Any]:
        n = self.node_shape(node)
        s = entry.data
        return {
            "ID": n.get("ID", ""),
            "Node": node,
            "Address": n.get("Address", ""),
            "Datacenter": n.get("Datacenter", ""),
            "TaggedAddresses": n.get("TaggedAddresses") or {},
            "NodeMeta": n.get("Meta") or {},
            "ServiceKind": s.get("Kind", ""),
            "ServiceID": s.get("ID", ""),
            "ServiceName": s.get("Service", ""),
            "ServiceTags": s.get("Tags") or [],
            "ServiceAddress": s.get("Address", ""),
            "ServiceTaggedAddresses": s.get("TaggedAddresses") or {},
            "ServiceWeights": s.get("Weights") or {"Passing": 1, "Warning": 1},
            "ServiceMeta": s.get("Meta") or {},
            "ServicePort": s.get("Port", 0),
            "ServiceSocketPath": s.get("SocketPath", ""),
            "ServiceEnableTagOverride": bool(s.get("EnableTagOverride", False)),
            "ServiceProxy": s.get("Proxy") or {},
            "ServiceConnect": s.get("Connect") or {},
            "CreateIndex": entry.create_index,
            "ModifyIndex": entry.modify_index,
        }

    def node_service_shape(self, entry: Entry) -> dict[str, Any]:
        out = entry.with_indexes()
        out.setdefault("Tags", [])
        out.setdefault("Meta", {})
        out.setdefault("Weights", {"Passing": 1, "Warning": 1})
        out.pop("Datacenter", None)
        return out

    def agent_service_shape(self, entry: Entry, datacenter: str) -> dict[str, Any]:
        # api.AgentService: the agent's own record has no Raft indexes (Consul leaves them out, and clients
        # compare whole records), but it names its datacenter.
        out = dict(entry.data)
        out.setdefault("Tags", [])
        out.setdefault("Meta", {})
        out.setdefault("Weights", {"Passing": 1, "Warning": 1})
        out["Datacenter"] = datacenter
        return out

    def health_entries(self, name: str) -> list[dict[str, Any]]:
        """Consul's ServiceEntry list for a service name: node, instance and all checks that bear on it."""
        out = []
        for node, entry in self.services_named(name):
            sid = entry.data.get("ID", "")
            checks = self.node_checks(node) + self.service_checks(node, sid)
            out.append({
                "Node": self.node_shape(node),
                "Service": self.node_service_shape(entry),
                "Checks": [self.check_shape(c) for c in sorted(checks, key=_check_order)],
            })
        return out


CHECK_DURATIONS = ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter")


def _go_durations(shape: dict[str, Any]) -> dict[str, Any]:
    # Records written before durations were always rendered hold "" for zero; Go's time.ParseDuration (and so
    # every Go Consul client) refuses "", and Consul itself says "0s".
    for key in CHECK_DURATIONS:
        if shape.get(key) == "":
            shape[key] = "0s"
    return shape


def _check_order(entry: Entry) -> tuple[str, str]:
    return (entry.data.get("ServiceID", ""), entry.data.get("CheckID", ""))


def _node_record(node: NodeIdentity) -> dict[str, Any]:
    return {
        "ID": node.id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {
            "lan": node.address,
            "lan_ipv4": node.address,
            "wan": node.address,
            "wan_ipv4": node.address,
        },
        "Meta": {"consul-network-segment": ""},
    }


def _serf_check(node: str) -> dict[str, Any]:
    return {
        "Node": node,
        "CheckID": SERF_CHECK_ID,
        "Name": "Serf Health Status",
        "Status": PASSING,
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
    }


class Catalog:
    """Registers this node, and applies service and check registrations to the store atomically."""

    def __init__(self, store: Store, node: NodeIdentity, *, node_meta: dict[str, str] | None = None) -> None:
        self.store = store
        self.node = node
        self.node_meta = dict(node_meta or {})  # an agent's --meta, on its node record (Consul's NodeMeta)
        self._cache: CatalogSnapshot | None = None
        self._loading: asyncio.Task[CatalogSnapshot] | None = None  # the full read in flight (etcd), shared

    async def start(self) -> None:
        record = _node_record(self.node)
        record["Meta"].update(self.node_meta)
        await self.register_node(record, [_serf_check(self.node.name)])

    async def stop(self) -> None:
        self._cache = None

    # ---- reads ------------------------------------------------------------------------------

    async def snapshot(self) -> CatalogSnapshot:
        """The whole catalog at one revision; re-parsed only when something under catalog/ changed."""
        cached = self._cache
        news = None if cached is None else await self._news(cached)
        if cached is None or news is None:
            return await self._load(cached)  # SQLite: a local read (a parse only when something changed)
        target, changes = news
        if changes is not None and not changes:
            cached.revision = max(cached.revision, target)  # nothing changed up to etcd's revision now
            return cached
        latest = self._cache
        if latest is not None and latest.revision >= target:
            return latest  # another caller brought it up to date meanwhile
        # Woken together, a thousand blocking queries share one refresh, if it read after they came.
        loading = self._loading
        if loading is not None:
            shared = await asyncio.shield(loading)
            if shared.revision >= target:
                return shared
        self._loading = asyncio.ensure_future(self._refresh(changes))
        try:
            return await asyncio.shield(self._loading)
        finally:
            if self._loading is not None and self._loading.done():
                self._loading = None

    async def _news(self, cached: CatalogSnapshot) -> tuple[int, list[tuple[int, str]] | None] | None:
        """etcd: (its revision now, the catalog keys changed since the cached snapshot as its follow stream saw them,
        or None when it cannot name them all), without reading the catalog. None on a store that cannot tell."""
        changes_known = getattr(self.store, "changes_known", None)
        if changes_known is None:
            return None
        target, changes = await changes_known(PREFIX, cached.index)
        return int(target), changes

    async def _refresh(self, changes: list[tuple[int, str]] | None) -> CatalogSnapshot:
        cached = self._cache
        patched = None if cached is None or changes is None else await self._patch(cached, changes)
        return patched if patched is not None else await self._load(cached)

    async def _patch(self, cached: CatalogSnapshot, changes: list[tuple[int, str]]) -> CatalogSnapshot | None:
        """etcd: the cached snapshot with the keys changed since (named by the store's follow stream), instead of
        the whole catalog (10,000 instances: megabytes through etcd's JSON gateway, seconds, for each change).
        None past PATCH_MAX changes (then the whole is read)."""
        if len(changes) > PATCH_MAX:
            return None
        keys = sorted({key for _, key in changes})
        snap = CatalogSnapshot(
            revision=0, index=max([cached.index, *(rev for rev, _ in changes)]),
            nodes=dict(cached.nodes), services=dict(cached.services), checks=dict(cached.checks),
            service_index=dict(cached.service_index), nodes_index=cached.nodes_index,
            services_index=cached.services_index, checks_index=cached.checks_index)
        for at in range(0, len(keys), TXN_GETS):  # etcd refuses a txn of more than 128 operations (--max-txn-ops)
            part = keys[at:at + TXN_GETS]
            result = await self.store.txn((), [Get(key) for key in part])
            snap.revision = snap.revision or result.revision  # every part was read after the caller's revision
            for key, kvs in zip(part, result.ranges(), strict=True):
                if kvs:
                    _add_record(snap, kvs[0])
                else:
                    _drop_record(snap, key)
        for rev, key in changes:
            if key.startswith(NODES):
                snap.nodes_index = max(snap.nodes_index, rev)
            elif key.startswith(SERVICES):
                snap.services_index = max(snap.services_index, rev)
            elif key.startswith(CHECKS):
                snap.checks_index = max(snap.checks_index, rev)
        if self._cache is None or snap.index >= self._cache.index:
            self._cache = snap
        return snap

    async def _load(self, cached: CatalogSnapshot | None) -> CatalogSnapshot:
        rr = await self.store.range(PREFIX, prefix=True)
        if cached is not None and cached.index == rr.index:
            cached.revision = rr.revision
            return cached
        snap = CatalogSnapshot(revision=rr.revision, index=rr.index)
        for kv in rr.kvs:
            _add_record(snap, kv)
        snap.nodes_index = await self._prefix_index(NODES)
        snap.services_index = await self._prefix_index(SERVICES)
        snap.checks_index = await self._prefix_index(CHECKS)
        if self._cache is None or snap.index >= self._cache.index:  # a slower, older read never replaces a newer
            self._cache = snap
        return snap

    async def _prefix_index(self, prefix: str) -> int:
        """The range index of a prefix; without its values where the store can (etcd: one key instead of them all)."""
        index_of = getattr(self.store, "prefix_index", None)
        if index_of is not None:
            return int((await index_of(prefix))[0])
        return (await self.store.range(prefix, prefix=True)).index

    async def get_check(self, node: str, check_id: str) -> dict[str, Any] | None:
        kv = await self.store.get(check_key(node, check_id))
        if kv is None:
            return None
        entry = _entry(kv)
        return None if entry is None else entry.data

    async def get_service(self, node: str, service_id: str) -> dict[str, Any] | None:
        kv = await self.store.get(service_key(node, service_id))
        if kv is None:
            return None
        entry = _entry(kv)
        return None if entry is None else entry.data

    async def checks_of_node(self, node: str) -> tuple[list[dict[str, Any]], int]:
        """(checks, store revision read at) for the health checker's reconcile."""
        rr = await self.store.range(f"{CHECKS}{_q(node)}/", prefix=True)
        out = []
        for kv in rr.kvs:
            entry = _entry(kv)
            if entry is not None:
                out.append(entry.data)
        return out, rr.revision

    # ---- writes -----------------------------------------------------------------------------

    async def register_node(self, record: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        """Writes a node and node-level checks, skipping records that are already exactly so."""
        name = record["Node"]
        snap = await self.snapshot()
        ops: list[Put | Delete] = []
        existing = snap.nodes.get(name)
        if existing is None or existing.data != record:
            ops.append(Put(node_key(name), _dumps(record)))
        for check in checks:
            current = snap.checks.get((name, check["CheckID"]))
            if current is None or current.data != check:
                ops.append(Put(check_key(name, check["CheckID"]), _dumps(check)))
        if ops:
            ops += [Put(service_index_key(n), b"{}") for n in self._names_on_node(snap, name)]
            await self.store.txn((), ops)

    async def register_service(
        self,
        node: str,
        service: dict[str, Any],
        checks: list[dict[str, Any]],
        *,
        replace_existing_checks: bool = False,
    ) -> None:
        """Adds or replaces a service instance and its checks in one txn.

        A re-registered check keeps its current Status and Output, as Consul's agent does, so
        re-registering a healthy service does not make it flap to critical."""
        sid = service["ID"]
        for _ in range(MAX_CAS_RETRIES):
            snap = await self.snapshot()
            compares: list[Compare] = []
            ops: list[Put | Delete] = []
            old = snap.services.get((node, sid))
            skey = service_key(node, sid)
            compares.append(Compare(skey, "mod", "=", old.modify_index if old else 0))
            ops.append(Put(skey, _dumps(service)))
            new_ids = {c["CheckID"] for c in checks}
            for check in checks:
                check = dict(check)
                check["Node"] = node
                check["ServiceID"] = sid
                check["ServiceName"] = service["Service"]
                check["ServiceTags"] = list(service.get("Tags") or [])
                ckey = check_key(node, check["CheckID"])
                current = snap.checks.get((node, check["CheckID"]))
                compares.append(Compare(ckey, "mod", "=", current.modify_index if current else 0))
                if current is not None:
                    check["Status"] = current.data.get("Status", check["Status"])
                    check["Output"] = current.data.get("Output", check.get("Output", ""))
                ops.append(Put(ckey, _dumps(check)))
            for existing in snap.service_checks(node, sid):
                cid = existing.data.get("CheckID", "")
                if cid in new_ids:
                    continue
                ckey = check_key(node, cid)
                if replace_existing_checks and not cid.startswith(SERVICE_MAINT_PREFIX):
                    ops.append(Delete(ckey))
                elif existing.data.get("ServiceTags") != service.get("Tags") or (
                    existing.data.get("ServiceName") != service["Service"]
                ):
                    updated = dict(existing.data, ServiceName=service["Service"], ServiceTags=service.get("Tags") or [])
                    compares.append(Compare(ckey, "mod", "=", existing.modify_index))
                    ops.append(Put(ckey, _dumps(updated)))
            names = {service["Service"]}
            if old is not None:
                names.add(old.data.get("Service", ""))
            ops += [Put(service_index_key(n), b"{}") for n in sorted(names) if n]
            result = await self.store.txn(compares, ops)
            if result.succeeded:
                return
        raise RuntimeError(f"service {sid!r} registration kept conflicting with concurrent writes")

    async def register_check(self, node: str, check: dict[str, Any]) -> None:
        """Adds or replaces one check; keeps the current status of a check re-registered with the same ID.

        Raises NotFound when it names a ServiceID this node does not have."""
        cid = check["CheckID"]
        for _ in range(MAX_CAS_RETRIES):
            snap = await self.snapshot()
            check = dict(check, Node=node)
            compares: list[Compare] = []
            names: set[str] = set()
            sid = check.get("ServiceID") or ""
            if sid:
                svc = snap.services.get((node, sid))
                if svc is None:
                    raise NotFound(f'ServiceID "{sid}" does not exist')
                compares.append(Compare(service_key(node, sid), "mod", "=", svc.modify_index))
                check["ServiceName"] = svc.data.get("Service", "")
                check["ServiceTags"] = list(svc.data.get("Tags") or [])
                names.add(check["ServiceName"])
            else:
                check["ServiceName"] = ""
                check["ServiceTags"] = []
                names |= self._names_on_node(snap, node)
            ckey = check_key(node, cid)
            current = snap.checks.get((node, cid))
            compares.append(Compare(ckey, "mod", "=", current.modify_index if current else 0))
            if current is not None:
                check["Status"] = current.data.get("Status", check["Status"])
                check["Output"] = current.data.get("Output", check.get("Output", ""))
                old_sid = current.data.get("ServiceName")
                if old_sid:
                    names.add(old_sid)
            ops: list[Put | Delete] = [Put(ckey, _dumps(check))]
            ops += [Put(service_index_key(n), b"{}") for n in sorted(names) if n]
            result = await self.store.txn(compares, ops)
            if result.succeeded:
                return
        raise RuntimeError(f"check {cid!r} registration kept conflicting with concurrent writes")

    async def deregister_service(self, node: str, service_id: str) -> bool:
        """Removes a service instance and every check attached to it. False when it was not there."""
        snap = await self.snapshot()
        entry = snap.services.get((node, service_id))
        if entry is None:
            return False
        ops: list[Put | Delete] = [Delete(service_key(node, service_id))]
        ops += [Delete(check_key(node, c.data.get("CheckID", ""))) for c in snap.service_checks(node, service_id)]
        ops.append(Put(service_index_key(entry.data.get("Service", "")), b"{}"))
        await self.store.txn((), ops)
        return True

    async def deregister_check(self, node: str, check_id: str) -> bool:
        snap = await self.snapshot()
        entry = snap.checks.get((node, check_id))
        if entry is None:
            return False
        ops: list[Put | Delete] = [Delete(check_key(node, check_id))]
        ops += [Put(service_index_key(n), b"{}") for n in sorted(self._names_for_check(snap, node, entry))]
        await self.store.txn((), ops)
        return True

    async def deregister_node(self, node: str) -> bool:
        """Removes a node with all its services and checks (catalog-level deregistration)."""
        snap = await self.snapshot()
        if node not in snap.nodes and not snap.services_of_node(node) and not snap.checks_of_node(node):
            return False
        await self.store.txn((), self.node_removal_ops(snap, node))
        return True

    def node_removal_ops(self, snap: CatalogSnapshot, node: str) -> list[Put | Delete]:
        """The writes that remove a node with its services and checks (and wake the blocking queries on its
        services' names), for a caller that guards them in its own txn (the leader reaping a failed agent)."""
        ops: list[Put | Delete] = [
            Delete(node_key(node)),
            Delete(f"{SERVICES}{_q(node)}/", prefix=True),
            Delete(f"{CHECKS}{_q(node)}/", prefix=True),
        ]
        return ops + [Put(service_index_key(n), b"{}") for n in sorted(self._names_on_node(snap, node))]

    async def update_check_status(self, node: str, check_id: str, status: str, output: str, *,
                                  while_node_live: bool = False) -> bool:
        """Sets a check's Status and Output; writes only when either changes. True when it wrote.

        Guarded by the record's mod revision, so a check deregistered meanwhile is never recreated. With
        `while_node_live` (a probe's result), a status other than critical is written only while the node's
        serfHealth is not critical, guarded on that record too: a node that was cut off or paused, whose instances
        were replaced meanwhile, cannot show a superseded instance passing before its agent has stopped it (the
        agent marks its node passing again only once it has)."""
        key = check_key(node, check_id)
        for _ in range(MAX_CAS_RETRIES):
            kv = await self.store.get(key)
            if kv is None:
                return False
            entry = _entry(kv)
            if entry is None:
                return False
            data = entry.data
            if data.get("Status") == status and data.get("Output", "") == output:
                return False
            guard = [Compare(key, "mod", "=", kv.mod_revision)]
            if while_node_live and status != CRITICAL:
                live = await self._node_live_guard(node)
                if live is None:
                    return False
                guard.append(live)
            updated = dict(data, Status=status, Output=output)
            ops: list[Put | Delete] = [Put(key, _dumps(updated))]
            ops += [Put(service_index_key(n), b"{}") for n in sorted(await self._names_for_status(node, data))]
            result = await self.store.txn(guard, ops)
            if result.succeeded:
                return True
        return False

    async def _node_live_guard(self, node: str) -> Compare | None:
        """None while the node's serfHealth is critical; else a compare that it is still as read (absent: a node
        registered without one, as through the catalog API, is never held back)."""
        key = check_key(node, SERF_CHECK_ID)
        serf = await self.store.get(key)
        if serf is None:
            return Compare(key, "version", "=", 0)
        entry = _entry(serf)
        if entry is not None and entry.data.get("Status") == CRITICAL:
            return None
        return Compare(key, "mod", "=", serf.mod_revision)

    # ---- maintenance ------------------------------------------------------------------------

    async def enable_service_maintenance(self, node: str, service_id: str, reason: str) -> None:
        svc = await self.get_service(node, service_id)
        if svc is None:
            raise NotFound(f'No service registered with ID "{service_id}"')
        cid = service_maintenance_check_id(service_id)
        if await self.get_check(node, cid) is not None:
            return  # Consul leaves an existing maintenance check (and its reason) alone
        await self.register_check(node, {
            "CheckID": cid,
            "Name": "Service Maintenance Mode",
            "Status": CRITICAL,
            "Notes": reason or DEFAULT_SERVICE_MAINT_REASON,
            "Output": "",
            "ServiceID": service_id,
            "Type": MAINTENANCE,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
        })

    async def disable_service_maintenance(self, node: str, service_id: str) -> None:
        if await self.get_service(node, service_id) is None:
            raise NotFound(f'No service registered with ID "{service_id}"')
        await self.deregister_check(node, service_maintenance_check_id(service_id))

    async def enable_node_maintenance(self, node: str, reason: str) -> None:
        if await self.get_check(node, NODE_MAINT_CHECK_ID) is not None:
            return
        await self.register_check(node, {
            "CheckID": NODE_MAINT_CHECK_ID,
            "Name": "Node Maintenance Mode",
            "Status": CRITICAL,
            "Notes": reason or DEFAULT_NODE_MAINT_REASON,
            "Output": "",
            "ServiceID": "",
            "Type": MAINTENANCE,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
        })

    async def disable_node_maintenance(self, node: str) -> None:
        await self.deregister_check(node, NODE_MAINT_CHECK_ID)

    # ---- catalog-level registration (PUT /v1/catalog/register) ------------------------------

    async def register_catalog_entry(
        self,
        name: str,
        node: dict[str, Any] | None,
        service: dict[str, Any] | None,
        checks: list[dict[str, Any]],
    ) -> None:
        """Applies a catalog registration: an optional node update, service and checks, in one txn.

        Such checks are stored as given and never run, as in Consul."""
        for _ in range(MAX_CAS_RETRIES):
            snap = await self._registration_view(name, node, service, checks)
            compares: list[Compare] = []
            ops: list[Put | Delete] = []
            names: set[str] = set()
            if node is not None:
                existing = snap.nodes.get(name)
                merged = dict(existing.data) if existing else {}
                merged.update(node)
                if existing is None or existing.data != merged:
                    ops.append(Put(node_key(name), _dumps(merged)))
                    names |= self._names_on_node(snap, name)
            services_after = {e.data.get("ID"): e.data for e in snap.services_of_node(name)}
            if service is not None:
                svc = service
                old = snap.services.get((name, svc["ID"]))
                compares.append(Compare(service_key(name, svc["ID"]), "mod", "=", old.modify_index if old else 0))
                if old is not None:
                    names.add(old.data.get("Service", ""))
                names.add(svc["Service"])
                ops.append(Put(service_key(name, svc["ID"]), _dumps(svc)))
                services_after[svc["ID"]] = svc
            for check in checks:
                check = dict(check, Node=name)
                sid = check.get("ServiceID") or ""
                if sid:
                    owner = services_after.get(sid)
                    if owner is None:
                        raise NotFound(f'Unknown service ID "{sid}" for check ID "{check["CheckID"]}"')
                    check["ServiceName"] = owner.get("Service", "")
                    check["ServiceTags"] = list(owner.get("Tags") or [])
                    names.add(check["ServiceName"])
                else:
                    names |= self._names_on_node(snap, name)
                    if service is not None:
                        names.add(service["Service"])
                ckey = check_key(name, check["CheckID"])
                current = snap.checks.get((name, check["CheckID"]))
                compares.append(Compare(ckey, "mod", "=", current.modify_index if current else 0))
                ops.append(Put(ckey, _dumps(check)))
            if not ops:
                return
            ops += [Put(service_index_key(n), b"{}") for n in sorted(names) if n]
            result = await self.store.txn(compares, ops)
            if result.succeeded:
                return
        raise RuntimeError("catalog registration kept conflicting with concurrent writes")

    async def _registration_view(self, name: str, node: dict[str, Any] | None, service: dict[str, Any] | None,
                                 checks: list[dict[str, Any]]) -> CatalogSnapshot:
        """The part of the catalog a registration reads, in one txn of Gets: the node, the service and the checks it
        names, and the services its checks belong to; all the node's services only where the names of every service
        on it are needed (the node record changes, or a check is the node's own). The whole catalog, re-read on
        every registration, made registering N instances cost N^2 on etcd."""
        gets = [Get(node_key(name))]
        if service is not None:
            gets.append(Get(service_key(name, service["ID"])))
        for check in checks:
            gets.append(Get(check_key(name, check["CheckID"])))
            if check.get("ServiceID"):
                gets.append(Get(service_key(name, check["ServiceID"])))
        result = await self.store.txn((), gets)
        snap = CatalogSnapshot(revision=result.revision, index=0)
        for kvs in result.ranges():
            for kv in kvs:
                _add_record(snap, kv)
        existing = snap.nodes.get(name)
        node_changes = node is not None and (existing is None or {**existing.data, **node} != existing.data)
        if node_changes or any(not c.get("ServiceID") for c in checks):
            for kv in (await self.store.range(f"{SERVICES}{_q(name)}/", prefix=True)).kvs:
                _add_record(snap, kv)
        return snap

    # ---- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _names_on_node(snap: CatalogSnapshot, node: str) -> set[str]:
        return {e.data.get("Service", "") for e in snap.services_of_node(node)} - {""}

    async def _names_for_status(self, node: str, check: dict[str, Any]) -> set[str]:
        """Like _names_for_check, without parsing the whole catalog: status changes are the hot path."""
        if check.get("ServiceID"):
            return {check.get("ServiceName") or ""} - {""}
        rr = await self.store.range(f"{SERVICES}{_q(node)}/", prefix=True)
        names = set()
        for kv in rr.kvs:
            entry = _entry(kv)
            if entry is not None and entry.data.get("Service"):
                names.add(entry.data["Service"])
        return names

    def _names_for_check(self, snap: CatalogSnapshot, node: str, entry: Entry) -> set[str]:
        """Service names whose health answers a change to this check alters."""
        if entry.data.get("ServiceID"):
            name = entry.data.get("ServiceName") or ""
            svc = snap.services.get((node, entry.data["ServiceID"]))
            if svc is not None:
                name = svc.data.get("Service", name)
            return {name} - {""}
        return self._names_on_node(snap, node)


