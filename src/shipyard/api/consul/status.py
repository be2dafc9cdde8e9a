"""Consul /v1/status endpoints: the leader and the peers of the cluster (this server alone on SQLite).

Answers from this node's identity alone, or in a cluster on etcd from the servers' own records; it never writes.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.cluster import cluster_of
from shipyard.api.consul.common import json_response
from shipyard.api.context import platform_of

routes = web.RouteTableDef()

RAFT_PORT = 8300  # Consul reports server addresses with its Raft port


def leader_address(request: web.Request) -> str:
    """A single server leads itself (Consul's Raft port, as Consul reports it); in a cluster, the elected server's
    address and control port (there is no Raft in a cluster on etcd), "" while there is none (as Consul)."""
    platform = platform_of(request)
    cluster = cluster_of(platform)
    if cluster is None:
        return f"{platform.node.address}:{RAFT_PORT}"
    leader = cluster.leader
    return leader.peer_address if leader is not None else ""


@routes.get("/v1/status/leader")
async def status_leader(request: web.Request) -> web.Response:
    return json_response(leader_address(request))


@routes.get("/v1/status/peers")
async def status_peers(request: web.Request) -> web.Response:
    cluster = cluster_of(platform_of(request))
    if cluster is None:
        return json_response([leader_address(request)])
    return json_response([server.peer_address for server in await cluster.peers()])
