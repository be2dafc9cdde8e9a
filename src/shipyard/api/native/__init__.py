"""Shipyard's own HTTP API under /api: the store for other processes (gateway workers, remote agents, SDK).

Mounts route tables only; JSON in, JSON out, errors as {"error", "detail"}.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.native import (
    bus_api,
    gateway_api,
    gateway_tls_api,
    health_api,
    jobs_api,
    logs_api,
    node_secrets_api,
    nodes_api,
    service_tokens_api,
    store_api,
)


def add_native_routes(app: web.Application) -> None:
    app.router.add_routes(store_api.routes)
    app[store_api.WATCH_STREAMS] = store_api.WatchStreams()
    app.on_shutdown.append(store_api.end_watch_streams)
    app.router.add_routes(bus_api.routes)
    app.router.add_routes(jobs_api.routes)
    app.router.add_routes(logs_api.routes)
    app.router.add_routes(gateway_api.routes)
    app.router.add_routes(gateway_tls_api.routes)
    app.router.add_routes(health_api.routes)
    app.router.add_routes(nodes_api.routes)
    app.router.add_routes(service_tokens_api.routes)
    app.router.add_routes(node_secrets_api.routes)
