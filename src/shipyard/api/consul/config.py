"""Consul /v1/config endpoints: apply (with ?cas), read, list (blocking reads supported) and delete config entries.

Routes and HTTP shapes only; validation and storage live in shipyard.registry.config_entries.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.common import bad_request, blocking_query, json_response, read_json
from shipyard.api.context import platform_of
from shipyard.registry.config_entries import ConfigEntries, check_kind, entry_key, kind_prefix

routes = web.RouteTableDef()


def _entries(request: web.Request) -> ConfigEntries:
    return ConfigEntries(platform_of(request).store)


def cas_param(request: web.Request) -> int | None:
    raw = request.query.get("cas")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise bad_request(f"Request decode failed: invalid cas value {raw!r}")
    return int(raw)


@routes.put("/v1/config")
async def config_apply(request: web.Request) -> web.Response:
    body = await read_json(request)
    return json_response(await _entries(request).set(body, cas_param(request)))


@routes.get("/v1/config/{kind}/{name:.+}")
async def config_get(request: web.Request) -> web.Response:
    entries = _entries(request)
    kind, name = check_kind(request.match_info["kind"]), request.match_info["name"]

    async def read() -> tuple[Any, int, int]:
        entry = await entries.get(kind, name)
        return entry.to_json(), entry.modify_index, entries.store.revision

    result, index = await blocking_query(request, entries.store, read, entry_key(kind, name), prefix=False)
    return json_response(result, index=index)


@routes.get("/v1/config/{kind}")
async def config_list(request: web.Request) -> web.Response:
    entries = _entries(request)
    kind = check_kind(request.match_info["kind"])

    async def read() -> tuple[Any, int, int]:
        found, index, revision = await entries.list(kind)
        return [e.to_json() for e in found], index, revision

    result, index = await blocking_query(request, entries.store, read, kind_prefix(kind), prefix=True)
    return json_response(result, index=index)


@routes.delete("/v1/config/{kind}/{name:.+}")
async def config_delete(request: web.Request) -> web.Response:
    cas = cas_param(request)
    done = await _entries(request).delete(request.match_info["kind"], request.match_info["name"], cas)
    # Consul answers a cas delete with its outcome, and a plain delete with an empty object.
    return json_response(done if cas is not None else {})
