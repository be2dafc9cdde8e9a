"""Consul /v1/health endpoints: service instances with their checks, checks by service, state and node.

Filters and shapes what the registry Catalog holds; it never changes a check's status.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.catalog import has_tags, node_matches, node_meta_filters, select
from shipyard.api.consul.common import bad_request, blocking_query, json_response, request_filter
from shipyard.api.context import platform_of
from shipyard.registry.catalog import CHECKS, PASSING, PREFIX, STATUSES, _q
from shipyard.registry.filter import CHECK_SERVICE_NODE, HEALTH_CHECK

routes = web.RouteTableDef()


def _passing_param(request: web.Request) -> bool:
    """Consul: `?passing` alone means true; otherwise Go's ParseBool of its value."""
    if "passing" not in request.query:
        return False
    raw = request.query["passing"]
    if raw in ("", "1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise bad_request("Invalid value for ?passing")


@routes.get("/v1/health/service/{name:.+}")
async def health_service(request: web.Request) -> web.Response:
    platform = platform_of(request)
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    filters = node_meta_filters(request)
    passing_only = _passing_param(request)
    chosen = request_filter(request, CHECK_SERVICE_NODE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out = []
        for node, entry in snap.services_named(name):
            if not has_tags(entry, tags) or not node_matches(snap, node, filters):
                continue
            sid = entry.data.get("ID", "")
            checks = sorted(
                snap.node_checks(node) + snap.service_checks(node, sid),
                key=lambda e: (e.data.get("ServiceID", ""), e.data.get("CheckID", "")),
            )
            if passing_only and any(c.data.get("Status") != PASSING for c in checks):
                continue
            out.append({
                "Node": snap.node_shape(node),
                "Service": snap.node_service_shape(entry),
                "Checks": [snap.check_shape(c) for c in checks],
            })
        return select(chosen, out), snap.name_index(name), snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/health/checks/{name:.+}")
async def health_checks(request: web.Request) -> web.Response:
    platform = platform_of(request)
    name = request.match_info["name"]
    filters = node_meta_filters(request)
    chosen = request_filter(request, HEALTH_CHECK)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out = []
        for node, entry in snap.services_named(name):
            if not node_matches(snap, node, filters):
                continue
            for check in snap.service_checks(node, entry.data.get("ID", "")):
                out.append(snap.check_shape(check))
        return select(chosen, out), snap.name_index(name), snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/health/state/{state}")
async def health_state(request: web.Request) -> web.Response:
    platform = platform_of(request)
    state = request.match_info["state"]
    if state != "any" and state not in STATUSES:
        raise bad_request(f'Invalid check state "{state}": must be one of any, passing, warning, critical')
    filters = node_meta_filters(request)
    chosen = request_filter(request, HEALTH_CHECK)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out = [
            snap.check_shape(entry)
            for (node, _), entry in sorted(snap.checks.items())
            if (state == "any" or entry.data.get("Status") == state) and node_matches(snap, node, filters)
        ]
        return select(chosen, out), snap.checks_index, snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/health/node/{node:.+}")
async def health_node(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = request.match_info["node"]
    prefix = f"{CHECKS}{_q(node)}/"
    chosen = request_filter(request, HEALTH_CHECK)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        index = (await platform.store.range(prefix, prefix=True)).index
        checks = sorted(snap.checks_of_node(node), key=lambda e: e.data.get("CheckID", ""))
        return select(chosen, [snap.check_shape(c) for c in checks]), index, snap.revision

    result, index = await blocking_query(request, platform.store, read, prefix, prefix=True)
    return json_response(result, index=index)
