"""Consul /v1/query endpoints: prepared query create, list, read, update, delete, execute and explain.

Routes and HTTP shapes only; definitions and execution live in shipyard.registry.prepared_queries.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.common import bad_request, blocking_query, json_response, read_json
from shipyard.api.context import platform_of
from shipyard.registry.prepared_queries import QUERY_PREFIX, PreparedQueries

routes = web.RouteTableDef()


def _queries(request: web.Request) -> PreparedQueries:
    platform = platform_of(request)
    return PreparedQueries(platform.store, platform.catalog, platform.node)


@routes.get("/v1/query")
async def query_list(request: web.Request) -> web.Response:
    queries = _queries(request)
    result, index = await blocking_query(request, queries.store, queries.all_queries, QUERY_PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.post("/v1/query")
async def query_create(request: web.Request) -> web.Response:
    return json_response({"ID": await _queries(request).create(await read_json(request))})


@routes.get("/v1/query/{id}/execute")
async def query_execute(request: web.Request) -> web.Response:
    raw_limit = request.query.get("limit", "")
    if raw_limit and not raw_limit.isdigit():
        raise bad_request(f"Bad limit: {raw_limit!r}")
    source_ip = request.remote or ""
    result = await _queries(request).execute(
        request.match_info["id"], near=request.query.get("near", ""), limit=int(raw_limit or 0),
        source_ip=source_ip, connect="connect" in request.query,
    )
    return json_response(result.to_json(), index=result.index)


@routes.get("/v1/query/{id}/explain")
async def query_explain(request: web.Request) -> web.Response:
    query = await _queries(request).resolve(request.match_info["id"])
    if query is None:
        return web.Response(status=404, text="Query not found", content_type="text/plain")
    return json_response({"Query": query}, index=query.get("ModifyIndex", 0))


@routes.get("/v1/query/{id}")
async def query_get(request: web.Request) -> web.Response:
    queries = _queries(request)
    query_id = request.match_info["id"]

    async def read() -> tuple[Any, int, int]:
        return await queries.get(query_id)

    result, index = await blocking_query(request, queries.store, read, QUERY_PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.put("/v1/query/{id}")
async def query_update(request: web.Request) -> web.Response:
    await _queries(request).update(request.match_info["id"], await read_json(request))
    return json_response(None)


@routes.delete("/v1/query/{id}")
async def query_delete(request: web.Request) -> web.Response:
    await _queries(request).delete(request.match_info["id"])
    return json_response(None)
