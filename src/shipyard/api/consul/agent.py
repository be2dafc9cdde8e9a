"""Consul /v1/agent endpoints: this node's services, checks, maintenance, self and members.

Decodes and validates requests the way Consul's agent does; the catalog and health checker do the work.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import web

from shipyard import __version__ as shipyard_version
from shipyard.api.cluster import cluster_members, leads
from shipyard.api.consul.common import (
    ConsulError,
    bad_request,
    blocking_query,
    format_duration,
    json_response,
    not_found,
    parse_duration,
    query_flag,
    read_json,
    request_filter,
)
from shipyard.api.consul.status import leader_address
from shipyard.api.context import Platform, platform_of
from shipyard.errors import NotFound
from shipyard.registry.catalog import CHECKS, SERF_CHECK_ID, SERVICES, STATUSES, _q
from shipyard.registry.filter import AGENT_SERVICE, HEALTH_CHECK
from shipyard.registry.health import SCRIPTS_DISABLED

routes = web.RouteTableDef()

CONSUL_VERSION = "1.17.0"  # the Consul API level we answer as; clients feature-gate on it
SERF_LAN_PORT = 8301
SERF_WAN_PORT = 8302
INVALID_CHECK_TYPES = ("GRPC", "UDP", "H2PING", "DockerContainerID", "AliasNode", "AliasService", "OSService")

# ---- request decoding: Consul matches field names case-insensitively and accepts snake_case ----

SERVICE_FIELDS = [
    "Kind", "ID", "Name", "Tags", "Address", "TaggedAddresses", "Meta", "Port", "SocketPath", "Check", "Checks",
    "Weights", "Token", "EnableTagOverride", "Proxy", "Connect", "Locality",
]
CHECK_FIELDS = [
    "ID", "CheckID", "Name", "Notes", "Status", "ServiceID", "ScriptArgs", "Args", "HTTP", "Header", "Method",
    "Body", "DisableRedirects", "TLSServerName", "TLSSkipVerify", "TCP", "TCPUseTLS", "UDP", "GRPC", "GRPCUseTLS",
    "H2PING", "H2PingUseTLS", "DockerContainerID", "Shell", "AliasNode", "AliasService", "OSService", "Interval",
    "Timeout", "TTL", "DeregisterCriticalServiceAfter", "SuccessBeforePassing", "FailuresBeforeWarning",
    "FailuresBeforeCritical", "OutputMaxSize", "Token", "Output", "Node", "Definition", "Type",
]


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def canonical_fields(raw: Any, fields: list[str], struct: str) -> dict[str, Any]:
    """Maps a JSON object's keys onto Consul's field names; unknown keys are ignored, as Go's decoder does."""
    if not isinstance(raw, dict):
        raise decode_error(raw, struct, "", "object")
    table = {_fold(f): f for f in fields}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = table.get(_fold(str(key)))
        if name is not None:
            out[name] = value
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def decode_error(value: Any, struct: str, field: str, go_type: str) -> ConsulError:
    where = f" into Go struct field {struct}.{field}" if field else f" into Go value of type structs.{struct}"
    return bad_request(f"Request decode failed: json: cannot unmarshal {_json_kind(value)}{where} of type {go_type}")


def as_str(d: dict[str, Any], key: str, struct: str) -> str:
    value = d.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise decode_error(value, struct, key, "string")
    return value


def as_int(d: dict[str, Any], key: str, struct: str) -> int:
    value = d.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise decode_error(value, struct, key, "int")
    if not -(1 << 63) <= value < 1 << 63:  # Go's int: Consul's decoder refuses a number it cannot hold
        raise decode_error(value, struct, key, "int")
    return int(value)


def as_bool(d: dict[str, Any], key: str, struct: str) -> bool:
    value = d.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise decode_error(value, struct, key, "bool")
    return value


def as_str_list(d: dict[str, Any], key: str, struct: str) -> list[str]:
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise decode_error(value, struct, key, "[]string")
    return list(value)


def as_str_map(d: dict[str, Any], key: str, struct: str) -> dict[str, str]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise decode_error(value, struct, key, "map[string]string")
    return dict(value)


def as_header(d: dict[str, Any], key: str, struct: str) -> dict[str, list[str]]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise decode_error(value, struct, key, "map[string][]string")
    out = {}
    for name, values in value.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise decode_error(values, struct, key, "[]string")
        out[str(name)] = list(values)
    return out


