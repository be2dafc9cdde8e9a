"""The native nodes API (/api/v1/nodes): node status, eligibility and drain, for `shipyard node` and operators.

A thin edge over NodeService: it parses input and shapes JSON; it never moves instances (the scheduler plans the
drain) and never writes the store itself.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from shipyard.api.context import platform_of
from shipyard.api.native.jobs_api import PREFIX, _action_body, _flag, _wake_scheduler
from shipyard.errors import BadRequest
from shipyard.scheduler.nodes import NodeService, NodeView, parse_deadline

routes = web.RouteTableDef()

DEFAULT_DEADLINE = 3600.0  # as Nomad's `node drain -enable`: an hour, then what is left is stopped


def nodes_of(request: web.Request) -> NodeService:
    return NodeService(platform_of(request).store)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _node_json(view: NodeView) -> dict[str, Any]:
    return view.to_json(time.time())


@routes.get(PREFIX + "/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    return _json({"nodes": [_node_json(v) for v in await nodes_of(request).views()]})


@routes.get(PREFIX + "/nodes/{node}")
async def get_node(request: web.Request) -> web.Response:
    return _json({"node": _node_json(await nodes_of(request).view(request.match_info["node"]))})


def _eligible(body: dict[str, Any]) -> bool:
    """{"eligible": true|false}, or Nomad's {"Eligibility": "eligible"|"ineligible"}."""
    if "eligible" in body:
        return _flag(body["eligible"], "eligible")
    nomad = body.get("Eligibility")
    if nomad in ("eligible", "ineligible"):
        return bool(nomad == "eligible")
    raise BadRequest('body must be {"eligible": true} or {"eligible": false}')


@routes.post(PREFIX + "/nodes/{node}/eligibility")
async def node_eligibility(request: web.Request) -> web.Response:
    body = await _action_body(request)
    view = await nodes_of(request).set_eligibility(request.match_info["node"], _eligible(body))
    return _json({"node": _node_json(view)})


@routes.post(PREFIX + "/nodes/{node}/drain")
async def node_drain(request: web.Request) -> web.Response:
    """{"deadline": "1m" | seconds | null (never forced)} starts a drain (default deadline 1h);
    {"disable": true, "keep_ineligible": false} ends one."""
    body = await _action_body(request)
    unknown = set(body) - {"deadline", "disable", "keep_ineligible"}
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))} (allowed: deadline, disable, keep_ineligible)")
    nodes = nodes_of(request)
    name = request.match_info["node"]
    if _flag(body.get("disable", False), "disable"):
        view = await nodes.stop_drain(name, _flag(body.get("keep_ineligible", False), "keep_ineligible"))
    else:
        view = await nodes.drain(name, parse_deadline(body["deadline"]) if "deadline" in body else DEFAULT_DEADLINE)
    _wake_scheduler(request)
    return _json({"node": _node_json(view)})
