"""PUT /api/v1/nodes/{node}/service-tokens/{service}: a `shipyard agent` makes the ACL token its instances of
`service` get (SHIPYARD_HTTP_TOKEN), as a server makes them for its own node's instances (api/server.py); and
PUT /api/v1/nodes/{node}/gateway-token: the read-only token its gateway workers get, as a server mints its own
workers' (GATEWAY_RULES), so the processes that face the network never hold the agent's store-writing token.

The agent gives the SecretID (derived from its own key, so the same across its restarts and whichever server it
asks, and never sent back); the token is that service's identity plus its KV prefix and the bus (service_rules),
nothing else. The route needs node:write on that node and store:write (an agent's token, api/acl_table.py), and the
service must have an allocation to run on that node: an agent's token never mints a token of another policy, nor one
of a service placed elsewhere. DELETE on the same path (same rule) removes it, once the agent runs no instance of the
service. It never returns or logs a secret.
"""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from shipyard.acl.state import GATEWAY_RULES, ACLState, gateway_token_name, service_rules
from shipyard.api.body import read_limited
from shipyard.api.consul.acl_api import ACL_STATE
from shipyard.api.context import Platform, platform_of
from shipyard.errors import BadRequest, ShipyardError
from shipyard.scheduler.records import ALLOCS, _q, decode_alloc

routes = web.RouteTableDef()
PATH = "/api/v1/nodes/{node}/service-tokens/{service}"
MAX_BODY = 4096


GATEWAY_PATH = "/api/v1/nodes/{node}/gateway-token"


def token_name(node: str, service: str) -> str:
    """One token per (node, service): each agent's holds its own secret; deleting it touches no other node."""
    return f"service:{service}@{node}"


async def forget_node_tokens(platform: Platform, node: str) -> int:
    """The tokens a node's agent made for its instances, deleted once the node is gone for good (reaped or
    force-left: agent/reaper.py), so an instance still running on a dead machine holds a secret that no longer
    resolves. Only internal tokens are touched (deleted by their derived AccessorID). How many were deleted."""
    acl = platform.extras.get(ACL_STATE)
    if not isinstance(acl, ACLState):
        return 0
    prefix, suffix = "Shipyard's own service:", f"@{node}"  # internal_token_with's Description of token_name()
    services = [str(t.get("Description", ""))[len(prefix):-len(suffix)] for t in await acl.tokens()
                if str(t.get("Description", "")).startswith(prefix) and str(t.get("Description", "")).endswith(suffix)]
    for service in services:
        await acl.delete_internal_token(token_name(node, service))
    await acl.delete_internal_token(gateway_token_name(node))
    return len(services)


async def _secret_of(request: web.Request) -> str:
    try:
        body = orjson.loads(await read_limited(request, MAX_BODY) or b"null")
    except orjson.JSONDecodeError:
        raise BadRequest("body: give {\"SecretID\": \"<uuid>\"}") from None
    secret = body.get("SecretID") if isinstance(body, dict) else None
    try:
        uuid.UUID(str(secret))
    except ValueError:
        raise BadRequest("SecretID: give a UUID") from None
    return str(secret)


async def _placed_here(request: web.Request, node: str, service: str) -> bool:
    """Whether an allocation of `service` is to run on `node` now."""
    listed = await platform_of(request).store.range(f"{ALLOCS}{_q(node)}/", prefix=True)
    for kv in listed.kvs:
        try:
            alloc = decode_alloc(kv.value)
        except (TypeError, KeyError, ValueError):
            continue
        if alloc.job == service and alloc.desired == "run":
            return True
    return False


def _acl_of(request: web.Request, who: str) -> ACLState:
    acl = platform_of(request).extras.get(ACL_STATE)
    if not isinstance(acl, ACLState):
        raise BadRequest(f"ACLs are off on this server (--acl): {who} need no token")
    return acl


@routes.put(PATH)
async def put_service_token(request: web.Request) -> web.Response:
    node, service = request.match_info["node"], request.match_info["service"]
    acl = _acl_of(request, "instances")
    secret = await _secret_of(request)
    if not await _placed_here(request, node, service):
        raise ShipyardError(f"no allocation of {service!r} runs on node {node!r}: its token is made only for the "
                            "node its instances are placed on", status=403)
    await acl.internal_token_with(secret, token_name(node, service), service_rules(service), service=service)
    return web.json_response({"Node": node, "Service": service})


@routes.delete(PATH)
async def delete_service_token(request: web.Request) -> web.Response:
    """The agent runs no instance of `service` any more: its token for that node is deleted."""
    acl = _acl_of(request, "instances")
    await acl.delete_internal_token(token_name(request.match_info["node"], request.match_info["service"]))
    return web.json_response(None)


@routes.put(GATEWAY_PATH)
async def put_gateway_token(request: web.Request) -> web.Response:
    """The token of the node's gateway workers: read the store, the routes and the catalog, write nothing."""
    node = request.match_info["node"]
    acl = _acl_of(request, "gateway workers")
    await acl.internal_token_with(await _secret_of(request), gateway_token_name(node), GATEWAY_RULES)
    return web.json_response({"Node": node})
