"""The gateway admin API (/api/gateway/...), modelled on Kong's Admin API: services, routes, consumers and their
credentials, plugins, upstreams and targets, and POST /config for declarative apply (diff or apply).

A thin edge over gateway.entities and gateway.declarative: every write is one store txn that also guards unique
values; it never lets an invalid plugin config into the store and never writes outside gateway/.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.errors import ShipyardError
from shipyard.gateway import declarative
from shipyard.gateway.credential_hash import (
    HASH_KEY_PATH,
    KeyHasher,
    hasher_from_value,
    new_hash_key_value,
    redacted,
    seal_key,
)
from shipyard.gateway.entities import (
    CONSUMERS,
    CREDENTIAL_PATHS,
    CREDENTIALS,
    PLUGINS,
    ROUTES,
    SERVICES,
    UPSTREAMS,
    Kind,
    SchemaError,
    UniqueViolation,
    dumps,
    new_id,
    normalize_consumer,
    normalize_credential,
    normalize_plugin,
    normalize_route,
    normalize_service,
    normalize_target,
    normalize_upstream,
    stamp,
    target_kind,
    unique_keys,
)
from shipyard.gateway.plugins.base import PLUGINS as PLUGIN_CLASSES
from shipyard.gateway.supervisor import GatewaySupervisor
from shipyard.store import Compare, Delete, KeyValue, Put, Store

routes = web.RouteTableDef()
PREFIX = "/api/gateway"
MAX_BODY = 1 << 20
MAX_CONFIG_BODY = 8 << 20


class NotFoundError(Exception):
    pass


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def kong_errors(handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[[web.Request], Any]:
    """Kong's error bodies: 400 schema violation, 404 Not found, 409 unique violation."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except SchemaError as exc:
            return _json({"message": str(exc), "name": "schema violation", "code": 2, "fields": exc.fields}, 400)
        except UniqueViolation as exc:
            return _json({"message": str(exc), "name": "unique constraint violation", "code": 5,
                          "fields": exc.fields}, 409)
        except NotFoundError:
            return _json({"message": "Not found"}, 404)
        except ShipyardError as exc:
            return _json({"message": exc.message}, exc.status)

    return wrapper


async def read_body(request: web.Request, limit: int = MAX_BODY) -> dict[str, Any]:
    """JSON only: Kong's form encoding is what a cross-site HTML form sends, so the request guard refuses it."""
    raw = await read_limited(request, limit)
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError({"@entity": f"request body is not valid JSON: {exc}"}) from None
    if not isinstance(data, dict):
        raise SchemaError({"@entity": "expected a JSON object"})
    return data


def store_of(request: web.Request) -> Store:
    return platform_of(request).store


def _decode(kv: KeyValue) -> dict[str, Any]:
    return orjson.loads(kv.value)


# ---- generic store operations --------------------------------------------------------------------------------


async def list_records(store: Any, kind: Kind) -> list[dict[str, Any]]:
    result = await store.range(kind.prefix, prefix=True)
    out = []
    for kv in result.kvs:
        if "/" in kv.key[len(kind.prefix):]:
            continue  # a deeper collection (targets of another upstream)
        out.append(_decode(kv))
    return out


async def find(store: Any, kind: Kind, ident: str, *, also: tuple[str, ...] = ()) -> tuple[KeyValue, dict[str, Any]]:
    """An entity by its key field, or by id / a unique name field (Kong accepts either in URLs)."""
    kv = await store.get(kind.prefix + quote(ident, safe=""))
    if kv is not None:
        return kv, _decode(kv)
    fields = {"id", *also}
    result = await store.range(kind.prefix, prefix=True)
    for kv in result.kvs:
        if "/" in kv.key[len(kind.prefix):]:
            continue
        record = _decode(kv)
        if any(record.get(f) == ident for f in fields):
            return kv, record
    raise NotFoundError(ident)


async def _explain_conflict(store: Any, kind: Kind, record: Mapping[str, Any], guards: dict[str, dict[str, Any]]
                            ) -> UniqueViolation:
    if await store.get(kind.key(record)) is not None:
        return UniqueViolation({kind.key_field: record[kind.key_field]})
    for key, fields in guards.items():
        if await store.get(key) is not None:
            return UniqueViolation(fields)
    return UniqueViolation({kind.key_field: record[kind.key_field]})


