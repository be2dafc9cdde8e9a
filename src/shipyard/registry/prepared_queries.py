"""Consul prepared queries under `queries/<id>`: definitions (plain and name_prefix_match templates), lookup by ID or
name, and execution (health filtering, tags, node/service meta, Near sorting, limit, failover).

`execute_prepared_query` is the one entry point for both the HTTP API and DNS (`<query>.query.consul`); this
module never answers a request itself.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from shipyard.errors import NotFound, ShipyardError
from shipyard.registry.catalog import CRITICAL, PASSING
from shipyard.registry.coordinates import Coordinates, rtt_seconds
from shipyard.registry.sessions import _parse_go_duration, session_key

if TYPE_CHECKING:
    from shipyard.registry.catalog import Catalog, CatalogSnapshot
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

QUERY_PREFIX = "queries/"
TEMPLATE_TYPE = "name_prefix_match"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_VARIABLE = re.compile(r"\$\{\s*([^}]*?)\s*\}")
_MATCH_VAR = re.compile(r"^match\((\d+)\)$")


class QueryError(ShipyardError):
    """What Consul's prepared-query RPC refuses: its error comes back as a 500 with Consul's text."""

    status = 500


def query_key(query_id: str) -> str:
    return QUERY_PREFIX + query_id


_FIELDS = (
    "ID", "Name", "Session", "Token", "Template", "Type", "Regexp", "RemoveEmptyTags", "Service", "Failover",
    "NearestN", "Datacenters", "Targets", "OnlyPassing", "IgnoreCheckIDs", "Near", "Tags", "NodeMeta",
    "ServiceMeta", "Peer", "Connect", "Enabled", "DNS", "TTL",
)
_CANONICAL = {name.lower(): name for name in _FIELDS}


def canonical_keys(body: dict[str, Any]) -> dict[str, Any]:
    """Go decodes JSON field names case-insensitively (py-consul sends "service", "onlypassing"); so do we."""
    return {_CANONICAL.get(str(k).lower(), k): v for k, v in body.items()}


def _section(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QueryError(f"Request decode failed: {name} must be an object")
    return canonical_keys(value)


def _strings(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QueryError(f"Request decode failed: {name} must be a list of strings")
    return list(value)


def _string_map(value: Any, name: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise QueryError(f"Request decode failed: {name} must be an object of strings")
    return {str(k): v for k, v in value.items()}


def _service_section(body: dict[str, Any]) -> dict[str, Any]:
    service = _section(body, "Service")
    if not service.get("Service"):
        raise QueryError("Must provide a Service name to query")
    failover = _section(service, "Failover")
    nearest = failover.get("NearestN", 0)
    if not isinstance(nearest, int) or nearest < 0:
        raise QueryError(f"Bad NearestN '{nearest}', must be >= 0")
    return {
        "Service": str(service["Service"]),
        "Failover": {"NearestN": nearest, "Datacenters": _strings(failover.get("Datacenters"), "Datacenters"),
                     "Targets": failover.get("Targets")},
        "OnlyPassing": bool(service.get("OnlyPassing", False)),
        "IgnoreCheckIDs": _strings(service.get("IgnoreCheckIDs"), "IgnoreCheckIDs"),
        "Near": str(service.get("Near") or ""),
        "Tags": _strings(service.get("Tags"), "Tags"),
        "NodeMeta": _string_map(service.get("NodeMeta"), "NodeMeta"),
        "ServiceMeta": _string_map(service.get("ServiceMeta"), "ServiceMeta"),
        "Peer": str(service.get("Peer") or ""),
        "Connect": {"Enabled": bool(_section(service, "Connect").get("Enabled", False))},
    }


def _template_section(body: dict[str, Any]) -> dict[str, Any]:
    template = _section(body, "Template")
    kind = str(template.get("Type") or "")
    if kind not in ("", TEMPLATE_TYPE):
        raise QueryError(f"Bad Template.Type '{kind}'")
    regexp = str(template.get("Regexp") or "")
    try:
        re.compile(regexp)
    except re.error as exc:
        raise QueryError(f"Bad Regexp: {exc}") from None
    return {"Type": kind, "Regexp": regexp, "RemoveEmptyTags": bool(template.get("RemoveEmptyTags", False))}


def parse_query(body: Any, query_id: str) -> dict[str, Any]:
    """A stored query definition from a create/update body, validated as Consul's parseQuery does."""
    if not isinstance(body, dict):
        raise QueryError("Request decode failed: expected a JSON object")
    body = canonical_keys(body)
    name = str(body.get("Name") or "")
    if _UUID.match(name):
        raise QueryError("Query name cannot be a UUID")
    ttl = str(_section(body, "DNS").get("TTL") or "")
    if ttl:
        try:
            seconds = _parse_go_duration(ttl)
        except ValueError as exc:
            raise QueryError(f"Bad DNS TTL '{ttl}': {exc}") from None
        if seconds < 0:
            raise QueryError(f"DNS TTL '{ttl}', must be >=0")
    template = _template_section(body)
    service = _service_section(body)
    if template["Type"]:
        _check_variables(service)
    return {
        "ID": query_id, "Name": name, "Session": str(body.get("Session") or ""), "Token": str(body.get("Token") or ""),
        "Template": template, "Service": service, "DNS": {"TTL": ttl},
    }


