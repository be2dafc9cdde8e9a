"""Consul /v1/status endpoints: the leader and the peers of this single-server cluster.

Answers from this node's identity; never touches the store.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul.common import json_response
from shipyard.api.context import platform_of

routes = web.RouteTableDef()

RAFT_PORT = 8300  # Consul reports server addresses with its Raft port


def leader_address(request: web.Request) -> str:
    return f"{platform_of(request).node.address}:{RAFT_PORT}"


@routes.get("/v1/status/leader")
async def status_leader(request: web.Request) -> web.Response:
    return json_response(leader_address(request))


@routes.get("/v1/status/peers")
async def status_peers(request: web.Request) -> web.Response:
    return json_response([leader_address(request)])