async def create(store: Any, kind: Kind, record: dict[str, Any]) -> dict[str, Any]:
    record["id"] = record.get("id") or new_id()
    stamp(record)
    key = kind.key(record)
    guards = unique_keys(kind, record)
    compares = [Compare(key, "version", "=", 0), *(Compare(k, "version", "=", 0) for k in guards)]
    ops = [Put(key, dumps(record)), *(Put(k, key.encode()) for k in guards)]
    result = await store.txn(compares, ops, [])
    if not result.succeeded:
        raise await _explain_conflict(store, kind, record, guards)
    return record


async def replace(store: Any, kind: Kind, kv: KeyValue, old: dict[str, Any], record: dict[str, Any]
                  ) -> dict[str, Any]:
    record["id"] = old.get("id") or record.get("id") or new_id()
    stamp(record, old)
    key = kind.key(record)
    if key != kv.key:
        raise SchemaError({kind.key_field: "cannot be changed"})
    old_guards, new_guards = unique_keys(kind, old), unique_keys(kind, record)
    added = {k: v for k, v in new_guards.items() if k not in old_guards}
    compares = [Compare(key, "mod", "=", kv.mod_revision), *(Compare(k, "version", "=", 0) for k in added)]
    ops: list[Any] = [Delete(k) for k in old_guards if k not in new_guards]
    ops += [Put(key, dumps(record)), *(Put(k, key.encode()) for k in added)]
    result = await store.txn(compares, ops, [])
    if not result.succeeded:
        for k, fields in added.items():
            if await store.get(k) is not None:
                raise UniqueViolation(fields)
        raise ShipyardError("the entity changed while it was being updated; try again", status=409)
    return record


def delete_ops(kind: Kind, kv: KeyValue, record: Mapping[str, Any]) -> list[Any]:
    return [Delete(kv.key), *(Delete(k) for k in unique_keys(kind, record))]


async def dependents(store: Any, field: str, value: str, kinds: list[Kind]) -> list[tuple[Kind, KeyValue, dict]]:
    out = []
    for kind in kinds:
        result = await store.range(kind.prefix, prefix=True)
        for kv in result.kvs:
            record = _decode(kv)
            if record.get(field) == value:
                out.append((kind, kv, record))
    return out


async def require(store: Any, kind: Kind, ident: str | None, field: str, *, also: tuple[str, ...] = ()) -> str:
    """The key-field value of a referenced entity, or Kong's foreign-key 400."""
    try:
        _, record = await find(store, kind, str(ident), also=also)
    except NotFoundError:
        raise SchemaError({field: f"the foreign key '{ident}' does not reference an existing '{kind.name}' "
                                  f"entity."}) from None
    return str(record[kind.key_field])


def page(items: list[dict[str, Any]], request: web.Request) -> web.Response:
    items.sort(key=lambda r: (r.get("created_at", 0), str(r.get("id"))))
    try:
        size = max(1, min(1000, int(request.query.get("size", "100"))))
        offset = max(0, int(request.query.get("offset", "0")))
    except ValueError:
        raise SchemaError({"size": "expected an integer"}) from None
    tags = request.query.get("tags")
    if tags:
        wanted = set(tags.split(","))
        items = [r for r in items if wanted & set(r.get("tags") or [])]
    chunk = items[offset:offset + size]
    nxt = None
    if offset + size < len(items):
        nxt = f"{request.path}?offset={offset + size}&size={size}"
    return _json({"data": chunk, "next": nxt, "offset": str(offset + size) if nxt else None})


# ---- services ------------------------------------------------------------------------------------------------


@routes.get(PREFIX + "/metrics")
async def gateway_metrics(request: web.Request) -> web.Response:
    """Kong serves the prometheus plugin's metrics on its Admin API: so do we, summed over every worker."""
    gateway = platform_of(request).extras.get("gateway")
    if not isinstance(gateway, GatewaySupervisor):
        raise ShipyardError("the gateway is not running on this server (--no-gateway)", status=404)
    text = await asyncio.to_thread(gateway.metrics_text)
    return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.get(PREFIX + "/services")
