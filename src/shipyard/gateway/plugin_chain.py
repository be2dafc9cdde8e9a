"""Plugin scope resolution (global < service < route < consumer, Kong's precedence) and the consumer index.

Pure functions of store contents, called when a route table is built; never does I/O and never mutates records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

import shipyard.gateway.plugins  # noqa: F401  (registers every plugin in PLUGINS)
from shipyard.gateway.credential_hash import HASH_KEY_PATH, KeyHasher, hasher_from_value, stored_key_hash
from shipyard.gateway.plugins.base import PLUGINS, Consumer, Plugin, PluginConfigError, Reject, RequestContext

log = logging.getLogger("shipyard.gateway.plugins")

CREDENTIAL_KINDS = ("key-auth", "jwt", "basic-auth", "acl")


# ---- reading store contents --------------------------------------------------------------------------


def _decode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return orjson.loads(bytes(value))
        except orjson.JSONDecodeError:
            return None
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


def records_under(store_contents: Any, prefix: str) -> list[dict[str, Any]]:
    """JSON objects stored under `prefix`: accepts {key: bytes|str|dict} or an iterable of KeyValue-like objects."""
    if isinstance(store_contents, Mapping):
        items: Iterable[tuple[str, Any]] = store_contents.items()
    else:
        items = ((kv.key, kv.value) for kv in store_contents)
    out = []
    for key, value in items:
        if key.startswith(prefix):
            record = _decode(value)
            if isinstance(record, dict):
                out.append(record)
    return out


def _value_at(store_contents: Any, wanted: str) -> Any:
    if isinstance(store_contents, Mapping):
        return store_contents.get(wanted)
    return next((kv.value for kv in store_contents if kv.key == wanted), None)


# ---- consumers -----------------------------------------------------------------------------------------


@dataclass
class ConsumerIndex:
    """Credential lookups for auth plugins, built from gateway/consumers/ and gateway/credentials/."""

    consumers: dict[str, Consumer] = field(default_factory=dict)
    by_key: dict[str, tuple[Consumer, dict[str, Any]]] = field(default_factory=dict)
    by_jwt_key: dict[str, tuple[Consumer, dict[str, Any]]] = field(default_factory=dict)
    by_basic_username: dict[str, tuple[Consumer, dict[str, Any]]] = field(default_factory=dict)
    # by_key holds key hashes (the store keeps no key-auth key); a key as sent is hashed once per lookup, and
    # key-auth's fast path remembers the outcome per key as sent, so the hash is not on its hot path.
    hasher: KeyHasher = field(default_factory=lambda: KeyHasher(b""))

    def get(self, consumer_id: str) -> Consumer | None:
        return self.consumers.get(consumer_id)

    def lookup_key(self, key: str) -> tuple[Consumer, dict[str, Any]] | None:
        return self.by_key.get(self.hasher(key))

    def lookup_jwt(self, key: str) -> tuple[Consumer, dict[str, Any]] | None:
        return self.by_jwt_key.get(key)

    def lookup_basic(self, username: str) -> tuple[Consumer, dict[str, Any]] | None:
        return self.by_basic_username.get(username)


def build_consumers(store_contents: Any) -> ConsumerIndex:
    consumers = {c["id"]: c for c in records_under(store_contents, "gateway/consumers/") if c.get("id")}
    groups: dict[str, list[str]] = {}
    creds: list[dict[str, Any]] = []
    for cred in records_under(store_contents, "gateway/credentials/"):
        if cred.get("consumer") not in consumers:
            continue
        if cred.get("kind") == "acl":
            groups.setdefault(cred["consumer"], []).append(str(cred.get("group", "")))
        else:
            creds.append(cred)
    index = ConsumerIndex(hasher=hasher_from_value(_value_at(store_contents, HASH_KEY_PATH)))
    for cid, c in consumers.items():
        index.consumers[cid] = Consumer(
            id=cid, username=str(c.get("username") or ""), custom_id=str(c.get("custom_id") or ""),
            groups=tuple(sorted(groups.get(cid, ()))),
        )
    for cred in creds:
        consumer = index.consumers[cred["consumer"]]
        kind = cred.get("kind")
        if kind == "key-auth" and (key_hash := stored_key_hash(cred, index.hasher)):
            index.by_key[key_hash] = (consumer, cred)
        elif kind == "jwt" and cred.get("key"):
            index.by_jwt_key[str(cred["key"])] = (consumer, cred)
        elif kind == "basic-auth" and cred.get("username"):
            index.by_basic_username[str(cred["username"])] = (consumer, cred)
    return index


# ---- scope resolution ------------------------------------------------------------------------------------


def _ident(entity: str | Mapping[str, Any] | None) -> set[str]:
    if entity is None:
        return set()
    if isinstance(entity, str):
        return {entity} if entity else set()
    return {str(entity[k]) for k in ("id", "name") if entity.get(k)}


def _scope_rank(record: Mapping[str, Any]) -> int:
    """Kong's precedence, most specific first (lower is stronger)."""
    c, r, s = bool(record.get("consumer")), bool(record.get("route")), bool(record.get("service"))
    order = {
        (True, True, True): 0, (True, True, False): 1, (True, False, True): 2, (False, True, True): 3,
        (True, False, False): 4, (False, True, False): 5, (False, False, True): 6, (False, False, False): 7,
    }
    return order[(c, r, s)]


