"""Consul /v1/kv endpoints: reads (single, recurse, keys, raw, blocking), puts with cas/flags/locks, deletes.

Routes and HTTP shapes only; KV semantics live in shipyard.registry.kv.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.consul.common import ConsulError, bad_request, blocking_query, json_response
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_any_body
from shipyard.errors import PayloadTooLarge
from shipyard.registry.kv import MAX_VALUE_SIZE, store_key, validate_key, value_too_large_message

routes = web.RouteTableDef()

_PATH_PREFIX = "/v1/kv/"


def key_of(request: web.Request) -> str:
    """The key from the raw path, decoded strictly: a bad escape or invalid UTF-8 is a 400, not a guess."""
    raw = request.rel_url.raw_path
    if not raw.startswith(_PATH_PREFIX):
        raw = _PATH_PREFIX + request.match_info.get("key", "")
    try:
        key = unquote_to_bytes(raw[len(_PATH_PREFIX):]).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("Invalid key escape: key is not valid UTF-8") from None
    validate_key(key, allow_empty=True)
    return key


def _has(request: web.Request, name: str) -> bool:
    # Consul looks only at whether the parameter is present (`?recurse`, `?recurse=1` alike).
    return name in request.query


def _uint64(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "")
    try:
        value = int(raw, 10)
    except ValueError:
        raise bad_request(f'Invalid {name}: strconv.ParseUint: parsing "{raw}": invalid syntax') from None
    if not 0 <= value < 1 << 64:
        raise bad_request(f'Invalid {name}: strconv.ParseUint: parsing "{raw}": value out of range')
    return value


def _conflicting(request: web.Request, *names: str) -> None:
    if sum(1 for n in names if n in request.query) > 1:
        raise bad_request(f"Conflicting flags: {request.query_string}\n")


def _not_found(index: int) -> web.Response:
    headers = {"X-Consul-Index": str(max(index, 1)), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
    return web.Response(status=404, headers=headers)


@routes.get("/v1/kv/{key:.*}")
async def kv_get(request: web.Request) -> web.StreamResponse:
    platform = platform_of(request)
    kv = platform.kv
    key = key_of(request)
    if _has(request, "keys"):
        separator = request.query.get("separator", request.query.get("seperator", ""))
        keys, index = await blocking_query(
            request, platform.store, lambda: kv.keys(key, separator), store_key(key), prefix=True
        )
        if not keys and key:
            return _not_found(index)
        return json_response(keys, index=index)
    if _has(request, "recurse"):
        entries, index = await blocking_query(
            request, platform.store, lambda: kv.list(key), store_key(key), prefix=True
        )
        if not entries:
            return _not_found(index)
        return json_response([e.to_json() for e in entries], index=index)
    if not key:
        raise bad_request("Missing key name")
    entry, index = await blocking_query(request, platform.store, lambda: kv.get(key), store_key(key), prefix=False)
    if entry is None:
        return _not_found(index)
    if _has(request, "raw"):
        headers = {
            "X-Consul-Index": str(max(index, 1)),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        }
        return web.Response(body=entry.value, headers=headers, content_type="text/plain")
    return json_response([entry.to_json()], index=index)


async def _read_value(request: web.Request, key: str) -> bytes:
    size = request.content_length
    try:
        return await read_limited(request, MAX_VALUE_SIZE)
    except PayloadTooLarge:
        raise ConsulError(413, value_too_large_message(size if size is not None else MAX_VALUE_SIZE + 1)) from None


@routes.put("/v1/kv/{key:.*}")
@accepts_any_body
async def kv_put(request: web.Request) -> web.Response:
    kv = platform_of(request).kv
    key = key_of(request)
    if not key:
        raise bad_request("Missing key name")
    _conflicting(request, "cas", "acquire", "release")
    flags = _uint64(request, "flags") if "flags" in request.query else 0
    cas = _uint64(request, "cas") if "cas" in request.query else None
    value = await _read_value(request, key)
    applied = await kv.put(
        key,
        value,
        flags=flags,
        cas=cas,
        acquire=request.query.get("acquire") if "acquire" in request.query else None,
        release=request.query.get("release") if "release" in request.query else None,
    )
    return json_response(applied)


@routes.delete("/v1/kv/{key:.*}")
async def kv_delete(request: web.Request) -> web.Response:
    kv = platform_of(request).kv
    key = key_of(request)
    _conflicting(request, "recurse", "cas")
    recurse = _has(request, "recurse")
    if not key and not recurse:
        raise bad_request("Missing key name")
    cas = _uint64(request, "cas") if "cas" in request.query else None
    return json_response(await kv.delete(key, recurse=recurse, cas=cas))
