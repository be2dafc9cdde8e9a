"""What an agent's local API answers itself rather than forwarding: the Consul endpoints about "this agent"'s own
services and checks (/v1/agent/service/register, deregister, maintenance, /v1/agent/check/*, /v1/agent/services,
/v1/agent/service/<id>, /v1/agent/checks), as a Consul client agent does. A service an instance registers itself
(the SDK does) is on the agent's node, and its TTL check is timed by the agent's own health checker.

It runs the server's very handlers (api/consul/agent.py) over a Platform made of the agent's parts (its node, its
catalog and health checker on the servers' store), behind the server's ACL rules for those routes (api/acl_table.py)
resolved against the servers' ACLs, failing closed (the servers' default policy is not in the store). It never
answers anything else; the rest is forwarded (api/agent_forward.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shipyard.acl.state import ACLState
from shipyard.api.acl_guard import Rule, acl_middleware
from shipyard.api.acl_table import rule_for
from shipyard.api.consul import agent as consul_agent
from shipyard.api.consul import agent_runtime
from shipyard.api.consul.common import ConsulError
from shipyard.api.context import PLATFORM, Platform, ServerConfig
from shipyard.api.errors import error_middleware
from shipyard.registry.catalog import Catalog
from shipyard.registry.health import HealthChecker
from shipyard.registry.kv import ConsulKV
from shipyard.registry.node import NodeIdentity
from shipyard.registry.sessions import SessionManager
from shipyard.store.base import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOCAL = "local"  # the name of the local routes' resources; the forwarded catch-all has none
LOCAL_PATHS = frozenset({
    "/v1/agent/service/register", "/v1/agent/service/deregister/{service_id:.+}",
    "/v1/agent/check/register", "/v1/agent/check/deregister/{check_id:.+}",
    "/v1/agent/check/pass/{check_id:.+}", "/v1/agent/check/warn/{check_id:.+}",
    "/v1/agent/check/fail/{check_id:.+}", "/v1/agent/check/update/{check_id:.+}",
    "/v1/agent/service/maintenance/{service_id:.*}", "/v1/agent/maintenance",
    "/v1/agent/services", "/v1/agent/service/{service_id:.+}", "/v1/agent/checks",
    "/v1/agent/reload", "/v1/agent/leave",  # this agent's: leave stops it (SIGTERM to itself), not a server
})
TOKEN_PATH = "/v1/agent/token/{kind:.*}"


def local_platform(store: Store, node: NodeIdentity, catalog: Catalog, health: HealthChecker) -> Platform:
    """The agent's parts in the shape the handlers take; nothing in it runs on its own."""
    kv = ConsulKV(store)
    return Platform(ServerConfig(data_dir=None, node_name=node.name), store, node, catalog, health, kv,
                    SessionManager(store, catalog, kv, node))


def is_local(request: web.Request) -> bool:
    route = request.match_info.route
    return request.match_info.http_exception is None and route.name is not None and route.name.startswith(LOCAL)


def local_only(middleware: Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]) -> Any:
    """`middleware` for the local routes only: a forwarded answer (a stream already under way) is never reshaped."""
    @web.middleware
    async def wrapped(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_local(request):
            return await middleware(request, handler)
        return await handler(request)
    return wrapped


def local_rule(request: web.Request) -> Rule | None:
    return rule_for(request) if is_local(request) else None  # the server decides what it is forwarded


def add_local_routes(app: web.Application, platform: Platform, acl: ACLState | None) -> None:
    """The local routes, before the forwarded catch-all is added (aiohttp tries routes in order)."""
    app[PLATFORM] = platform
    app.middlewares.append(local_only(error_middleware))
    if acl is not None:
        app.middlewares.append(acl_middleware(acl, local_rule))
    for number, route in enumerate([*consul_agent.routes, *agent_runtime.routes]):
        if isinstance(route, web.RouteDef) and route.path in LOCAL_PATHS:
            app.router.add_route(route.method, route.path, route.handler, name=f"{LOCAL}{number}")
    app.router.add_put(TOKEN_PATH, refuse_token, name=f"{LOCAL}-token")


async def refuse_token(request: web.Request) -> web.Response:
    """Setting a token over the local API would set a server's: an agent's tokens are its own flags."""
    raise ConsulError(400, "an agent's tokens are its environment and flags (SHIPYARD_HTTP_TOKEN, --dns-token): "
                           "restart it with new ones")