def _check_variables(value: Any) -> None:
    for text in _strings_in(value):
        for variable in _VARIABLE.findall(text):
            if variable not in ("name.full", "name.prefix", "name.suffix", "agent.segment") \
                    and not _MATCH_VAR.match(variable):
                raise QueryError(f"Failed compiling template: unknown variable accessed: {variable}")


def _strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


def _render(value: Any, variables: dict[str, str], matches: list[str]) -> Any:
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            group = _MATCH_VAR.match(name)
            if group:
                index = int(group.group(1))
                return matches[index] if index < len(matches) else ""
            return variables.get(name, "")
        return _VARIABLE.sub(one, value)
    if isinstance(value, dict):
        return {k: _render(v, variables, matches) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, variables, matches) for v in value]
    return value


def render_template(query: dict[str, Any], name: str) -> dict[str, Any]:
    """A template applied to the name it was looked up by (Consul's ${name.*} and ${match(N)})."""
    template = query["Template"]
    prefix = query["Name"]
    variables = {"name.full": name, "name.prefix": prefix, "name.suffix": name[len(prefix):], "agent.segment": ""}
    matches: list[str] = []
    if template["Regexp"]:
        found = re.search(template["Regexp"], name)
        if found:
            matches = [found.group(0), *[g or "" for g in found.groups()]]
    rendered = {**query, "Service": _render(query["Service"], variables, matches)}
    if template["RemoveEmptyTags"] and rendered["Service"]["Tags"]:
        rendered["Service"]["Tags"] = [t for t in rendered["Service"]["Tags"] if t]
    return rendered


@dataclass
class QueryExecution:
    """What executing a query found: Consul's PreparedQueryExecuteResponse."""

    service: str
    nodes: list[dict[str, Any]]
    dns_ttl: str
    datacenter: str
    failovers: int = 0
    index: int = 0
    query: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"Service": self.service, "Nodes": self.nodes, "DNS": {"TTL": self.dns_ttl},
                "Datacenter": self.datacenter, "Failovers": self.failovers}


def _has_tags(service: dict[str, Any], tags: list[str]) -> bool:
    have = {str(t).lower() for t in service.get("Tags") or []}
    for tag in tags:
        wanted = tag.lower()
        if wanted.startswith("!"):
            if wanted[1:] in have:
                return False
        elif wanted not in have:
            return False
    return True


def _healthy(entry: dict[str, Any], only_passing: bool, ignored: set[str]) -> bool:
    for check in entry["Checks"]:
        if check["CheckID"] in ignored:
            continue
        status = check["Status"]
        if status == CRITICAL or (only_passing and status != PASSING):
            return False
    return True


def _meta_matches(have: dict[str, Any] | None, wanted: dict[str, str] | None) -> bool:
    return all((have or {}).get(k) == v for k, v in (wanted or {}).items())


def _connect_entries(snap: CatalogSnapshot, service: str) -> list[dict[str, Any]]:
    """With Connect enabled: the proxies for the service and its Connect-native instances (Consul's Connect)."""
    out = []
    for entry in snap.health_entries(service):
        if (entry["Service"].get("Connect") or {}).get("Native"):
            out.append(entry)
    for name in {e.data.get("Service", "") for e in snap.services.values() if e.data.get("Kind") == "connect-proxy"}:
        for entry in snap.health_entries(name):
            if (entry["Service"].get("Proxy") or {}).get("DestinationServiceName") == service:
                out.append(entry)
    return out