def instantiate(record: Mapping[str, Any]) -> Plugin:
    """A plugin instance from a record {name, config}; PluginConfigError on unknown names or bad config."""
    name = record.get("name")
    cls = PLUGINS.get(str(name))
    if cls is None:
        raise PluginConfigError(f"plugin '{name}' not found")
    config = record.get("config") or {}
    if not isinstance(config, Mapping):
        raise PluginConfigError("config must be an object")
    return cls(config)


@dataclass
class PluginChain:
    """Scope-resolved plugins of one route: `plugins` for anonymous requests, `for_consumer` once one is known."""

    plugins: list[Plugin]
    _consumer_records: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    _base_ranks: dict[str, int] = field(default_factory=dict)
    _cache: dict[str, list[Plugin]] = field(default_factory=dict)

    def for_consumer(self, consumer_id: str | None) -> list[Plugin]:
        if not consumer_id or consumer_id not in self._consumer_records:
            return self.plugins
        cached = self._cache.get(consumer_id)
        if cached is not None:
            return cached
        by_name = {p.name: p for p in self.plugins}
        best: dict[str, tuple[int, dict[str, Any]]] = {}
        for rank, record in self._consumer_records[consumer_id]:
            if rank < self._base_ranks.get(record["name"], 99) and rank < best.get(record["name"], (99, {}))[0]:
                best[record["name"]] = (rank, record)
        for name, (_, record) in best.items():
            try:
                by_name[name] = instantiate(record)
            except PluginConfigError as exc:
                log.warning("skipping plugin %s (%s): %s", name, record.get("id"), exc)
        result = sorted(by_name.values(), key=lambda p: -p.priority)
        self._cache[consumer_id] = result
        return result

    async def run_access(self, ctx: RequestContext) -> Reject | None:
        """Run access phases in priority order; after an auth plugin names the consumer, its own plugins apply
        to the plugins not run yet. The plugins that ran are remembered for run_response/run_log (in
        ctx.shared["_plugins_ran"]; absent when they are exactly `plugins`, the common case, to save a list)."""
        ran: list[Plugin] | None = None  # None while the plugins run so far are plugins[:i]
        current = self.plugins
        consumer_id = None
        i = 0
        while i < len(current):
            plugin = current[i]
            i += 1
            if ran is not None:
                ran.append(plugin)
            try:
                reject = await plugin.access(ctx)
            except Reject as exc:
                reject = exc
            if reject is not None:
                ctx.shared["_plugins_ran"] = ran if ran is not None else current[:i]
                return reject
            if ctx.consumer is not None and ctx.consumer.id != consumer_id:
                consumer_id = ctx.consumer.id
                if current is self.plugins and consumer_id not in self._consumer_records:
                    continue  # no plugin of this consumer's own: the rest of the chain is what it was
                if ran is None:
                    ran = current[:i]
                    ctx.shared["_plugins_ran"] = ran
                done = {p.name for p in ran}
                current = [p for p in self.for_consumer(consumer_id) if p.name not in done]
                current = [p for p in current if p.priority <= plugin.priority]
                i = 0
        return None

    def run_response(self, ctx: RequestContext) -> None:
        for plugin in ctx.shared.get("_plugins_ran", self.plugins):
            plugin.response(ctx)

    def run_log(self, ctx: RequestContext) -> None:
        for plugin in ctx.shared.get("_plugins_ran", self.plugins):
            try:
                plugin.log(ctx)
            except Exception:  # a metrics failure must never fail a request
                log.exception("plugin %s log phase failed", plugin.name)


def resolve_plugins(
    plugin_records: Iterable[Mapping[str, Any]],
    *,
    service: str | Mapping[str, Any] | None,
    route: str | Mapping[str, Any] | None,
) -> PluginChain:
    """The plugins that apply to a route of a service. Records: {id, name, config, enabled, service?, route?,
    consumer?}; `service`/`route` are an id/name or the entity dict. Records whose config fails are skipped."""
    service_ids, route_ids = _ident(service), _ident(route)
    base: dict[str, tuple[int, Mapping[str, Any]]] = {}
    consumer_records: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for record in plugin_records:
        if not record.get("name") or record.get("enabled") is False:
            continue
        if record.get("service") and str(record["service"]) not in service_ids:
            continue
        if record.get("route") and str(record["route"]) not in route_ids:
            continue
        rank = _scope_rank(record)
        if record.get("consumer"):
            consumer_records.setdefault(str(record["consumer"]), []).append((rank, dict(record)))
            continue
        name = str(record["name"])
        if name not in base or rank < base[name][0]:
            base[name] = (rank, record)
    plugins = []
    for name, (_, record) in base.items():
        try:
            plugins.append(instantiate(record))
        except PluginConfigError as exc:
            log.warning("skipping plugin %s (%s): %s", name, record.get("id"), exc)
    plugins.sort(key=lambda p: -p.priority)
    return PluginChain(
        plugins=plugins, _consumer_records=consumer_records, _base_ranks={n: r for n, (r, _) in base.items()},
    )
