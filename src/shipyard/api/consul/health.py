"""Consul /v1/health endpoints: service instances with their checks, checks by service, state and node.

Filters and shapes what the registry Catalog holds; it never changes a check's status.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.catalog import (
    connect_instances,
    gateway_links,
    instance_query,
    merge_central_config,
    named_instances,
    node_matches,
    node_meta_filters,
    select,
)
from shipyard.api.consul.common import bad_request, blocking_query, json_response, request_filter, same_answer
from shipyard.api.context import Platform, platform_of
from shipyard.registry.catalog import CHECKS, PASSING, PREFIX, STATUSES, CatalogSnapshot, Entry, _q
from shipyard.registry.config_entries import decode_entry, kind_prefix
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


async def _ingress_gateways(platform: Platform, name: str) -> set[str]:
    """Names of the ingress gateways whose config entry routes to `name`."""
    held = await platform.store.range(kind_prefix("ingress-gateway"), prefix=True)
    found = set()
    for kv in held.kvs:
        entry = decode_entry(kv)
        if any(link["Service"]["Name"] in (name, "*") for link in gateway_links(entry, [name])):
            found.add(entry.name)
    return found


async def _instances(platform: Platform, snap: CatalogSnapshot, name: str, kind: str) -> list[tuple[str, Entry]]:
    if kind == "connect":
        return connect_instances(snap, name)
    if kind == "ingress":
        gateways = await _ingress_gateways(platform, name)
        return [(node, e) for (node, _), e in sorted(snap.services.items())
                if e.data.get("Kind") == "ingress-gateway" and e.data.get("Service") in gateways]
    return named_instances(snap, name, platform.node.name)


async def _health_instances(request: web.Request, kind: str) -> web.Response:
    """/v1/health/service, /connect and /ingress: instances with the checks of their node and their own."""
    platform = platform_of(request)
    name, wanted, peered = instance_query(request)
    passing_only = _passing_param(request)
    chosen = request_filter(request, CHECK_SERVICE_NODE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out: list[dict[str, Any]] = []
        for node, entry in [] if peered else await _instances(platform, snap, name, kind):
            if not wanted(snap, node, entry):
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
        await merge_central_config(request, [entry["Service"] for entry in out], "Proxy")
        index = max(snap.name_index(name), 1) if kind == "service" else snap.index
        if kind == "ingress":  # the gateways' config entries are part of the answer
            index = max(index, (await platform.store.range(kind_prefix("ingress-gateway"), prefix=True)).index)
        return select(chosen, out), index, snap.revision

    # Ingress answers also change with the gateways' config entries: watch everything for those.
    watch = PREFIX if kind != "ingress" else ""
    result, index = await blocking_query(request, platform.store, read, watch, prefix=True, share=same_answer(request))
    return json_response(result, index=index)


@routes.get("/v1/health/service/{name:.+}")
async def health_service(request: web.Request) -> web.Response:
    return await _health_instances(request, "service")


@routes.get("/v1/health/connect/{name:.+}")
async def health_connect(request: web.Request) -> web.Response:
    return await _health_instances(request, "connect")


@routes.get("/v1/health/ingress/{name:.+}")
async def health_ingress(request: web.Request) -> web.Response:
    return await _health_instances(request, "ingress")


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
