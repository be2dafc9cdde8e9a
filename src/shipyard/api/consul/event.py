"""Consul /v1/event endpoints: fire a user event, list the events this agent holds (blocking reads supported).

Routes and HTTP shapes only; what an event is and who receives it lives in shipyard.registry.events.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.consul.common import MAX_JSON_BODY, blocking_query, json_response
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_any_body
from shipyard.registry.events import EVENTS_PREFIX, UserEvents

routes = web.RouteTableDef()


def _events(request: web.Request) -> UserEvents:
    platform = platform_of(request)
    return UserEvents(platform.store, platform.catalog, platform.node)


@routes.put("/v1/event/fire/{name:.*}")
@accepts_any_body  # the payload is opaque to Consul, in any type
async def event_fire(request: web.Request) -> web.Response:
    body = await read_limited(request, MAX_JSON_BODY)
    query = request.query
    event = await _events(request).fire(
        request.match_info["name"], body or None, query.get("node", ""), query.get("service", ""),
        query.get("tag", ""),
    )
    return json_response(event.to_json())


@routes.get("/v1/event/list")
async def event_list(request: web.Request) -> web.Response:
    events = _events(request)
    name = request.query.get("name", "")

    async def read() -> tuple[Any, int, int]:
        found, index, revision = await events.list(name)
        return [e.to_json() for e in found], index, revision

    result, index = await blocking_query(request, events.store, read, EVENTS_PREFIX, prefix=True)
    return json_response(result, index=index)
