"""The Consul-compatible HTTP API under /v1: agent, catalog, health, kv, txn, session, status, acl, event, config,
discovery-chain, coordinate, query, operator, snapshot, connect.

Each module owns one endpoint group's routes; this file only mounts them.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul import (
    acl,
    acl_api,
    acl_login_api,
    agent,
    agent_runtime,
    catalog,
    config,
    connect,
    coordinate,
    discovery_chain,
    event,
    health,
    kv,
    operator,
    query,
    session,
    snapshot,
    status,
    txn,
)
from shipyard.api.consul.common import datacenter_scope
from shipyard.api.context import PLATFORM


def add_consul_routes(app: web.Application) -> None:
    if app[PLATFORM].config.acl:
        app.router.add_routes(acl_login_api.routes)  # before acl_api's catch-all for what Shipyard lacks
        app.router.add_routes(acl_api.routes)  # first, so that acl.py's "ACL support disabled" never answers
        if app[PLATFORM].config.acl_token_persistence:
            app.on_startup.append(acl_api.load_persisted_tokens)  # after the configuration's tokens: these win
    for module in (agent, agent_runtime, catalog, health, kv, session, status, txn, acl):
        app.router.add_routes(module.routes)
    for module in (event, config, discovery_chain, coordinate, query, operator, snapshot, connect):
        app.router.add_routes(module.routes)
    # One ?dc= check for every endpoint that takes it, rather than one per handler.
    app.middlewares.append(datacenter_scope)
