"""Consul /v1/operator endpoints answered truthfully for this deployment: one server, which leads and votes, no
Raft peers to remove or hand leadership to, no gossip keyring; autopilot settings kept in the store; usage counts.

Routes and HTTP shapes; the autopilot settings live in shipyard.registry.autopilot. It never changes membership.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from shipyard.api.consul.agent import CONSUL_VERSION
from shipyard.api.consul.common import ConsulError, bad_request, json_response, read_json
from shipyard.api.consul.config import cas_param
from shipyard.api.consul.status import leader_address
from shipyard.api.context import Platform, platform_of
from shipyard.registry.autopilot import read_autopilot, write_autopilot

routes = web.RouteTableDef()
NO_KEYRING = "Keyring is empty (encryption not enabled)"  # what a Consul without gossip encryption answers
CONNECT_KINDS = ("api-gateway", "connect-native", "connect-proxy", "ingress-gateway", "mesh-gateway",
                 "terminating-gateway")


def _server(request: web.Request) -> dict[str, Any]:
    platform = platform_of(request)
    return {"ID": platform.node.id, "Node": platform.node.name, "Address": leader_address(request),
            "Leader": True, "ProtocolVersion": "3", "Voter": True, "LastIndex": platform.store.revision}


@routes.get("/v1/operator/raft/configuration")
async def raft_configuration(request: web.Request) -> web.Response:
    # Index is the Raft configuration's own index: there is no Raft log here, and the configuration never changed.
    return json_response({"Servers": [_server(request)], "Index": 0})


@routes.delete("/v1/operator/raft/peer")
async def raft_remove_peer(request: web.Request) -> web.Response:
    address, peer_id = request.query.get("address", ""), request.query.get("id", "")
    if not address and not peer_id:
        raise bad_request("Must specify either ?id with the server's ID or ?address with IP:port of peer to remove")
    server = _server(request)
    if peer_id and peer_id != server["ID"]:
        raise ConsulError(500, f'id "{peer_id}" was not found in the Raft configuration')
    if address and address != server["Address"]:
        raise ConsulError(500, f'address "{address}" was not found in the Raft configuration')
    raise ConsulError(500, "cannot remove the only server: it is the leader and the last voter")


@routes.post("/v1/operator/raft/transfer-leader")
async def raft_transfer_leader(request: web.Request) -> web.Response:
    peer_id = request.query.get("id", "")
    if peer_id and peer_id != platform_of(request).node.id:
        raise ConsulError(500, f"Failed to transfer leadership: cannot find peer with id {peer_id!r}")
    raise ConsulError(500, "Failed to transfer leadership: cannot find peer")


@routes.get("/v1/operator/autopilot/configuration")
async def autopilot_configuration(request: web.Request) -> web.Response:
    config = await read_autopilot(platform_of(request).store)
    return json_response(config, index=config["ModifyIndex"])


@routes.put("/v1/operator/autopilot/configuration")
async def autopilot_update(request: web.Request) -> web.Response:
    body = await read_json(request)
    return json_response(await write_autopilot(platform_of(request).store, body, cas_param(request)))


def _server_health(platform: Platform, request: web.Request) -> dict[str, Any]:
    since = dt.datetime.fromtimestamp(platform.started_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "ID": platform.node.id, "Name": platform.node.name, "Address": leader_address(request),
        "SerfStatus": "alive", "Version": CONSUL_VERSION, "Leader": True, "LastContact": "0s", "LastTerm": 1,
        "LastIndex": platform.store.revision, "Healthy": True, "Voter": True, "StableSince": since,
    }


@routes.get("/v1/operator/autopilot/health")
async def autopilot_health(request: web.Request) -> web.Response:
    platform = platform_of(request)
    return json_response({"Healthy": True, "FailureTolerance": 0,
                          "Servers": [_server_health(platform, request)]})


@routes.get("/v1/operator/autopilot/state")
async def autopilot_state(request: web.Request) -> web.Response:
    platform = platform_of(request)
    health = _server_health(platform, request)
    server = {
        "ID": health["ID"], "Name": health["Name"], "Address": health["Address"], "NodeStatus": "alive",
        "Version": CONSUL_VERSION, "LastContact": "0s", "LastTerm": 1, "LastIndex": health["LastIndex"],
        "Healthy": True, "StableSince": health["StableSince"], "ReadReplica": False, "Status": "leader",
        "Meta": {"consul-network-segment": ""}, "NodeType": "voter",
    }
    return json_response({
        "Healthy": True, "FailureTolerance": 0, "OptimisticFailureTolerance": 0, "Servers": {health["ID"]: server},
        "Leader": health["ID"], "Voters": [health["ID"]], "RedundancyZones": None, "ReadReplicas": None,
        "Upgrade": None,
    })


@routes.get("/v1/operator/keyring")
@routes.post("/v1/operator/keyring")
@routes.put("/v1/operator/keyring")
@routes.delete("/v1/operator/keyring")
async def operator_keyring(request: web.Request) -> web.Response:
    if request.method != "GET":
        await read_json(request)  # a body that does not decode is still a 400 first, as in Consul
    raise ConsulError(500, NO_KEYRING)


@routes.get("/v1/operator/usage")
async def operator_usage(request: web.Request) -> web.Response:
    platform = platform_of(request)
    snap = await platform.catalog.snapshot()
    kinds = {kind: 0 for kind in CONNECT_KINDS}
    names: set[str] = set()
    for entry in snap.services.values():
        names.add(str(entry.data.get("Service", "")))
        kind = str(entry.data.get("Kind") or "")
        if kind in kinds:
            kinds[kind] += 1
        elif (entry.data.get("Connect") or {}).get("Native"):
            kinds["connect-native"] += 1
    instances = len(snap.services)
    if "consul" not in names and platform.node.name in snap.nodes:
        # Every Consul server is an instance of the "consul" service, which the catalog answers for this server.
        names.add("consul")
        instances += 1
    proxies = sum(kinds[k] for k in CONNECT_KINDS if k != "connect-native")
    usage = {"Services": len(names), "ServiceInstances": instances, "ConnectServiceInstances": kinds,
             "BillableServiceInstances": instances - proxies, "Nodes": len(snap.nodes)}
    return json_response({
        "Usage": {platform.node.datacenter: usage}, "Index": snap.index, "LastContact": 0, "KnownLeader": True,
        "ConsistencyLevel": "leader", "NotModified": False, "Backend": 0, "ResultsFilteredByACLs": False,
    }, index=snap.index)
