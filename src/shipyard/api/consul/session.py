"""Consul /v1/session endpoints: create, destroy, renew, info, node and list (blocking reads supported).

Routes and HTTP shapes only; session semantics live in shipyard.registry.sessions.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul.common import ConsulError, bad_request, blocking_query, json_response, read_json
from shipyard.api.context import platform_of
from shipyard.registry.sessions import SESSION_PREFIX

routes = web.RouteTableDef()


def _id_of(request: web.Request, name: str = "id", missing: str = "Missing session") -> str:
    value = request.match_info.get(name, "")
    if not value:
        raise bad_request(missing)
    return value


@routes.put("/v1/session/create")
async def session_create(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    record = await platform_of(request).sessions.create(body)
    return json_response({"ID": record.id}, index=record.create_index)


@routes.put("/v1/session/destroy/{id:.*}")
async def session_destroy(request: web.Request) -> web.Response:
    return json_response(await platform_of(request).sessions.destroy(_id_of(request)))


@routes.put("/v1/session/renew/{id:.*}")
async def session_renew(request: web.Request) -> web.Response:
    session_id = _id_of(request)
    record = await platform_of(request).sessions.renew(session_id)
    if record is None:
        raise ConsulError(404, f"Session id '{session_id}' not found")
    return json_response([record.to_json()], index=record.modify_index)


@routes.get("/v1/session/info/{id:.*}")
async def session_info(request: web.Request) -> web.Response:
    platform = platform_of(request)
    session_id = _id_of(request)
    records, index = await blocking_query(
        request, platform.store, lambda: platform.sessions.info(session_id), SESSION_PREFIX, prefix=True
    )
    return json_response([r.to_json() for r in records], index=index)


@routes.get("/v1/session/node/{node:.*}")
async def session_node(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = _id_of(request, "node", "Missing node name")
    records, index = await blocking_query(
        request, platform.store, lambda: platform.sessions.list(node), SESSION_PREFIX, prefix=True
    )
    return json_response([r.to_json() for r in records], index=index)


@routes.get("/v1/session/list")
async def session_list(request: web.Request) -> web.Response:
    platform = platform_of(request)
    records, index = await blocking_query(
        request, platform.store, lambda: platform.sessions.list(), SESSION_PREFIX, prefix=True
    )
    return json_response([r.to_json() for r in records], index=index)
