"""The Consul-compatible HTTP API under /v1: agent, catalog, health, kv, txn, session, status.

Each module owns one endpoint group's routes; this file only mounts them.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul import agent, catalog, health, kv, session, status, txn


def add_consul_routes(app: web.Application) -> None:
    for module in (agent, catalog, health, kv, session, status, txn):
        app.router.add_routes(module.routes)
