"""The catalog as the DNS interface reads it: instances by lower-case service name with their health folded in.

Built from one CatalogSnapshot, immutable afterwards, so that answering a question needs no I/O; it never writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shipyard.registry.catalog import CRITICAL, PASSING, WARNING, CatalogSnapshot

CONSUL_SERVICE = "consul"
CONSUL_SERVER_PORT = 8300  # what Consul servers register their own "consul" service on
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    address: str
    meta: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Instance:
    node: NodeRecord
    service: str
    address: str  # the instance's own Address; "" when it has none (the node's address is used)
    port: int
    tags: frozenset[str]  # lower case
    status: str  # worst of its node's and its own checks: passing, warning or critical
    weight_passing: int
    weight_warning: int

    @property
    def weight(self) -> int:
        """Consul's findWeight: the Weights entry for the instance's aggregated status."""
        return self.weight_warning if self.status == WARNING else self.weight_passing


@dataclass(slots=True)
class CatalogView:
    revision: int  # the store revision this view is known to be current at
    snapshot: CatalogSnapshot
    services: dict[str, list[Instance]] = field(default_factory=dict)
    connect: dict[str, list[Instance]] = field(default_factory=dict)  # by destination service, lower case
    nodes: dict[str, NodeRecord] = field(default_factory=dict)  # by lower-case node name
    servers: list[NodeRecord] = field(default_factory=list)

    def instances(self, name: str, tag: str, *, only_passing: bool, connect: bool = False) -> list[Instance]:
        """Instances Consul's DNS would answer with: never critical, warning only unless only_passing."""
        pool = (self.connect if connect else self.services).get(name, [])
        out = []
        for inst in pool:
            if inst.status == CRITICAL or (only_passing and inst.status != PASSING):
                continue
            if tag and tag not in inst.tags:
                continue
            out.append(inst)
        return out


def build_view(snapshot: CatalogSnapshot, revision: int, this_node: str) -> CatalogView:
    view = CatalogView(revision, snapshot)
    for name, entry in snapshot.nodes.items():
        view.nodes[name.lower()] = _node_record(name, entry.data)
    status = _check_status(snapshot)
    for (node, sid), entry in snapshot.services.items():
        data = entry.data
        record = view.nodes.get(node.lower()) or NodeRecord(node, "", ())
        inst = _instance(record, data, _worst(status.get((node, ""), PASSING), status.get((node, sid), PASSING)))
        view.services.setdefault(inst.service.lower(), []).append(inst)
        destination = str(_mapping(data.get("Proxy")).get("DestinationServiceName") or "")
        if data.get("Kind") == "connect-proxy" and destination:
            view.connect.setdefault(destination.lower(), []).append(inst)
        elif _mapping(data.get("Connect")).get("Native"):
            view.connect.setdefault(inst.service.lower(), []).append(inst)
    _add_servers(view, this_node, status)
    return view


def restrict_view(view: CatalogView, readable: Callable[[str, str], bool]) -> CatalogView:
    """The part of the view a token may read, readable(resource, name) deciding ("service"/"node"): Consul's DNS
    answers with the agent's default (else the anonymous) token, so under default deny it names nothing unread."""
    out = CatalogView(view.revision, view.snapshot, servers=view.servers)
    out.nodes = {k: n for k, n in view.nodes.items() if readable("node", n.name)}

    def visible(instances: list[Instance]) -> list[Instance]:
        return [i for i in instances if readable("service", i.service) and readable("node", i.node.name)]

    out.services = {k: kept for k, v in view.services.items() if (kept := visible(v))}
    out.connect = {k: kept for k, v in view.connect.items() if (kept := visible(v))}
    return out


def instance_from_entry(entry: dict[str, Any], ignored_checks: frozenset[str] = frozenset()) -> Instance:
    """An Instance from one of Consul's health entries (what a prepared query's execution returns), its status
    the worst of the checks the query did not ignore."""
    node_data = _mapping(entry.get("Node"))
    node = _node_record(str(node_data.get("Node") or ""), node_data)
    status = PASSING
    for check in entry.get("Checks") or []:
        if isinstance(check, dict) and str(check.get("CheckID") or "") not in ignored_checks:
            status = _worst(status, str(check.get("Status") or PASSING))
    return _instance(node, _mapping(entry.get("Service")), status)


def _add_servers(view: CatalogView, this_node: str, status: dict[tuple[str, str], str]) -> None:
    # Consul servers register a "consul" service; Shipyard's server is in the catalog only as a node, so the
    # service is answered for it unless something registered one of that name.
    me = view.nodes.get(this_node.lower())
    if me is not None and CONSUL_SERVICE not in view.services:
        view.services[CONSUL_SERVICE] = [
            Instance(me, CONSUL_SERVICE, "", CONSUL_SERVER_PORT, frozenset(), status.get((me.name, ""), PASSING), 1, 1)
        ]
    view.servers = [inst.node for inst in view.services.get(CONSUL_SERVICE, [])]


def _node_record(name: str, data: dict[str, Any]) -> NodeRecord:
    meta = _mapping(data.get("Meta"))
    return NodeRecord(name, str(data.get("Address") or ""), tuple(sorted((str(k), str(v)) for k, v in meta.items())))


def _instance(node: NodeRecord, data: dict[str, Any], status: str) -> Instance:
    weights = _mapping(data.get("Weights"))
    try:
        port = int(data.get("Port") or 0)
    except (TypeError, ValueError):
        port = 0
    return Instance(
        node=node,
        service=str(data.get("Service") or ""),
        address=str(data.get("Address") or ""),
        port=port,
        tags=frozenset(str(t).lower() for t in data.get("Tags") or []),
        status=status,
        weight_passing=_weight(weights.get("Passing")),
        weight_warning=_weight(weights.get("Warning")),
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _weight(value: Any) -> int:
    try:
        return max(0, min(int(value), 65535)) if value is not None else 1
    except (TypeError, ValueError):
        return 1


def _check_status(snapshot: CatalogSnapshot) -> dict[tuple[str, str], str]:
    """(node, "") -> worst node-level status; (node, service id) -> worst status of that instance's checks."""
    out: dict[tuple[str, str], str] = {}
    for (node, _), entry in snapshot.checks.items():
        data = entry.data
        key = (node, str(data.get("ServiceID") or ""))
        status = str(data.get("Status") or PASSING)
        out[key] = _worst(out.get(key, PASSING), status)
    return out


def _worst(a: str, b: str) -> str:
    # Maintenance checks are stored as critical; unknown statuses count as critical, as in Consul's filter.
    return a if _SEVERITY.get(a, 2) >= _SEVERITY.get(b, 2) else b