class PreparedQueries:
    """Definitions in the store, and their execution against the catalog."""

    def __init__(self, store: Store, catalog: Catalog, node: NodeIdentity) -> None:
        self.store = store
        self.catalog = catalog
        self.node = node

    async def _all(self) -> tuple[list[dict[str, Any]], int, int]:
        held = await self.store.range(QUERY_PREFIX, prefix=True)
        out = []
        for kv in held.kvs:
            query = orjson.loads(kv.value)
            # A query bound to a session goes with it (Consul deletes it; it is hidden here until then).
            if query.get("Session") and await self.store.get(session_key(query["Session"])) is None:
                continue
            out.append({**query, "CreateIndex": kv.create_revision, "ModifyIndex": kv.mod_revision})
        return sorted(out, key=lambda q: q["ID"]), held.index, held.revision

    async def all_queries(self) -> tuple[list[dict[str, Any]], int, int]:
        return await self._all()

    async def get(self, query_id: str) -> tuple[list[dict[str, Any]], int, int]:
        found, index, revision = await self._all()
        match = [q for q in found if q["ID"] == query_id]
        if not match:
            raise NotFound("Query not found")
        return match, index, revision

    async def _check_unique(self, query: dict[str, Any]) -> None:
        found, _, _ = await self._all()
        for other in found:
            if other["ID"] == query["ID"]:
                continue
            if query["Name"] and other["Name"] == query["Name"]:
                raise QueryError(f"name '{query['Name']}' aliases an existing query name")
            if query["Template"]["Type"] and not query["Name"] and other["Template"]["Type"] and not other["Name"]:
                raise QueryError("a query template with an empty name already exists")
        if query["Session"] and await self.store.get(session_key(query["Session"])) is None:
            raise QueryError(f"invalid session {query['Session']!r}")

    async def create(self, body: Any) -> str:
        query = parse_query(body, str(uuid.uuid4()))
        await self._check_unique(query)
        await self.store.put(query_key(query["ID"]), orjson.dumps(query))
        return str(query["ID"])

    async def update(self, query_id: str, body: Any) -> None:
        if await self.store.get(query_key(query_id)) is None:
            raise QueryError(f"Cannot modify non-existent prepared query: '{query_id}'")
        query = parse_query(body, query_id)
        await self._check_unique(query)
        await self.store.put(query_key(query_id), orjson.dumps(query))

    async def delete(self, query_id: str) -> None:
        count, _ = await self.store.delete(query_key(query_id))
        if not count:
            raise QueryError(f"Cannot delete non-existent prepared query: '{query_id}'")

    async def resolve(self, id_or_name: str) -> dict[str, Any] | None:
        """The query an ID or a name selects, templates rendered: an ID, else the exact name, else the template with
        the longest name that prefixes it (Consul's PreparedQueryResolve)."""
        found, _, _ = await self._all()
        for query in found:
            if query["ID"] == id_or_name:
                return render_template(query, id_or_name) if query["Template"]["Type"] else query
        for query in found:
            if query["Name"] == id_or_name and not query["Template"]["Type"]:
                return query
        templates = [q for q in found if q["Template"]["Type"] and id_or_name.startswith(q["Name"])]
        if not templates:
            return None
        best = max(templates, key=lambda q: len(q["Name"]))
        return render_template(best, id_or_name)

    async def execute(self, id_or_name: str, *, near: str = "", limit: int = 0, source_ip: str = "",
                      connect: bool = False) -> QueryExecution:
        query = await self.resolve(id_or_name)
        if query is None:
            raise NotFound("Query not found")
        spec = query["Service"]
        snap = await self.catalog.snapshot()
        entries = _connect_entries(snap, spec["Service"]) if connect or spec["Connect"]["Enabled"] \
            else snap.health_entries(spec["Service"])
        ignored = set(spec["IgnoreCheckIDs"] or [])
        entries = [
            e for e in entries
            if _healthy(e, spec["OnlyPassing"], ignored) and _has_tags(e["Service"], spec["Tags"] or [])
            and _meta_matches(e["Node"].get("Meta"), spec["NodeMeta"])
            and _meta_matches(e["Service"].get("Meta"), spec["ServiceMeta"])
        ]
        entries = await self._order(entries, spec["Near"] or near, source_ip)
        if limit > 0:
            entries = entries[:limit]
        # One datacenter: a failover has nowhere to go, so none is attempted and Failovers stays 0.
        return QueryExecution(spec["Service"], entries, query["DNS"]["TTL"], self.node.datacenter, 0,
                              snap.index, query)

    async def _order(self, entries: list[dict[str, Any]], near: str, source_ip: str) -> list[dict[str, Any]]:
        """Consul shuffles, then (with Near) sorts by estimated RTT from the named node; `_agent` is this node,
        `_ip` the node whose address the request came from. Nodes without a coordinate go last."""
        entries = list(entries)
        random.shuffle(entries)
        origin_node = {"_agent": self.node.name}.get(near, near)
        if near == "_ip":
            origin_node = next((e["Node"]["Node"] for e in entries if e["Node"].get("Address") == source_ip), "")
        if not origin_node:
            return entries
        coordinates = Coordinates(self.store, self.catalog, self.node)
        known, _, _ = await coordinates.nodes()
        coords = {c["Node"]: c["Coord"] for c in known}
        origin = coords.get(origin_node)
        if origin is None:
            return entries

        def distance(entry: dict[str, Any]) -> float:
            coord = coords.get(entry["Node"]["Node"])
            return rtt_seconds(origin, coord) if coord is not None else float("inf")

        return sorted(entries, key=distance)


async def execute_prepared_query(
    store: Store, catalog: Catalog, node: NodeIdentity, id_or_name: str, *, near: str = "", limit: int = 0,
    source_ip: str = "",
) -> QueryExecution | None:
    """Runs the prepared query an ID or name selects; None when there is none (DNS answers NXDOMAIN then).
    What DNS calls for `<query>.query.consul`."""
    try:
        return await PreparedQueries(store, catalog, node).execute(
            id_or_name, near=near, limit=limit, source_ip=source_ip
        )
    except NotFound:
        return None