def as_duration(d: dict[str, Any], key: str) -> float:
    return parse_duration(d.get(key), key)


def _duration_text(seconds: float) -> str:
    # Never "": Go clients decode these with time.ParseDuration, which refuses it (a zero is "0s").
    return format_duration(seconds)


def build_check(
    raw: Any,
    *,
    struct: str,
    default_id: str,
    default_name: str,
    status_error: str,
    service_id: str | None = None,
) -> dict[str, Any]:
    """A check record in Consul's HealthCheck shape from a (case-folded) check definition.

    Raises Consul's 400 texts for invalid definitions; script checks are returned, the caller vets them."""
    c = canonical_fields(raw, CHECK_FIELDS, struct)
    check_id = as_str(c, "CheckID", struct) or as_str(c, "ID", struct) or default_id
    name = as_str(c, "Name", struct) or default_name
    status = as_str(c, "Status", struct)
    if status and status not in STATUSES:
        raise bad_request(status_error)
    script_args = as_str_list(c, "ScriptArgs", struct) or as_str_list(c, "Args", struct)
    interval = as_duration(c, "Interval")
    timeout = as_duration(c, "Timeout")
    ttl = as_duration(c, "TTL")
    deregister_after = as_duration(c, "DeregisterCriticalServiceAfter")
    http = as_str(c, "HTTP", struct)
    tcp = as_str(c, "TCP", struct)
    unsupported = [f for f in INVALID_CHECK_TYPES if c.get(f)]
    interval_check = bool(script_args or http or tcp or unsupported)
    if interval > 0 and ttl > 0:
        raise bad_request("Invalid check: Interval and TTL cannot both be specified")
    if interval_check and interval <= 0:
        raise bad_request("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks")
    if not interval_check and ttl <= 0:
        raise bad_request("Invalid check: TTL must be > 0 for TTL checks")
    if unsupported:
        raise bad_request(f"Invalid check: {unsupported[0]} checks are not supported by this agent")
    if script_args:
        kind = "script"
    elif http:
        kind = "http"
        if not http.startswith(("http://", "https://")):
            raise bad_request(f'Invalid check: HTTP check URL must start with http:// or https://: "{http}"')
    elif tcp:
        kind = "tcp"
    else:
        kind = "ttl"
    definition: dict[str, Any] = {
        "Interval": _duration_text(interval),
        "Timeout": _duration_text(timeout),
        "DeregisterCriticalServiceAfter": _duration_text(deregister_after),
        "IntervalDuration": int(interval * 1e9),
        "TimeoutDuration": int(timeout * 1e9),
        "TTLDuration": int(ttl * 1e9),
        "DeregisterCriticalServiceAfterDuration": int(deregister_after * 1e9),
    }
    if kind == "http":
        definition.update({
            "HTTP": http,
            "Header": as_header(c, "Header", struct),
            "Method": as_str(c, "Method", struct),
            "Body": as_str(c, "Body", struct),
            "TLSServerName": as_str(c, "TLSServerName", struct),
            "TLSSkipVerify": as_bool(c, "TLSSkipVerify", struct),
            "DisableRedirects": as_bool(c, "DisableRedirects", struct),
        })
    elif kind == "tcp":
        definition["TCP"] = tcp
    elif kind == "script":
        definition["ScriptArgs"] = script_args
    else:
        definition["TTL"] = _duration_text(ttl)
    sid = service_id if service_id is not None else as_str(c, "ServiceID", struct)
    return {
        "CheckID": check_id,
        "Name": name,
        "Status": status or "critical",
        "Notes": as_str(c, "Notes", struct),
        "Output": as_str(c, "Output", struct),
        "ServiceID": sid,
        "ServiceName": "",
        "ServiceTags": [],
        "Type": kind,
        "Interval": _duration_text(interval),
        "Timeout": _duration_text(timeout),
        "ExposedPort": 0,
        "Definition": definition,
    }


