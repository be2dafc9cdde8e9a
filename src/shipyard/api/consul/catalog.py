"""Consul /v1/catalog endpoints: services, service instances, nodes, datacenters, register and deregister.

Shapes answers and decodes requests the way Consul does; the registry Catalog owns the data.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.agent import (
    CHECK_FIELDS,
    SERVICE_FIELDS,
    as_bool,
    as_int,
    as_str,
    as_str_list,
    as_str_map,
    build_weights,
    canonical_fields,
    decode_error,
)
from shipyard.api.consul.common import (
    ConsulError,
    bad_request,
    blocking_query,
    format_duration,
    json_response,
    parse_duration,
    read_json,
    request_filter,
)
from shipyard.api.context import platform_of
from shipyard.errors import NotFound
from shipyard.registry.catalog import PREFIX, SERVICES, STATUSES, CatalogSnapshot, Entry, _q, node_key
from shipyard.registry.filter import NODE, NODE_SERVICE, SERVICE_NODE, Filter

routes = web.RouteTableDef()

REGISTER_FIELDS = [
    "ID", "Node", "Address", "Datacenter", "TaggedAddresses", "NodeMeta", "Service", "Check", "Checks",
    "SkipNodeUpdate", "Token", "WriteRequest",
]
CATALOG_SERVICE_FIELDS = [*SERVICE_FIELDS, "Service"]


def node_meta_filters(request: web.Request) -> dict[str, str]:
    """?node-meta=key:value (repeatable); every pair must match the node's Meta."""
    filters = {}
    for raw in request.query.getall("node-meta", []):
        key, _, value = raw.partition(":")
        filters[key] = value
    return filters


def node_matches(snap: CatalogSnapshot, node: str, filters: dict[str, str]) -> bool:
    if not filters:
        return True
    meta = snap.node_shape(node).get("Meta") or {}
    return all(meta.get(k) == v for k, v in filters.items())


