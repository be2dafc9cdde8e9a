"""Route and backend definitions read from store contents: gateway/ entities, urlprefix- tags, job spec routes.

Pure parsing of records into immutable values; it never matches requests, never holds runtime state, never does I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

log = logging.getLogger("shipyard.gateway.routes")

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_WRITE_TIMEOUT = 60.0
DEFAULT_RETRIES = 5
ALGORITHMS = ("round-robin", "least-connections", "consistent-hashing")

StoreContents = Mapping[str, bytes]  # key -> raw value of everything under gateway/, catalog/ and jobs/


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route from any source. Paths are plain prefixes (Kong and Fabio); regex paths carry a priority."""

    id: str
    name: str
    service: str  # a gateway service entity name, or a registry service name
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    regex_paths: tuple[tuple[str, int], ...] = ()
    methods: frozenset[str] = frozenset()  # empty: any
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()  # lowercase name, accepted values
    strip_path: bool = False
    strip_prefix: str = ""  # Fabio's strip=/path: removed from the front of the upstream path
    preserve_host: bool = False
    source: str = "gateway"  # gateway | tag | job
    plugins: tuple[Mapping[str, Any], ...] = ()  # route-scoped plugin records (job specs)
    https_redirect: int = 0  # Kong's protocols: [https]: plain HTTP gets this status (426, or a 30x to https://)


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    weight: int = 1
    guarded: bool = field(default=False, compare=False)  # from the catalog: never one of the server's own listeners
    address: str = field(init=False, compare=False)  # "host:port": the key of pools and passive health
    host_header: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "host_header", address.encode("idna" if not self.host.isascii() else "ascii"))


@dataclass(frozen=True, slots=True)
class BalancingSpec:
    algorithm: str = "round-robin"
    hash_on: str = "none"  # none | header | cookie | ip
    hash_on_header: str = ""
    hash_on_cookie: str = ""
    failures: int = 3  # consecutive failures that eject an instance (passive health)
    eject_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Where a route's requests go: targets (already filtered to healthy registry instances) and how to call them."""

    name: str
    targets: tuple[Target, ...]
    balancing: BalancingSpec = BalancingSpec()
    path: str = ""  # prefix prepended to the upstream path (Kong service.path)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    retries: int = DEFAULT_RETRIES
    tls: bool = False  # the service's protocol is https: the gateway speaks TLS to its instances
    tls_verify: bool = False  # ...and checks their certificates (Kong's service tls_verify; off by default as Kong)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def records(contents: StoreContents, prefix: str) -> Iterable[tuple[str, dict[str, Any]]]:
    for key, raw in contents.items():
        if key.startswith(prefix):
            value = _loads(raw)
            if isinstance(value, dict):
                yield key, value


def _seconds(value: Any, default: float) -> float:
    """Kong's timeouts are milliseconds; accept numbers (ms) or Go-style duration strings."""
    if value is None or value == "":
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0.001, float(value) / 1000.0)
    if isinstance(value, str):
        total, matched = 0.0, False
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
            total += float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
            matched = True
        if matched:
            return total
    return default


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if isinstance(v, str | int) and str(v))
    return ()


def _headers(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, Mapping):
        return ()
    return tuple(sorted((str(k).lower(), _strings(v)) for k, v in value.items() if _strings(v)))


def _regexes(value: Any) -> tuple[tuple[str, int], ...]:
    out = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                out.append((item, 0))
            elif isinstance(item, Mapping) and isinstance(item.get("pattern"), str):
                out.append((item["pattern"], int(item.get("priority") or 0)))
    return tuple(out)


def route_from_record(record: Mapping[str, Any], *, source: str, default_service: str = "",
                      default_strip: bool = True, plugins: tuple[Mapping[str, Any], ...] = ()) -> RouteSpec | None:
    """A Kong-style route record (admin API or a job spec's routes: entry)."""
    service = str(record.get("service") or default_service)
    if not service:
        return None
    raw_paths = _strings(record.get("paths"))
    paths = tuple(p if p.startswith("/") else "/" + p for p in raw_paths if not p.startswith("~/"))
    # Kong 3's "~/pattern" paths (a job spec's routes: may use them as the admin API does)
    regexes = tuple((p[1:], 0) for p in raw_paths if p.startswith("~/"))
    route_id = str(record.get("id") or record.get("name") or "")
    return RouteSpec(
        id=route_id,
        name=str(record.get("name") or route_id),
        service=service,
        hosts=tuple(h.lower() for h in _strings(record.get("hosts"))),
        paths=paths,
        regex_paths=_regexes(record.get("regex_paths")) + regexes,
        methods=frozenset(m.upper() for m in _strings(record.get("methods"))),
        headers=_headers(record.get("headers")),
        strip_path=bool(record.get("strip_path", default_strip)),
        preserve_host=bool(record.get("preserve_host", False)),
        source=source,
        plugins=plugins,
        https_redirect=https_redirect_status(record),
    )