def build_weights(raw: Any, struct: str) -> dict[str, int]:
    if raw is None:
        return {"Passing": 1, "Warning": 1}
    w = canonical_fields(raw, ["Passing", "Warning"], "Weights")
    passing, warning = as_int(w, "Passing", struct), as_int(w, "Warning", struct)
    if passing < 1:
        raise bad_request("Invalid Weights: Passing must be greater than 0")
    if warning < 0:
        raise bad_request("Invalid Weights: Warning must be greater or equal than 0")
    return {"Passing": passing, "Warning": warning}


def build_tagged_addresses(raw: Any, struct: str) -> dict[str, dict[str, Any]]:
    """map[string]structs.ServiceAddress: each value's fields matched case-insensitively and answered with Consul's
    capitalisation ({"address": ..., "port": ...} in, {"Address": ..., "Port": ...} out)."""
    if not isinstance(raw, dict):
        raise decode_error(raw, struct, "TaggedAddresses", "map[string]structs.ServiceAddress")
    out = {}
    for tag, value in raw.items():
        a = canonical_fields(value, ["Address", "Port"], "ServiceAddress")
        out[str(tag)] = {"Address": as_str(a, "Address", "ServiceAddress"), "Port": as_int(a, "Port", "ServiceAddress")}
    return out


def _is_any_address(address: str) -> bool:
    return address in ("0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0")


def build_service(s: dict[str, Any], struct: str) -> dict[str, Any]:
    """A service record in Consul's agent-service shape from a case-folded ServiceDefinition."""
    name = as_str(s, "Name", struct)
    if not name:
        raise bad_request("Missing service name")
    address = as_str(s, "Address", struct)
    if _is_any_address(address):
        raise bad_request("Invalid service address")
    port = as_int(s, "Port", struct)
    if not 0 <= port <= 65535:
        raise bad_request(f"Invalid service port: {port}")
    service: dict[str, Any] = {
        "ID": as_str(s, "ID", struct) or name,
        "Service": name,
        "Tags": as_str_list(s, "Tags", struct),
        "Meta": as_str_map(s, "Meta", struct),
        "Port": port,
        "Address": address,
        "Weights": build_weights(s.get("Weights"), struct),
        "EnableTagOverride": as_bool(s, "EnableTagOverride", struct),
    }
    for meta_key in service["Meta"]:
        if meta_key.startswith("consul-"):
            raise bad_request(f"Invalid Service Meta: Key prefix 'consul-' is reserved for internal use: {meta_key}")
    kind = as_str(s, "Kind", struct)
    if kind:
        service["Kind"] = kind
    socket_path = as_str(s, "SocketPath", struct)
    if socket_path:
        service["SocketPath"] = socket_path
    tagged = s.get("TaggedAddresses")
    if tagged:
        service["TaggedAddresses"] = build_tagged_addresses(tagged, struct)
    for extra in ("Proxy", "Connect", "Locality"):
        if isinstance(s.get(extra), dict) and s[extra]:
            service[extra] = s[extra]
    return service


def service_checks(s: dict[str, Any], service: dict[str, Any], struct: str) -> list[dict[str, Any]]:
    """The checks embedded in a service definition (Check, then Checks), with Consul's default IDs."""
    raws: list[Any] = []
    if s.get("Check") not in (None, {}):
        raws.append(s["Check"])
    checks_raw = s.get("Checks")
    if checks_raw is not None:
        if not isinstance(checks_raw, list):
            raise decode_error(checks_raw, struct, "Checks", "structs.CheckTypes")
        raws += [c for c in checks_raw if c not in (None, {})]
    out = []
    sid = service["ID"]
    for i, raw in enumerate(raws):
        default_id = f"service:{sid}" if len(raws) == 1 else f"service:{sid}:{i + 1}"
        out.append(build_check(
            raw,
            struct="CheckType",
            default_id=default_id,
            default_name=f"Service '{service['Service']}' check",
            status_error="Status for checks must 'passing', 'warning', 'critical'",
            service_id=sid,
        ))
    return out


def vet_scripts(platform: Platform, checks: list[dict[str, Any]]) -> None:
    if platform.health.scripts.enabled:
        return
    if any(c.get("Type") == "script" for c in checks):
        raise ConsulError(500, SCRIPTS_DISABLED)


# ---- registration -----------------------------------------------------------------------------


