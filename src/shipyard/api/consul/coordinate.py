"""Consul /v1/coordinate endpoints: datacenters, nodes, one node (blocking reads supported) and update.

Routes and HTTP shapes only; storage and validation live in shipyard.registry.coordinates.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.common import blocking_query, json_response, read_json
from shipyard.api.context import platform_of
from shipyard.registry.coordinates import COORD_PREFIX, Coordinates

routes = web.RouteTableDef()


def _coordinates(request: web.Request) -> Coordinates:
    platform = platform_of(request)
    return Coordinates(platform.store, platform.catalog, platform.node)


@routes.get("/v1/coordinate/datacenters")
async def coordinate_datacenters(request: web.Request) -> web.Response:
    return json_response(await _coordinates(request).datacenters())


@routes.get("/v1/coordinate/nodes")
async def coordinate_nodes(request: web.Request) -> web.Response:
    coordinates = _coordinates(request)
    result, index = await blocking_query(request, coordinates.store, coordinates.nodes, COORD_PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/coordinate/node/{node:.+}")
async def coordinate_node(request: web.Request) -> web.Response:
    coordinates = _coordinates(request)
    node = request.match_info["node"]

    async def read() -> tuple[Any, int, int]:
        return await coordinates.nodes(node)

    result, index = await blocking_query(request, coordinates.store, read, COORD_PREFIX, prefix=True)
    if not result:
        # Consul: a node without a coordinate is a 404 (with the index, so a client can block on it).
        return web.Response(status=404, headers={"X-Consul-Index": str(max(index, 1))})
    return json_response(result, index=index)


@routes.put("/v1/coordinate/update")
async def coordinate_update(request: web.Request) -> web.Response:
    await _coordinates(request).update(await read_json(request))
    return json_response(True)
