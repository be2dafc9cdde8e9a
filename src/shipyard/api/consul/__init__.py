"""The Consul-compatible HTTP API under /v1: agent, catalog, health, kv, txn, session, status, acl.

Each module owns one endpoint group's routes; this file only mounts them.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul import acl, agent, catalog, health, kv, session, status, txn
from shipyard.api.consul.common import datacenter_scope


def add_consul_routes(app: web.Application) -> None:
    for module in (agent, catalog, health, kv, session, status, txn, acl):
        app.router.add_routes(module.routes)
    # One ?dc= check for every endpoint that takes it, rather than one per handler.
    app.middlewares.append(datacenter_scope)