@routes.put("/v1/agent/service/register")
async def agent_service_register(request: web.Request) -> web.Response:
    platform = platform_of(request)
    s = canonical_fields(await read_json(request), SERVICE_FIELDS, "ServiceDefinition")
    service = build_service(s, "ServiceDefinition")
    checks = service_checks(s, service, "ServiceDefinition")
    vet_scripts(platform, checks)
    raw_replace = request.query.get("replace-existing-checks")
    replace = raw_replace is not None and raw_replace in ("", "true")
    sidecar_raw = _take_sidecar(service)
    sidecar = None
    if sidecar_raw is not None:
        snap = await platform.catalog.snapshot()
        sidecar = build_sidecar(sidecar_raw, service, _sidecar_ports(snap.services_of_node(platform.node.name)))
    await platform.catalog.register_service(
        platform.node.name, service, checks, replace_existing_checks=replace
    )
    if sidecar is not None:
        await platform.catalog.register_service(platform.node.name, sidecar[0], sidecar[1],
                                                replace_existing_checks=replace)
    return json_response(None)


@routes.put("/v1/agent/service/deregister/{service_id:.+}")
async def agent_service_deregister(request: web.Request) -> web.Response:
    platform = platform_of(request)
    sid = request.match_info["service_id"]
    sidecar = await platform.catalog.get_service(platform.node.name, sidecar_id(sid))
    if not await platform.catalog.deregister_service(platform.node.name, sid):
        raise unknown_service(sid)
    if sidecar is not None and (sidecar.get("Proxy") or {}).get("DestinationServiceID") == sid:
        # Consul removes a sidecar registered through its parent's Connect.SidecarService with the parent.
        await platform.catalog.deregister_service(platform.node.name, sidecar_id(sid))
    return json_response(None)


# ---- Connect sidecars: Connect.SidecarService registers a connect-proxy service next to its parent ------------

SIDECAR_PORTS = range(21000, 21256)  # Consul's sidecar_min_port..sidecar_max_port defaults


def sidecar_id(service_id: str) -> str:
    return f"{service_id}-sidecar-proxy"


def _take_sidecar(service: dict[str, Any]) -> Any:
    """Removes Connect.SidecarService from the parent (Consul does not keep it there) and returns it, or None."""
    connect = service.get("Connect")
    if not isinstance(connect, dict):
        return None
    key = next((k for k in connect if _fold(str(k)) == "sidecarservice"), None)
    if key is None:
        return None
    raw = connect.pop(key)
    if not connect:
        service.pop("Connect")
    return {} if raw is None else raw


def _sidecar_ports(services: list[Any]) -> set[int]:
    return {e.data.get("Port") for e in services if e.data.get("Kind") == "connect-proxy"}


