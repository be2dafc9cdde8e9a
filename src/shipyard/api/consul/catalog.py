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
    build_tagged_addresses,
    build_weights,
    canonical_fields,
    decode_error,
)
from shipyard.api.consul.common import (
    NO_PATH_TO_DATACENTER,
    ConsulError,
    bad_request,
    blocking_query,
    format_duration,
    json_response,
    parse_duration,
    query_flag,
    read_json,
    request_filter,
    same_answer,
)
from shipyard.api.context import platform_of
from shipyard.errors import NotFound
from shipyard.registry.catalog import PREFIX, SERVICES, STATUSES, CatalogSnapshot, Entry, _q, node_key
from shipyard.registry.config_entries import CONFIG_PREFIX, ConfigEntries, ConfigEntry
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
    peered = bool(request.query.get("peer"))

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        out: dict[str, list[str]] = {}
        for node, entry in [] if peered else all_instances(snap, platform.node.name):
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


# ---- which instances a query is about -------------------------------------------------------------------------

CONSUL_SERVICE = "consul"
CONSUL_SERVER_PORT = 8300  # the port Consul servers register their "consul" service on (and DNS answers with)


def server_service(snap: CatalogSnapshot, node: str) -> Entry | None:
    """The "consul" service every Consul server has in the catalog, for this server (Shipyard does not store it:
    the agent endpoints and the gateway must not see it), unless something registered a service of that name."""
    me = snap.nodes.get(node)
    if me is None or any(e.data.get("Service") == CONSUL_SERVICE for e in snap.services.values()):
        return None
    data = {"ID": CONSUL_SERVICE, "Service": CONSUL_SERVICE, "Tags": [], "Address": "", "Meta": {},
            "Port": CONSUL_SERVER_PORT, "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False}
    return Entry(data, me.create_index, me.create_index)


def all_instances(snap: CatalogSnapshot, this_node: str) -> list[tuple[str, Entry]]:
    found = [(node, entry) for (node, _), entry in sorted(snap.services.items())]
    server = server_service(snap, this_node)
    return found if server is None else sorted([*found, (this_node, server)], key=lambda p: (p[0], p[1].data["ID"]))


def named_instances(snap: CatalogSnapshot, name: str, this_node: str) -> list[tuple[str, Entry]]:
    if name == CONSUL_SERVICE:
        return [(n, e) for n, e in all_instances(snap, this_node) if e.data.get("Service") == CONSUL_SERVICE]
    return snap.services_named(name)


def connect_instances(snap: CatalogSnapshot, name: str) -> list[tuple[str, Entry]]:
    """Consul's connect-capable instances of a service: its connect-proxies, and itself where it is native."""
    out = []
    for (node, _), entry in sorted(snap.services.items()):
        data = entry.data
        proxy: dict[str, Any] = data["Proxy"] if isinstance(data.get("Proxy"), dict) else {}
        connect: dict[str, Any] = data["Connect"] if isinstance(data.get("Connect"), dict) else {}
        proxies_it = data.get("Kind") == "connect-proxy" and proxy.get("DestinationServiceName") == name
        if proxies_it or (data.get("Service") == name and connect.get("Native")):
            out.append((node, entry))
    return out


def instance_query(request: web.Request) -> tuple[str, Any, bool]:
    """(name, check of an instance against ?tag= and ?node-meta=, whether the answer is empty by ?peer=).

    ?peer=: Shipyard has no cluster peerings, so every peer name is unknown and, as in Consul, selects nothing."""
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    filters = node_meta_filters(request)

    def wanted(snap: CatalogSnapshot, node: str, entry: Entry) -> bool:
        return has_tags(entry, tags) and node_matches(snap, node, filters)

    return name, wanted, bool(request.query.get("peer"))


# ---- ?merge-central-config: proxy-defaults and service-defaults folded into proxy instances -------------------


async def central_proxy_config(entries: ConfigEntries, service: dict[str, Any]) -> dict[str, Any] | None:
    """The Proxy of a connect-proxy instance with the central config merged under it (Consul's
    MergeNodeServiceWithCentralConfig: proxy-defaults "global", then the destination's service-defaults; the
    instance's own settings win); None for any other instance, which Consul leaves as it is."""
    if service.get("Kind") != "connect-proxy" or not isinstance(service.get("Proxy"), dict):
        return None
    proxy = dict(service["Proxy"])
    merged: dict[str, Any] = {}
    defaults = await entries.find("proxy-defaults", "global")
    if defaults is not None:
        merged.update(_ci(defaults.body, "Config") or {})
        for field in ("Mode", "MeshGateway", "Expose", "TransparentProxy", "AccessLogs"):
            if not proxy.get(field) and _ci(defaults.body, field):
                proxy[field] = _ci(defaults.body, field)
    destination = await entries.find("service-defaults", str(proxy.get("DestinationServiceName") or ""))
    if destination is not None and _ci(destination.body, "Protocol"):
        merged["protocol"] = _ci(destination.body, "Protocol")
    merged.update(proxy.get("Config") or {})
    if merged:
        proxy["Config"] = merged
    return proxy


async def merge_central_config(request: web.Request, services: list[dict[str, Any]], proxy_key: str) -> None:
    """With ?merge-central-config, each proxy record's `proxy_key` (ServiceProxy of a catalog instance, Proxy of a
    health entry's Service) gets the central config merged in."""
    if not query_flag(request, "merge-central-config"):
        return
    entries = ConfigEntries(platform_of(request).store)
    kind_key = "ServiceKind" if proxy_key == "ServiceProxy" else "Kind"
    for service in services:
        proxy = await central_proxy_config(entries, {"Kind": service.get(kind_key), "Proxy": service.get(proxy_key)})
        if proxy is not None:
            service[proxy_key] = proxy


async def _catalog_instances(request: web.Request, connect: bool) -> web.Response:
    platform = platform_of(request)
    name, wanted, peered = instance_query(request)
    chosen = request_filter(request, SERVICE_NODE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        found = connect_instances(snap, name) if connect else named_instances(snap, name, platform.node.name)
        out = [snap.catalog_service_shape(node, entry) for node, entry in found if not peered
               and wanted(snap, node, entry)]
        await merge_central_config(request, out, "ServiceProxy")
        index = snap.services_index if connect else max(snap.name_index(name), 1)
        return select(chosen, out), index, snap.revision

    result, index = await blocking_query(request, platform.store, read, PREFIX, prefix=True, share=same_answer(request))
    return json_response(result, index=index)


@routes.get("/v1/catalog/service/{name:.+}")
async def catalog_service(request: web.Request) -> web.Response:
    return await _catalog_instances(request, connect=False)


@routes.get("/v1/catalog/connect/{name:.+}")
async def catalog_connect(request: web.Request) -> web.Response:
    return await _catalog_instances(request, connect=True)


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
        entries = snap.services_of_node(node)
        server = server_service(snap, node) if node == platform.node.name else None
        services = {e.data["ID"]: snap.node_service_shape(e) for e in [*entries, *filter(None, [server])]
                    if "ID" in e.data}
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
        service["TaggedAddresses"] = build_tagged_addresses(tagged, "NodeService")
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
        raise ConsulError(500, NO_PATH_TO_DATACENTER)
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
    dc = as_str(r, "Datacenter", "DeregisterRequest")
    if dc and dc != platform.node.datacenter:
        raise ConsulError(500, NO_PATH_TO_DATACENTER)
    sid = as_str(r, "ServiceID", "DeregisterRequest")
    cid = as_str(r, "CheckID", "DeregisterRequest")
    if sid:
        await platform.catalog.deregister_service(node, sid)
    elif cid:
        await platform.catalog.deregister_check(node, cid)
    else:
        await platform.catalog.deregister_node(node)
    return json_response(True)


# ---- gateway-services: what an ingress or terminating gateway's config entry routes to -------------------------

GATEWAY_KINDS = ("ingress-gateway", "terminating-gateway")


def _ci(body: Any, name: str) -> Any:
    """A config entry field, matched as Go decodes JSON (case-insensitively, snake_case too)."""
    if not isinstance(body, dict):
        return None
    wanted = name.lower()
    return next((v for k, v in body.items() if str(k).lower().replace("_", "") == wanted), None)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def gateway_links(entry: ConfigEntry, service_names: list[str]) -> list[dict[str, Any]]:
    """Consul's GatewayService records of one gateway config entry ("*" in an ingress listener: every service)."""
    base = {"Gateway": {"Name": entry.name}, "GatewayKind": entry.kind, "CreateIndex": entry.create_index,
            "ModifyIndex": entry.modify_index}
    out: list[dict[str, Any]] = []
    if entry.kind == "terminating-gateway":
        for svc in _listed(_ci(entry.body, "Services")):
            out.append({**base, "Service": {"Name": str(_ci(svc, "Name") or "")}, "Port": 0, "Protocol": "",
                        "CAFile": str(_ci(svc, "CAFile") or ""), "CertFile": str(_ci(svc, "CertFile") or ""),
                        "KeyFile": str(_ci(svc, "KeyFile") or ""), "SNI": str(_ci(svc, "SNI") or "")})
        return out
    for listener in _listed(_ci(entry.body, "Listeners")):
        port, protocol = _ci(listener, "Port") or 0, str(_ci(listener, "Protocol") or "tcp")
        for svc in _listed(_ci(listener, "Services")):
            name = str(_ci(svc, "Name") or "")
            names, wildcard = (service_names, True) if name == "*" else ([name], False)
            out += [{**base, "Service": {"Name": n}, "Port": port, "Protocol": protocol,
                     "Hosts": _ci(svc, "Hosts"), "FromWildcard": wildcard} for n in names]
    return out


@routes.get("/v1/catalog/gateway-services/{gateway:.+}")
async def catalog_gateway_services(request: web.Request) -> web.Response:
    platform = platform_of(request)
    gateway = request.match_info["gateway"]
    entries = ConfigEntries(platform.store)

    async def read() -> tuple[Any, int, int]:
        held = await platform.store.range(CONFIG_PREFIX, prefix=True)
        snap = await platform.catalog.snapshot()
        plain = sorted({str(e.data.get("Service")) for e in snap.services.values() if not e.data.get("Kind")})
        out: list[dict[str, Any]] = []
        for kind in GATEWAY_KINDS:
            entry = await entries.find(kind, gateway)
            if entry is not None:
                out += gateway_links(entry, plain)
        return out, held.index, held.revision

    result, index = await blocking_query(request, platform.store, read, CONFIG_PREFIX, prefix=True)
    return json_response(result, index=index)