@kong_errors
async def list_services(request: web.Request) -> web.Response:
    return page(await list_records(store_of(request), SERVICES), request)


@routes.post(PREFIX + "/services")
@kong_errors
async def create_service(request: web.Request) -> web.Response:
    record = normalize_service(await read_body(request))
    return _json(await create(store_of(request), SERVICES, record), 201)


@routes.get(PREFIX + "/services/{service}")
@kong_errors
async def get_service(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), SERVICES, request.match_info["service"])
    return _json(record)


async def _update(request: web.Request, kind: Kind, normalize: Callable[[dict[str, Any]], dict[str, Any]],
                  ident: str, *, put: bool, also: tuple[str, ...] = (), fixed: Mapping[str, Any] | None = None,
                  check: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> web.Response:
    store = store_of(request)
    body = await read_body(request)
    try:
        kv, old = await find(store, kind, ident, also=also)
    except NotFoundError:
        if not put:
            raise
        body.setdefault(kind.key_field if kind.key_field != "id" else (also[0] if also else "id"), ident)
        record = normalize({**body, **(fixed or {})})
        if check:
            await check(record)
        return _json(await create(store, kind, record), 200)
    merged = {**body} if put else {**{k: v for k, v in old.items() if k not in ("created_at", "updated_at")}, **body}
    merged.setdefault(kind.key_field, old[kind.key_field])
    record = normalize({**merged, **(fixed or {})})
    if check:
        await check(record)
    return _json(await replace(store, kind, kv, old, record))


@routes.patch(PREFIX + "/services/{service}")
@kong_errors
async def patch_service(request: web.Request) -> web.Response:
    return await _update(request, SERVICES, normalize_service, request.match_info["service"], put=False)


@routes.put(PREFIX + "/services/{service}")
@kong_errors
async def put_service(request: web.Request) -> web.Response:
    return await _update(request, SERVICES, normalize_service, request.match_info["service"], put=True)


@routes.delete(PREFIX + "/services/{service}")
@kong_errors
async def delete_service(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await find(store, SERVICES, request.match_info["service"])
    except NotFoundError:
        return web.Response(status=204)
    if await dependents(store, "service", record["name"], [ROUTES]):
        raise SchemaError({"@entity": "an existing 'routes' entity references this 'services' entity"})
    ops = delete_ops(SERVICES, kv, record)
    for kind, pkv, plugin in await dependents(store, "service", record["name"], [PLUGINS]):
        ops += delete_ops(kind, pkv, plugin)
    await store.txn([Compare(kv.key, "mod", "=", kv.mod_revision)], ops, [])
    return web.Response(status=204)


# ---- routes --------------------------------------------------------------------------------------------------


async def _check_route(request: web.Request, record: dict[str, Any]) -> None:
    record["service"] = await require(store_of(request), SERVICES, record["service"], "service")


@routes.get(PREFIX + "/routes")
@kong_errors
async def list_routes(request: web.Request) -> web.Response:
    return page(await list_records(store_of(request), ROUTES), request)


@routes.post(PREFIX + "/routes")
@kong_errors
async def create_route(request: web.Request) -> web.Response:
    record = normalize_route(await read_body(request))
    await _check_route(request, record)
    return _json(await create(store_of(request), ROUTES, record), 201)


@routes.get(PREFIX + "/services/{service}/routes")
@kong_errors
async def list_service_routes(request: web.Request) -> web.Response:
    store = store_of(request)
    _, service = await find(store, SERVICES, request.match_info["service"])
    return page([r for r in await list_records(store, ROUTES) if r.get("service") == service["name"]], request)


@routes.post(PREFIX + "/services/{service}/routes")
@kong_errors
async def create_service_route(request: web.Request) -> web.Response:
    store = store_of(request)
    _, service = await find(store, SERVICES, request.match_info["service"])
    record = normalize_route({**await read_body(request), "service": service["name"]})
    return _json(await create(store, ROUTES, record), 201)


@routes.get(PREFIX + "/routes/{route}")
@kong_errors
async def get_route(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), ROUTES, request.match_info["route"], also=("name",))
    return _json(record)


@routes.patch(PREFIX + "/routes/{route}")
@kong_errors
async def patch_route(request: web.Request) -> web.Response:
    return await _update(request, ROUTES, normalize_route, request.match_info["route"], put=False, also=("name",),
                         check=functools.partial(_check_route, request))


@routes.put(PREFIX + "/routes/{route}")
@kong_errors
async def put_route(request: web.Request) -> web.Response:
    return await _update(request, ROUTES, normalize_route, request.match_info["route"], put=True, also=("name",),
                         check=functools.partial(_check_route, request))


@routes.delete(PREFIX + "/routes/{route}")
@kong_errors
async def delete_route(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await find(store, ROUTES, request.match_info["route"], also=("name",))
    except NotFoundError:
        return web.Response(status=204)
    ops = delete_ops(ROUTES, kv, record)
    for kind, pkv, plugin in await dependents(store, "route", record["id"], [PLUGINS]):
        ops += delete_ops(kind, pkv, plugin)
    await store.txn([], ops, [])
    return web.Response(status=204)


# ---- consumers and credentials -------------------------------------------------------------------------------


@routes.get(PREFIX + "/consumers")
@kong_errors
async def list_consumers(request: web.Request) -> web.Response:
    return page(await list_records(store_of(request), CONSUMERS), request)


@routes.post(PREFIX + "/consumers")
@kong_errors
async def create_consumer(request: web.Request) -> web.Response:
    record = normalize_consumer(await read_body(request))
    return _json(await create(store_of(request), CONSUMERS, record), 201)


@routes.get(PREFIX + "/consumers/{consumer}")
@kong_errors
async def get_consumer(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), CONSUMERS, request.match_info["consumer"], also=("username",))
    return _json(record)


@routes.patch(PREFIX + "/consumers/{consumer}")
@kong_errors
async def patch_consumer(request: web.Request) -> web.Response:
    return await _update(request, CONSUMERS, normalize_consumer, request.match_info["consumer"], put=False,
                         also=("username",))


@routes.put(PREFIX + "/consumers/{consumer}")
@kong_errors
async def put_consumer(request: web.Request) -> web.Response:
    return await _update(request, CONSUMERS, normalize_consumer, request.match_info["consumer"], put=True,
                         also=("username",))


@routes.delete(PREFIX + "/consumers/{consumer}")
@kong_errors
async def delete_consumer(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await find(store, CONSUMERS, request.match_info["consumer"], also=("username",))
    except NotFoundError:
        return web.Response(status=204)
    ops = delete_ops(CONSUMERS, kv, record)
    for kind, ckv, dep in await dependents(store, "consumer", record["id"], [*CREDENTIALS.values(), PLUGINS]):
        ops += delete_ops(kind, ckv, dep)
    await store.txn([], ops, [])
    return web.Response(status=204)


def _credential_kind(request: web.Request) -> tuple[str, Kind]:
    kind = CREDENTIAL_PATHS.get(request.match_info["kind"])
    if kind is None:
        raise NotFoundError(request.match_info["kind"])
    return kind, CREDENTIALS[kind]


@routes.get(PREFIX + "/consumers/{consumer}/{kind:key-auth|jwt|basic-auth|acls}")
@kong_errors
async def list_credentials(request: web.Request) -> web.Response:
    store = store_of(request)
    _, consumer = await find(store, CONSUMERS, request.match_info["consumer"], also=("username",))
    name, kind = _credential_kind(request)
    return page([redacted(name, c) for c in await list_records(store, kind) if c.get("consumer") == consumer["id"]],
                request)


@routes.post(PREFIX + "/consumers/{consumer}/{kind:key-auth|jwt|basic-auth|acls}")
@kong_errors
async def create_credential(request: web.Request) -> web.Response:
    store = store_of(request)
    _, consumer = await find(store, CONSUMERS, request.match_info["consumer"], also=("username",))
    name, kind = _credential_kind(request)
    record = normalize_credential(name, {**await read_body(request), "consumer": consumer["id"]})
    shown = seal_key(record, await key_hasher(store)) if name == "key-auth" else None
    return _json(shown_once(name, await create(store, kind, record), shown), 201)


async def key_hasher(store: Any) -> KeyHasher:
    """This installation's key-auth hasher; its hash key is made on first use (one txn, whoever wins)."""
    kv = await store.get(HASH_KEY_PATH)
    if kv is None:
        await store.txn([Compare(HASH_KEY_PATH, "version", "=", 0)], [Put(HASH_KEY_PATH, new_hash_key_value())], [])
        kv = await store.get(HASH_KEY_PATH)
    return hasher_from_value(kv.value if kv is not None else None)


async def seal_stored_keys(store: Any) -> int:
    """key-auth records an older version stored with the key in clear are rewritten with its hash (at server start;
    the store's history keeps the old values until it is compacted). Returns how many were."""
    kind = CREDENTIALS["key-auth"]
    legacy = [(kv, record) for kv in (await store.range(kind.prefix, prefix=True)).kvs
              if (record := _decode(kv)).get("key")]
    if legacy:
        hasher = await key_hasher(store)
        for kv, old in legacy:
            new = {k: v for k, v in old.items() if k not in ("created_at", "updated_at")}
            seal_key(new, hasher)
            await replace(store, kind, kv, old, new)
    return len(legacy)


def shown_once(kind: str, record: Mapping[str, Any], key: str | None) -> dict[str, Any]:
    """A credential as its write answers it: the new key-auth key and the JWT secret are shown here, once; reads
    redact them (the key is not even stored)."""
    out = redacted(kind, record)
    if key is not None:
        out["key"] = key
    if kind == "jwt" and record.get("secret"):
        out["secret"] = record["secret"]
    return out


async def _find_credential(request: web.Request) -> tuple[str, Kind, KeyValue, dict[str, Any]]:
    store = store_of(request)
    _, consumer = await find(store, CONSUMERS, request.match_info["consumer"], also=("username",))
    name, kind = _credential_kind(request)
    field = {"key-auth": "key", "jwt": "key", "basic-auth": "username", "acl": "group"}[name]
    ident = request.match_info["cred"]
    try:
        kv, record = await find(store, kind, ident, also=(field,))
    except NotFoundError:
        if name != "key-auth":
            raise
        # Kong finds a key-auth credential by its key too: the store has the key's hash.
        kv, record = await find(store, kind, (await key_hasher(store))(ident), also=("key_hash",))
    if record.get("consumer") != consumer["id"]:
        raise NotFoundError(request.match_info["cred"])
    return name, kind, kv, record


@routes.get(PREFIX + "/consumers/{consumer}/{kind:key-auth|jwt|basic-auth|acls}/{cred}")
@kong_errors
async def get_credential(request: web.Request) -> web.Response:
    name, _, _, record = await _find_credential(request)
    return _json(redacted(name, record))


@routes.patch(PREFIX + "/consumers/{consumer}/{kind:key-auth|jwt|basic-auth|acls}/{cred}")
@kong_errors
async def patch_credential(request: web.Request) -> web.Response:
    name, kind, kv, old = await _find_credential(request)
    body = await read_body(request)
    base = {k: v for k, v in old.items() if k not in ("created_at", "updated_at", "kind")}
    if name == "basic-auth":
        base.pop("password", None)
    base.pop("key_hash", None)
    record = normalize_credential(name, {**base, **body, "consumer": old["consumer"]}, existing=old)
    store = store_of(request)
    shown = seal_key(record, await key_hasher(store)) if name == "key-auth" else None
    return _json(shown_once(name, await replace(store, kind, kv, old, record), shown if "key" in body else None))


@routes.delete(PREFIX + "/consumers/{consumer}/{kind:key-auth|jwt|basic-auth|acls}/{cred}")
@kong_errors
async def delete_credential(request: web.Request) -> web.Response:
    try:
        _, kind, kv, record = await _find_credential(request)
    except NotFoundError:
        return web.Response(status=204)
    await store_of(request).txn([], delete_ops(kind, kv, record), [])
    return web.Response(status=204)


# ---- plugins -------------------------------------------------------------------------------------------------


async def _check_plugin(store: Any, record: dict[str, Any]) -> None:
    """Foreign keys of a plugin name existing entities (by id or name); stored as service name / route id /
    consumer id, which is what the route-table builder matches on."""
    if record.get("service"):
        record["service"] = await require(store, SERVICES, record["service"], "service")
    if record.get("route"):
        record["route"] = await require(store, ROUTES, record["route"], "route", also=("name",))
    if record.get("consumer"):
        record["consumer"] = await require(store, CONSUMERS, record["consumer"], "consumer", also=("username",))


def _scope_of(request: web.Request) -> dict[str, str]:
    return {k: request.match_info[k] for k in ("service", "route", "consumer") if k in request.match_info}


async def _scoped_plugins(request: web.Request) -> list[dict[str, Any]]:
    store = store_of(request)
    scope = _scope_of(request)
    records = await list_records(store, PLUGINS)
    if "service" in scope:
        _, service = await find(store, SERVICES, scope["service"])
        records = [p for p in records if p.get("service") == service["name"]]
    if "route" in scope:
        _, route = await find(store, ROUTES, scope["route"], also=("name",))
        records = [p for p in records if p.get("route") == route["id"]]
    if "consumer" in scope:
        _, consumer = await find(store, CONSUMERS, scope["consumer"], also=("username",))
        records = [p for p in records if p.get("consumer") == consumer["id"]]
    return records


@routes.get(PREFIX + "/plugins")
@routes.get(PREFIX + "/services/{service}/plugins")
@routes.get(PREFIX + "/routes/{route}/plugins")
@routes.get(PREFIX + "/consumers/{consumer}/plugins")
@kong_errors
async def list_plugins(request: web.Request) -> web.Response:
    return page(await _scoped_plugins(request), request)


@routes.post(PREFIX + "/plugins")
@routes.post(PREFIX + "/services/{service}/plugins")
@routes.post(PREFIX + "/routes/{route}/plugins")
@routes.post(PREFIX + "/consumers/{consumer}/plugins")
@kong_errors
async def create_plugin(request: web.Request) -> web.Response:
    store = store_of(request)
    scope = _scope_of(request)
    for k, v in scope.items():  # the URL names an entity that must exist: 404 otherwise
        kind = {"service": SERVICES, "route": ROUTES, "consumer": CONSUMERS}[k]
        await find(store, kind, v, also=("name", "username"))
    record = normalize_plugin({**await read_body(request), **scope})
    await _check_plugin(store, record)
    return _json(await create(store, PLUGINS, record), 201)


@routes.get(PREFIX + "/plugins/enabled")
@kong_errors
async def enabled_plugins(request: web.Request) -> web.Response:
    return _json({"enabled_plugins": sorted(PLUGIN_CLASSES)})


@routes.get(PREFIX + "/plugins/{plugin}")
@kong_errors
async def get_plugin(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), PLUGINS, request.match_info["plugin"])
    return _json(record)


@routes.patch(PREFIX + "/plugins/{plugin}")
@kong_errors
async def patch_plugin(request: web.Request) -> web.Response:
    store = store_of(request)
    kv, old = await find(store, PLUGINS, request.match_info["plugin"])
    body = await read_body(request)
    merged = {k: v for k, v in old.items() if k not in ("created_at", "updated_at")}
    if isinstance(body.get("config"), Mapping):
        body["config"] = {**old.get("config", {}), **body["config"]}  # Kong merges config on PATCH
    record = normalize_plugin({**merged, **body})
    await _check_plugin(store, record)
    return _json(await replace(store, PLUGINS, kv, old, record))


@routes.delete(PREFIX + "/plugins/{plugin}")
@kong_errors
async def delete_plugin(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await find(store, PLUGINS, request.match_info["plugin"])
    except NotFoundError:
        return web.Response(status=204)
    await store.txn([], delete_ops(PLUGINS, kv, record), [])
    return web.Response(status=204)


# ---- upstreams and targets -----------------------------------------------------------------------------------


@routes.get(PREFIX + "/upstreams")
@kong_errors
async def list_upstreams(request: web.Request) -> web.Response:
    return page(await list_records(store_of(request), UPSTREAMS), request)


@routes.post(PREFIX + "/upstreams")
@kong_errors
async def create_upstream(request: web.Request) -> web.Response:
    record = normalize_upstream(await read_body(request))
    return _json(await create(store_of(request), UPSTREAMS, record), 201)


@routes.get(PREFIX + "/upstreams/{upstream}")
@kong_errors
async def get_upstream(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), UPSTREAMS, request.match_info["upstream"])
    return _json(record)


@routes.patch(PREFIX + "/upstreams/{upstream}")
@kong_errors
async def patch_upstream(request: web.Request) -> web.Response:
    return await _update(request, UPSTREAMS, normalize_upstream, request.match_info["upstream"], put=False)


@routes.put(PREFIX + "/upstreams/{upstream}")
@kong_errors
async def put_upstream(request: web.Request) -> web.Response:
    return await _update(request, UPSTREAMS, normalize_upstream, request.match_info["upstream"], put=True)


@routes.delete(PREFIX + "/upstreams/{upstream}")
@kong_errors
async def delete_upstream(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await find(store, UPSTREAMS, request.match_info["upstream"])
    except NotFoundError:
        return web.Response(status=204)
    tkind = target_kind(record["name"])
    ops = delete_ops(UPSTREAMS, kv, record)
    for tkv in (await store.range(tkind.prefix, prefix=True)).kvs:
        ops += delete_ops(tkind, tkv, _decode(tkv))
    await store.txn([], ops, [])
    return web.Response(status=204)


@routes.get(PREFIX + "/upstreams/{upstream}/targets")
@kong_errors
async def list_targets(request: web.Request) -> web.Response:
    store = store_of(request)
    _, upstream = await find(store, UPSTREAMS, request.match_info["upstream"])
    return page(await list_records(store, target_kind(upstream["name"])), request)


@routes.post(PREFIX + "/upstreams/{upstream}/targets")
@kong_errors
async def create_target(request: web.Request) -> web.Response:
    store = store_of(request)
    _, upstream = await find(store, UPSTREAMS, request.match_info["upstream"])
    record = normalize_target({**await read_body(request), "upstream": upstream["name"]})
    return _json(await create(store, target_kind(upstream["name"]), record), 201)


@routes.delete(PREFIX + "/upstreams/{upstream}/targets/{target}")
@kong_errors
async def delete_target(request: web.Request) -> web.Response:
    store = store_of(request)
    _, upstream = await find(store, UPSTREAMS, request.match_info["upstream"])
    tkind = target_kind(upstream["name"])
    try:
        kv, record = await find(store, tkind, request.match_info["target"], also=("target",))
    except NotFoundError:
        return web.Response(status=204)
    await store.txn([], delete_ops(tkind, kv, record), [])
    return web.Response(status=204)


# ---- declarative config -------------------------------------------------------------------------------------


@routes.post(PREFIX + "/config")
@kong_errors
async def apply_config(request: web.Request) -> web.Response:
    """Body: {"config": <gateway.yaml as JSON>, "dry_run": bool}. Answers the diff, and applies it unless dry_run."""
    body = await read_body(request, MAX_CONFIG_BODY)
    config = body.get("config")
    if not isinstance(config, Mapping):
        raise SchemaError({"config": "expected the gateway.yaml document as an object"})
    dry_run = body.get("dry_run", False) is True
    store = store_of(request)
    desired = await declarative.desired_state(config)
    current = await store.range(declarative.ROOT, prefix=True)
    plan = await declarative.plan_changes(desired, current.kvs)
    applied = False
    if plan.changes and not dry_run:
        applied = await declarative.apply_plan(store, plan, current.revision)
        if not applied:
            raise ShipyardError("the gateway config changed while applying; run apply again", status=409)
    return _json({"changes": [c.as_json() for c in plan.changes], "applied": applied, "dry_run": dry_run})


@routes.route("*", PREFIX + "/{tail:.*}")
async def unknown_gateway_path(request: web.Request) -> web.Response:
    """Kong answers unknown admin paths with a JSON 404 (registered last, so every real route wins)."""
    return _json({"message": "Not found"}, 404)