def build_sidecar(raw: Any, parent: dict[str, Any], taken: set[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sidecar service and its check, with Consul's defaults: "<id>-sidecar-proxy", the parent's tags and meta,
    the first free port from 21000, a proxy to the parent on 127.0.0.1, and a TCP check that it listens."""
    sc = canonical_fields(raw, SERVICE_FIELDS, "ServiceDefinition")
    sc.setdefault("ID", sidecar_id(parent["ID"]))
    sc.setdefault("Name", f"{parent['Service']}-sidecar-proxy")
    sc.setdefault("Kind", "connect-proxy")
    sc.setdefault("Tags", parent["Tags"])
    sc.setdefault("Meta", parent["Meta"])
    if not sc.get("Port"):
        free = [p for p in SIDECAR_PORTS if p not in taken]
        if not free:
            raise ConsulError(500, "No sidecar ports available")
        sc["Port"] = free[0]
    proxy = {"DestinationServiceName": parent["Service"], "DestinationServiceID": parent["ID"],
             "LocalServiceAddress": "127.0.0.1", "LocalServicePort": parent["Port"]}
    if isinstance(sc.get("Proxy"), dict):
        proxy.update(sc["Proxy"])
    sc["Proxy"] = proxy
    sidecar = build_service(sc, "ServiceDefinition")
    checks = service_checks(sc, sidecar, "ServiceDefinition")
    if not checks:
        address = f"{sidecar['Address'] or '127.0.0.1'}:{sidecar['Port']}"
        listening = {"Name": "Connect Sidecar Listening", "TCP": address, "Interval": "10s"}
        checks = service_checks({"Check": listening}, sidecar, "ServiceDefinition")
    return sidecar, checks


def unknown_service(sid: str) -> ConsulError:
    return not_found(f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.')


def unknown_check(cid: str) -> ConsulError:
    return not_found(f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')


@routes.put("/v1/agent/check/register")
async def agent_check_register(request: web.Request) -> web.Response:
    platform = platform_of(request)
    raw = await read_json(request)
    c = canonical_fields(raw, CHECK_FIELDS, "CheckDefinition")
    if not as_str(c, "Name", "CheckDefinition"):
        raise bad_request("Missing check name")
    check = build_check(
        raw,
        struct="CheckDefinition",
        default_id=as_str(c, "Name", "CheckDefinition"),
        default_name="",
        status_error="Bad check status",
    )
    vet_scripts(platform, [check])
    try:
        await platform.catalog.register_check(platform.node.name, check)
    except NotFound as exc:
        raise not_found(exc.message) from None
    return json_response(None)


@routes.put("/v1/agent/check/deregister/{check_id:.+}")
async def agent_check_deregister(request: web.Request) -> web.Response:
    platform = platform_of(request)
    cid = request.match_info["check_id"]
    if not await platform.catalog.deregister_check(platform.node.name, cid):
        raise unknown_check(cid)
    return json_response(None)


async def _ttl_update(request: web.Request, status: str, output: str) -> web.Response:
    platform = platform_of(request)
    cid = request.match_info["check_id"]
    try:
        await platform.health.update_ttl_check(cid, status, output)
    except NotFound:
        raise unknown_check(cid) from None
    return json_response(None)


@routes.put("/v1/agent/check/pass/{check_id:.+}")
async def agent_check_pass(request: web.Request) -> web.Response:
    return await _ttl_update(request, "passing", request.query.get("note", ""))


@routes.put("/v1/agent/check/warn/{check_id:.+}")
async def agent_check_warn(request: web.Request) -> web.Response:
    return await _ttl_update(request, "warning", request.query.get("note", ""))


@routes.put("/v1/agent/check/fail/{check_id:.+}")
async def agent_check_fail(request: web.Request) -> web.Response:
    return await _ttl_update(request, "critical", request.query.get("note", ""))


@routes.put("/v1/agent/check/update/{check_id:.+}")
async def agent_check_update(request: web.Request) -> web.Response:
    body = canonical_fields(await read_json(request), ["Status", "Output"], "checkUpdate")
    status = as_str(body, "Status", "checkUpdate")
    if status not in STATUSES:
        raise bad_request(f"Invalid check status: '{status}'")
    return await _ttl_update(request, status, as_str(body, "Output", "checkUpdate"))


# ---- maintenance ------------------------------------------------------------------------------


def _enable_param(request: web.Request) -> bool:
    """Go's strconv.ParseBool, which Consul uses for ?enable=."""
    if "enable" not in request.query:
        raise bad_request("Missing value for enable")
    raw = request.query["enable"]
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise bad_request(f"Invalid value for enable: {orjson.dumps(raw).decode()}")


@routes.put("/v1/agent/service/maintenance/{service_id:.*}")
async def agent_service_maintenance(request: web.Request) -> web.Response:
    platform = platform_of(request)
    sid = request.match_info["service_id"]
    if not sid:
        raise bad_request("Missing service ID")
    enable = _enable_param(request)
    try:
        if enable:
            await platform.catalog.enable_service_maintenance(
                platform.node.name, sid, request.query.get("reason", "")
            )
        else:
            await platform.catalog.disable_service_maintenance(platform.node.name, sid)
    except NotFound as exc:
        raise not_found(exc.message) from None
    return json_response(None)


@routes.put("/v1/agent/maintenance")
async def agent_node_maintenance(request: web.Request) -> web.Response:
    platform = platform_of(request)
    if _enable_param(request):
        await platform.catalog.enable_node_maintenance(platform.node.name, request.query.get("reason", ""))
    else:
        await platform.catalog.disable_node_maintenance(platform.node.name)
    return json_response(None)


# ---- reads ------------------------------------------------------------------------------------


@routes.get("/v1/agent/services")
async def agent_services(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = platform.node.name
    prefix = f"{SERVICES}{_q(node)}/"
    chosen = request_filter(request, AGENT_SERVICE)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        index = (await platform.store.range(prefix, prefix=True)).index
        result = {
            e.data["ID"]: snap.agent_service_shape(e, platform.node.datacenter)
            for e in snap.services_of_node(node)
            if isinstance(e.data.get("ID"), str)
        }
        if chosen is not None:
            result = {sid: shape for sid, shape in result.items() if chosen.matches(shape)}
        return result, index, snap.revision

    result, index = await blocking_query(request, platform.store, read, prefix, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/agent/service/{service_id:.+}")
async def agent_service(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = platform.node.name
    sid = request.match_info["service_id"]
    snap = await platform.catalog.snapshot()
    entry = snap.services.get((node, sid))
    if entry is None:
        raise not_found(f"unknown service ID: {sid}")
    shaped = snap.agent_service_shape(entry, platform.node.datacenter)
    content_hash = hashlib.sha256(orjson.dumps(shaped, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    shaped["ContentHash"] = content_hash
    response = json_response(shaped, index=entry.modify_index)
    response.headers["X-Consul-ContentHash"] = content_hash
    return response


@routes.get("/v1/agent/checks")
async def agent_checks(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = platform.node.name
    prefix = f"{CHECKS}{_q(node)}/"
    chosen = request_filter(request, HEALTH_CHECK)

    async def read() -> tuple[Any, int, int]:
        snap = await platform.catalog.snapshot()
        index = (await platform.store.range(prefix, prefix=True)).index
        # The agent's own checks: serfHealth is the servers' view of the node (catalog and health only).
        shapes = [snap.check_shape(e) for e in snap.checks_of_node(node)
                  if "CheckID" in e.data and e.data["CheckID"] != SERF_CHECK_ID]
        result = {c["CheckID"]: c for c in shapes if chosen is None or chosen.matches(c)}
        return result, index, snap.revision

    result, index = await blocking_query(request, platform.store, read, prefix, prefix=True)
    return json_response(result, index=index)


def member_of(platform: Platform, *, wan: bool = False) -> dict[str, Any]:
    node = platform.node
    return {
        # The WAN pool names servers "<node>.<datacenter>" (Consul's server naming across datacenters).
        "Name": f"{node.name}.{node.datacenter}" if wan else node.name,
        "Addr": node.address,
        "Port": SERF_WAN_PORT if wan else SERF_LAN_PORT,
        "Tags": {
            "acls": "0",
            "build": f"{CONSUL_VERSION}:shipyard-{shipyard_version}",
            "dc": node.datacenter,
            "ft_fs": "1",
            "ft_si": "1",
            "id": node.id,
            "port": "8300",
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
            "wan_join_port": "8302",
        },
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


@routes.get("/v1/agent/self")
async def agent_self(request: web.Request) -> web.Response:
    platform = platform_of(request)
    node = platform.node
    return json_response({
        "Config": {
            "Datacenter": node.datacenter,
            "PrimaryDatacenter": node.datacenter,
            "NodeName": node.name,
            "NodeID": node.id,
            "Revision": f"shipyard-{shipyard_version}",
            "Server": True,
            "Version": CONSUL_VERSION,
            "BuildDate": "2023-11-01T00:00:00Z",
        },
        "DebugConfig": {
            "Datacenter": node.datacenter,
            "NodeName": node.name,
            "EnableScriptChecks": platform.config.enable_script_checks,
            "ServerMode": True,
        },
        "Coord": {"Vec": [0, 0, 0, 0, 0, 0, 0, 0], "Error": 1.5, "Adjustment": 0, "Height": 1e-05},
        "Member": member_of(platform),
        "Stats": {
            "agent": {"checks": "", "services": ""},
            "consul": {
                "bootstrap": "true",
                "known_datacenters": "1",
                "leader": "true" if leads(platform) else "false",
                "leader_addr": leader_address(request),
                "server": "true",
            },
            "build": {"version": CONSUL_VERSION, "revision": f"shipyard-{shipyard_version}"},
        },
        "Meta": {"consul-network-segment": ""},
        # No xDS (gRPC) server: Envoy cannot be pointed at this agent, so no proxies and no ports (-1: disabled).
        "xDS": {"SupportedProxies": {"envoy": []}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    })


@routes.get("/v1/agent/members")
async def agent_members(request: web.Request) -> web.Response:
    platform, wan = platform_of(request), query_flag(request, "wan")
    return json_response(await cluster_members(platform, member_of(platform, wan=wan), wan=wan))