def https_redirect_status(record: Mapping[str, Any]) -> int:
    """0 when the route takes plain HTTP; else what Kong answers it: https_redirect_status_code (426 by default)."""
    protocols = _strings(record.get("protocols"))
    if not protocols or "http" in protocols or "https" not in protocols:
        return 0
    code = record.get("https_redirect_status_code")
    return code if isinstance(code, int) and code in (301, 302, 307, 308, 426) else 426


def route_from_tag(tag: str, service: str, index: int) -> RouteSpec | None:
    """Fabio's `urlprefix-[host]/path [opt=value ...]`; understood options: strip=/path."""
    if not tag.startswith("urlprefix-"):
        return None
    first, *options = tag[len("urlprefix-") :].split()
    slash = first.find("/")
    if slash < 0:
        return None
    host, path = first[:slash].lower(), first[slash:]
    strip = ""
    for option in options:
        name, _, value = option.partition("=")
        if name == "strip":
            strip = value
    return RouteSpec(
        id=f"tag:{service}:{index}",
        name=f"{service} {first}",
        service=service,
        hosts=(host,) if host else (),
        paths=(path,),
        strip_prefix=strip,
        source="tag",
    )


# ---- registry instances --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    id: str
    node: str
    host: str
    port: int
    tags: tuple[str, ...]
    status: str  # worst of its checks and its node's checks
    weights: tuple[int, int]  # (passing, warning)


_STATUS_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2}


def registry_instances(contents: StoreContents) -> dict[str, list[Instance]]:
    """Every registered service instance with its aggregated health (Consul's rules), by service name."""
    node_addresses: dict[str, str] = {}
    for key, node_record in records(contents, "catalog/nodes/"):
        node_addresses[unquote(key[len("catalog/nodes/") :])] = str(node_record.get("Address") or "")
    node_status: dict[str, int] = {}
    service_status: dict[tuple[str, str], int] = {}
    for key, check in records(contents, "catalog/checks/"):
        node = unquote(key[len("catalog/checks/") :].partition("/")[0])
        rank = _STATUS_RANK.get(str(check.get("Status")), 2)
        sid = str(check.get("ServiceID") or "")
        if sid:
            service_status[(node, sid)] = max(service_status.get((node, sid), 0), rank)
        else:
            node_status[node] = max(node_status.get(node, 0), rank)
    out: dict[str, list[Instance]] = {}
    for key, svc in records(contents, "catalog/services/"):
        node_part, _, sid_part = key[len("catalog/services/") :].partition("/")
        node, sid = unquote(node_part), unquote(sid_part)
        name = str(svc.get("Service") or "")
        port = svc.get("Port")
        if not name or not isinstance(port, int) or not 0 < port < 65536:
            continue
        rank = max(node_status.get(node, 0), service_status.get((node, sid), 0))
        weights = svc.get("Weights") or {}
        out.setdefault(name, []).append(Instance(
            service=name, id=sid, node=node, host=str(svc.get("Address") or node_addresses.get(node) or "127.0.0.1"),
            port=port, tags=_strings(svc.get("Tags")), status=("passing", "warning", "critical")[rank],
            weights=(int(weights.get("Passing", 1) or 0), int(weights.get("Warning", 1) or 0)),
        ))
    for instances in out.values():
        instances.sort(key=lambda i: (i.node, i.id))
    return out


def healthy_targets(instances: Iterable[Instance]) -> tuple[Target, ...]:
    """Passing instances at their passing weight, warning ones at their warning weight; critical never."""
    out = []
    for inst in instances:
        if inst.status == CRITICAL:
            continue
        weight = inst.weights[0] if inst.status == PASSING else inst.weights[1]
        if weight > 0:
            out.append(Target(inst.host, inst.port, weight))
    return tuple(out)


def balancing_from_record(record: Mapping[str, Any] | None) -> BalancingSpec:
    if not record:
        return BalancingSpec()
    algorithm = str(record.get("algorithm") or "round-robin")
    if algorithm not in ALGORITHMS:
        algorithm = "round-robin"
    passive = ((record.get("healthchecks") or {}).get("passive") or {}) if isinstance(
        record.get("healthchecks"), Mapping) else {}
    unhealthy = passive.get("unhealthy") or {} if isinstance(passive, Mapping) else {}
    failures = unhealthy.get("failures") or unhealthy.get("tcp_failures") or unhealthy.get("timeouts") or 3
    return BalancingSpec(
        algorithm=algorithm,
        hash_on=str(record.get("hash_on") or "none"),
        hash_on_header=str(record.get("hash_on_header") or "").lower(),
        hash_on_cookie=str(record.get("hash_on_cookie") or ""),
        failures=max(1, int(failures)),
        eject_seconds=float(passive.get("eject_seconds") or 10.0) if isinstance(passive, Mapping) else 10.0,
    )


def parse_target(text: str, weight: Any = 100) -> Target | None:
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        w = int(weight if weight is not None else 100)
    except (TypeError, ValueError):
        return None
    return Target(host.strip("[]"), int(port), w) if w > 0 else None