def select(chosen: Filter | None, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return records if chosen is None else chosen.select(records)


def has_tags(entry: Entry, tags: list[str]) -> bool:
    """Consul's tag filter: every requested tag present, compared case-insensitively."""
    own = {t.lower() for t in entry.data.get("Tags") or []}
    return all(t.lower() in own for t in tags)


@routes.get("/v1/catalog/datacenters")
async def catalog_datacenters(request: web.Request) -> web.Response:
    return json_response([platform_of(request).node.datacenter])


@routes.get("/v1/catalog/services")
async def catalog_services(request: web.Request) -> web.Response:
    platform = platform_of(request)
    filters = node_meta_filters(request)
    chosen = request_filter(request, SERVICE_NODE)  # Consul filters the instances, then groups them by name

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out: dict[str, list[str]] = {}
        for (node, _), entry in sorted(snap.services.items()):
            if not node_matches(snap, node, filters):
                continue
            if chosen is not None and not chosen.matches(snap.catalog_service_shape(node, entry)):
                continue
            tags = out.setdefault(entry.data.get("Service", ""), [])
            for tag in entry.data.get("Tags") or []:
                if tag not in tags:
                    tags.append(tag)
        index = max(snap.services_index, snap.nodes_index if filters else 0)
        return out, index, snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/catalog/service/{name:.+}")
async def catalog_service(request: web.Request) -> web.Response:
    platform = platform_of(request)
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    filters = node_meta_filters(request)
    chosen = request_filter(request, SERVICE_NODE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out = [
            snap.catalog_service_shape(node, entry)
            for node, entry in snap.services_named(name)
            if has_tags(entry, tags) and node_matches(snap, node, filters)
        ]
        return select(chosen, out), snap.name_index(name), snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/catalog/nodes")
async def catalog_nodes(request: web.Request) -> web.Response:
    platform = platform_of(request)
    filters = node_meta_filters(request)
    chosen = request_filter(request, NODE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out = [snap.node_shape(n) for n in sorted(snap.nodes) if node_matches(snap, n, filters)]
        return select(chosen, out), snap.nodes_index, snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/catalog/node/{node:.+}")
async def catalog_node(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = request.match_info["node"]
    services_prefix = f"{SERVICES}{_q(node)}/"
    chosen = request_filter(request, NODE_SERVICE)  # Consul filters the node's services

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        index = max(
            (await platform.store.range(node_key(node))).index,
            (await platform.store.range(services_prefix, prefix=True)).index,
        )
        if node not in snap.nodes:
            return None, index, snap.revision
        services = {e.data["ID"]: snap.node_service_shape(e) for e in snap.services_of_node(node) if "ID" in e.data}
        if chosen is not None:
            services = {sid: shape for sid, shape in services.items() if chosen.matches(shape)}
        return {"Node": snap.node_shape(node), "Services": services}, index, snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True)
    return json_response(result, index=index)


def _catalog_service(raw: Any) -> dict[str, Any]:
    s = canonical_fields(raw, CATALOG_SERVICE_FIELDS, "NodeService")
    name = as_str(s, "Service", "NodeService") or as_str(s, "Name", "NodeService")
    sid = as_str(s, "ID", "NodeService") or name
    if not name:
        raise bad_request("Must provide service name (Service.Service) with ID" if sid else "Missing service name")
    address = as_str(s, "Address", "NodeService")
    if address in ("0.0.0.0", "::", "[::]"):
        raise bad_request("Invalid service address")
    port = as_int(s, "Port", "NodeService")
    if not 0 <= port <= 65535:
        raise bad_request(f"Invalid service port: {port}")
    service: dict[str, Any] = {
        "ID": sid,
        "Service": name,
        "Tags": as_str_list(s, "Tags", "NodeService"),
        "Meta": as_str_map(s, "Meta", "NodeService"),
        "Port": port,
        "Address": address,
        "Weights": build_weights(s.get("Weights"), "NodeService"),
        "EnableTagOverride": as_bool(s, "EnableTagOverride", "NodeService"),
    }
    kind = as_str(s, "Kind", "NodeService")
    if kind:
        service["Kind"] = kind
    tagged = s.get("TaggedAddresses")
    if tagged:
        if not isinstance(tagged, dict):
            raise decode_error(tagged, "NodeService", "TaggedAddresses", "map[string]structs.ServiceAddress")
        service["TaggedAddresses"] = tagged
    return service


def _catalog_check(raw: Any, node: str) -> dict[str, Any]:
    c = canonical_fields(raw, CHECK_FIELDS, "HealthCheck")
    name = as_str(c, "Name", "HealthCheck")
    cid = as_str(c, "CheckID", "HealthCheck") or as_str(c, "ID", "HealthCheck") or name
    if not cid:
        raise bad_request("Missing check ID")
    status = as_str(c, "Status", "HealthCheck") or "critical"
    if status not in STATUSES:
        raise bad_request(f"Invalid check status: '{status}'")
    check_node = as_str(c, "Node", "HealthCheck")
    if check_node and check_node != node:
        raise bad_request("Check node does not match registration node")
    definition = _catalog_definition(c.get("Definition"))
    return {
        "Node": node,
        "CheckID": cid,
        "Name": name,
        "Status": status,
        "Notes": as_str(c, "Notes", "HealthCheck"),
        "Output": as_str(c, "Output", "HealthCheck"),
        "ServiceID": as_str(c, "ServiceID", "HealthCheck"),
        "ServiceName": "",
        "ServiceTags": [],
        # Catalog-registered checks are records only: an empty Type keeps the health checker off them.
        "Type": "",
        "Interval": definition.get("Interval", "0s"),
        "Timeout": definition.get("Timeout", "0s"),
        "ExposedPort": 0,
        "Definition": definition,
    }


DEFINITION_DURATIONS = ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter")


def _catalog_definition(raw: Any) -> dict[str, Any]:
    """A registered check's Definition with its durations as Consul re-renders them: Go strings, "0s" for none."""
    if not isinstance(raw, dict):
        return {}
    definition = dict(raw)
    for key in DEFINITION_DURATIONS:
        if key in definition:
            definition[key] = format_duration(parse_duration(definition[key], key))
    return definition


@routes.put("/v1/catalog/register")
async def catalog_register(request: web.Request) -> web.Response:
    platform = platform_of(request)
    r = canonical_fields(await read_json(request), REGISTER_FIELDS, "RegisterRequest")
    node = as_str(r, "Node", "RegisterRequest")
    if not node:
        raise bad_request("Must provide node")
    skip_node_update = as_bool(r, "SkipNodeUpdate", "RegisterRequest")
    address = as_str(r, "Address", "RegisterRequest")
    if not address and not skip_node_update:
        raise bad_request("Must provide address if SkipNodeUpdate is not set")
    dc = as_str(r, "Datacenter", "RegisterRequest")
    if dc and dc != platform.node.datacenter:
        raise ConsulError(500, "No path to datacenter")
    node_record: dict[str, Any] | None = None
    if not skip_node_update:
        tagged = r.get("TaggedAddresses")
        if tagged is not None and not isinstance(tagged, dict):
            raise decode_error(tagged, "RegisterRequest", "TaggedAddresses", "map[string]string")
        node_record = {
            "ID": as_str(r, "ID", "RegisterRequest"),
            "Node": node,
            "Address": address,
            "Datacenter": platform.node.datacenter,
            "TaggedAddresses": tagged or {},
            # py-consul sends node_meta as ?node-meta=k:v rather than NodeMeta; honour both.
            "Meta": as_str_map(r, "NodeMeta", "RegisterRequest") or node_meta_filters(request),
        }
    service = _catalog_service(r["Service"]) if r.get("Service") is not None else None
    raw_checks: list[Any] = []
    if r.get("Check") is not None:
        raw_checks.append(r["Check"])
    if r.get("Checks") is not None:
        if not isinstance(r["Checks"], list):
            raise decode_error(r["Checks"], "RegisterRequest", "Checks", "structs.HealthChecks")
        raw_checks += r["Checks"]
    checks = [_catalog_check(c, node) for c in raw_checks]
    try:
        await platform.catalog.register_catalog_entry(node, node_record, service, checks)
    except NotFound as exc:
        raise ConsulError(500, exc.message) from None
    return json_response(True)


@routes.put("/v1/catalog/deregister")
async def catalog_deregister(request: web.Request) -> web.Response:
    platform = platform_of(request)
    r = canonical_fields(
        await read_json(request), ["Node", "Datacenter", "ServiceID", "CheckID", "Token", "WriteRequest"],
        "DeregisterRequest",
    )
    node = as_str(r, "Node", "DeregisterRequest")
    if not node:
        raise bad_request("Must provide node")
    sid = as_str(r, "ServiceID", "DeregisterRequest")
    cid = as_str(r, "CheckID", "DeregisterRequest")
    if sid:
        await platform.catalog.deregister_service(node, sid)
    elif cid:
        await platform.catalog.deregister_check(node, cid)
    else:
        await platform.catalog.deregister_node(node)
    return json_response(True)
