"""The store over HTTP (/api/v1/store): reads, writes, txns, leases and a watch stream.

This is how processes other than the server reach the store (DESIGN.md); it never opens SQLite itself
and never bypasses the store's validation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import orjson
from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_any_body
from shipyard.errors import BadRequest
from shipyard.store import Compacted, Compare, Delete, Event, Get, KeyValue, Put, StoreError

routes = web.RouteTableDef()

PREFIX = "/api/v1/store"
MAX_VALUE = 1536 * 1024  # etcd's default request limit is 1.5 MiB
WATCH_HEARTBEAT = 15.0


def kv_json(kv: KeyValue) -> dict[str, Any]:
    return {
        "key": kv.key,
        "value": base64.b64encode(kv.value).decode(),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    }


def event_json(event: Event) -> dict[str, Any]:
    return {
        "type": event.type.name,
        "kv": kv_json(event.kv),
        "prev_kv": kv_json(event.prev_kv) if event.prev_kv else None,
    }


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() in ("1", "true", "")


def _int_param(request: web.Request, name: str, default: int = 0) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise BadRequest(f"query parameter {name} must not be negative")
    return value


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if "\x00" in key:
        raise BadRequest("keys must not contain NUL bytes")
    return key


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


@routes.get(PREFIX + "/kv/{key:.*}")
async def store_range(request: web.Request) -> web.Response:
    result = await platform_of(request).store.range(_key(request), prefix=_flag(request, "prefix"))
    return _json({"revision": result.revision, "index": result.index, "kvs": [kv_json(kv) for kv in result.kvs]})


@routes.put(PREFIX + "/kv/{key:.*}")
@accepts_any_body
async def store_put(request: web.Request) -> web.Response:
    key = _key(request)
    if not key:
        raise BadRequest("missing key")
    body = await read_limited(request, MAX_VALUE, what="value")
    revision = await platform_of(request).store.put(key, body, lease=_int_param(request, "lease"))
    return _json({"revision": revision})


@routes.delete(PREFIX + "/kv/{key:.*}")
async def store_delete(request: web.Request) -> web.Response:
    deleted, revision = await platform_of(request).store.delete(_key(request), prefix=_flag(request, "prefix"))
    return _json({"deleted": deleted, "revision": revision})


def _parse_compare(raw: Any, i: int) -> Compare:
    if not isinstance(raw, dict):
        raise BadRequest(f"compare[{i}] must be an object")
    key, target, op = raw.get("key"), raw.get("target"), raw.get("op", "=")
    if not isinstance(key, str):
        raise BadRequest(f"compare[{i}].key must be a string")
    if target not in ("version", "create", "mod", "value", "lease"):
        raise BadRequest(f"compare[{i}].target must be one of version, create, mod, value, lease")
    if op not in ("=", "!=", "<", ">"):
        raise BadRequest(f"compare[{i}].op must be one of =, !=, <, >")
    value: int | bytes | None
    if target == "value":
        value = None if raw.get("value") is None else _b64(raw.get("value"), f"compare[{i}].value")
    else:
        value = raw.get("value", 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"compare[{i}].value must be an integer for target {target}")
    return Compare(key, target, op, value)


def _parse_op(raw: Any, where: str) -> Put | Delete | Get:
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str):
        raise BadRequest(f"{where} must be an object with a string key")
    kind = raw.get("op")
    prefix = bool(raw.get("prefix", False))
    if kind == "put":
        lease = raw.get("lease", 0)
        if not isinstance(lease, int) or isinstance(lease, bool):
            raise BadRequest(f"{where}.lease must be an integer")
        return Put(raw["key"], _b64(raw.get("value", ""), f"{where}.value"), lease)
    if kind == "delete":
        return Delete(raw["key"], prefix)
    if kind == "get":
        return Get(raw["key"], prefix)
    raise BadRequest(f"{where}.op must be put, delete or get")


def _txn_response(response: object) -> Any:
    if response is None:
        return None
    if isinstance(response, KeyValue):
        return kv_json(response)
    assert isinstance(response, list)
    return [kv_json(kv) for kv in response]


@routes.post(PREFIX + "/txn")
async def store_txn(request: web.Request) -> web.Response:
    body = await _json_body(request)
    for name in ("compare", "success", "failure"):
        if not isinstance(body.get(name, []), list):
            raise BadRequest(f"{name} must be a list")
    compares = [_parse_compare(c, i) for i, c in enumerate(body.get("compare", []))]
    success = [_parse_op(op, f"success[{i}]") for i, op in enumerate(body.get("success", []))]
    failure = [_parse_op(op, f"failure[{i}]") for i, op in enumerate(body.get("failure", []))]
    result = await platform_of(request).store.txn(compares, success, failure)
    return _json(
        {
            "succeeded": result.succeeded,
            "revision": result.revision,
            "responses": [_txn_response(r) for r in result.responses],
        }
    )


# The watch streams open now: a stopping server ends them (end_watch_streams) instead of waiting out its shutdown
# timeout for handlers whose clients (agents, gateway workers) have gone and that notice only at the next heartbeat.
class WatchStreams:
    def __init__(self) -> None:
        self.open: set[Any] = set()
        self.closing = False


WATCH_STREAMS: web.AppKey[WatchStreams] = web.AppKey("watch-streams", WatchStreams)


async def end_watch_streams(app: web.Application) -> None:
    """on_shutdown: every open watch stream ends (its client re-watches from its last revision elsewhere)."""
    streams = app.get(WATCH_STREAMS)
    if streams is not None:
        streams.closing = True
        for watcher in list(streams.open):
            watcher.cancel()


@routes.get(PREFIX + "/watch/{key:.*}")
async def store_watch(request: web.Request) -> web.StreamResponse:
    """A stream of newline-delimited JSON: one line per revision's events, blank heartbeats between."""
    store = platform_of(request).store
    try:
        watcher = store.watch(
            _key(request), prefix=_flag(request, "prefix"), from_revision=_int_param(request, "from_revision")
        )
    except Compacted as exc:
        return _json({"error": exc.message, "detail": {"compact_revision": exc.compact_revision}}, status=410)
    streams = request.app.get(WATCH_STREAMS)
    if streams is not None:
        streams.open.add(watcher)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await response.prepare(request)
    await response.write(orjson.dumps({"revision": store.revision, "events": []}) + b"\n")
    try:
        while True:
            try:
                batch = await asyncio.wait_for(watcher.__anext__(), WATCH_HEARTBEAT)
            except TimeoutError:
                await response.write(b"\n")
                continue
            except StopAsyncIteration:
                break
            line = {"revision": batch[-1].revision, "events": [event_json(ev) for ev in batch]}
            await response.write(orjson.dumps(line) + b"\n")
    except StoreError as exc:  # overflow: the client re-watches from its last revision + 1
        await response.write(orjson.dumps({"error": exc.message}) + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    except Exception:
        if streams is None or not streams.closing:
            raise  # ended by the server's shutdown otherwise (an etcd watch then fails as its stream is closed)
    finally:
        watcher.cancel()
        if streams is not None:
            streams.open.discard(watcher)
    return response


@routes.post(PREFIX + "/compact")
async def store_compact(request: web.Request) -> web.Response:
    """Drops history up to a revision, as etcd's Compact does; later watches from before it get 410."""
    body = await _json_body(request)
    revision = body.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision <= 0:
        raise BadRequest("revision must be a positive integer")
    store = platform_of(request).store
    await store.compact(revision)
    return _json({"compact_revision": store.compact_revision})


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await read_limited(request, MAX_VALUE * 2))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


@routes.post(PREFIX + "/leases")
async def lease_grant(request: web.Request) -> web.Response:
    ttl = (await _json_body(request)).get("ttl")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
        raise BadRequest("ttl must be a positive integer (seconds)")
    lease = await platform_of(request).store.grant_lease(ttl)
    return _json({"id": lease.id, "ttl": lease.ttl}, status=201)


@routes.put(PREFIX + "/leases/{id}/keepalive")
async def lease_keepalive(request: web.Request) -> web.Response:
    ttl = await platform_of(request).store.keepalive(_lease_id(request))
    return _json({"ttl": ttl})


@routes.delete(PREFIX + "/leases/{id}")
async def lease_revoke(request: web.Request) -> web.Response:
    await platform_of(request).store.revoke_lease(_lease_id(request))
    return _json({"revoked": True})


def _lease_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit():
        raise BadRequest(f"lease id must be an integer, got {raw!r}")
    return int(raw)
