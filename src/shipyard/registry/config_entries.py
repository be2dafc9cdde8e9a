"""Consul config entries under `config-entries/<kind>/<name>`: validated writes with check-and-set, reads and lists.

Owns the stored shape of every kind (service-defaults, proxy-defaults, routers, splitters, resolvers, gateways, ...);
it compiles nothing: the discovery chain reads these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from shipyard.errors import BadRequest, NotFound, ShipyardError
from shipyard.store import Compare, Delete, KeyValue, Put

if TYPE_CHECKING:
    from shipyard.store import Store

CONFIG_PREFIX = "config-entries/"
KINDS = (
    "service-defaults", "proxy-defaults", "service-router", "service-splitter", "service-resolver",
    "ingress-gateway", "terminating-gateway", "service-intentions", "mesh", "exported-services",
    "sameness-group", "api-gateway", "bound-api-gateway", "http-route", "tcp-route", "inline-certificate",
    "file-system-certificate", "jwt-provider", "control-plane-request-limit",
)
# Kinds that exist once per datacenter, under one fixed name.
SINGLETON_NAMES = {"proxy-defaults": "global", "mesh": "mesh"}
# The protocols a service-defaults entry may name.
PROTOCOLS = ("tcp", "http", "http2", "grpc")


class ConfigGraphError(ShipyardError):
    """An entry that would leave the entries inconsistent (Consul's RPC error: a 500)."""

    status = 500


def entry_key(kind: str, name: str) -> str:
    return f"{CONFIG_PREFIX}{kind}/{quote(name, safe='')}"


def kind_prefix(kind: str) -> str:
    return f"{CONFIG_PREFIX}{kind}/"


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    kind: str
    name: str
    body: dict[str, Any]
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        return {**self.body, "Kind": self.kind, "Name": self.name,
                "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


def decode_entry(kv: KeyValue) -> ConfigEntry:
    data = orjson.loads(kv.value)
    return ConfigEntry(data["Kind"], data["Name"], data, kv.create_revision, kv.mod_revision)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise BadRequest(f"invalid config entry kind: {kind}")
    return kind


def _field(body: dict[str, Any], name: str) -> Any:
    """Go decodes JSON field names case-insensitively (and Consul also takes snake_case); so do we."""
    wanted = name.lower()
    for key, value in body.items():
        if str(key).lower().replace("_", "") == wanted:
            return value
    return None


def normalize(body: Any) -> dict[str, Any]:
    """The entry as stored: Kind and Name canonical, the kind's own validation applied (Consul's Validate)."""
    if not isinstance(body, dict):
        raise BadRequest("Request decode failed: config entry must be a JSON object")
    kind, name = _field(body, "Kind"), _field(body, "Name")
    if not isinstance(kind, str) or not kind:
        raise BadRequest("Request decode failed: Payload does not contain a kind/Kind key at the top level")
    check_kind(kind)
    if not isinstance(name, str) or not name:
        raise BadRequest(f'Name is required for "{kind}" config entries')  # wording of Consul's validation
    fixed = SINGLETON_NAMES.get(kind)
    if fixed is not None and name != fixed:
        raise BadRequest(f'invalid name ("{name}"), only "{fixed}" is supported')
    entry = {k: v for k, v in body.items() if str(k).lower() not in ("kind", "name", "createindex", "modifyindex")}
    protocol = _field(entry, "Protocol")
    if protocol is not None:
        if not isinstance(protocol, str):
            raise BadRequest("Request decode failed: Protocol must be a string")
        entry = {k: v for k, v in entry.items() if str(k).lower() != "protocol"}
        entry["Protocol"] = protocol.lower()
    out = {"Kind": kind, "Name": name, **entry}
    _validate_kind(out)
    return out


def _validate_kind(entry: dict[str, Any]) -> None:
    """The per-kind checks of Consul's ConfigEntry.Validate that clients run into most."""
    kind = entry["Kind"]
    if kind == "service-splitter":
        splits = entry.get("Splits") or []
        if not isinstance(splits, list) or not splits:
            raise BadRequest("no splits configured")
        total = sum(float(s.get("Weight", 0)) for s in splits if isinstance(s, dict))
        if abs(total - 100.0) > 0.01:  # Consul compares weights scaled to 1/100ths of a percent
            raise BadRequest(f"the sum of all split weights must be 100, not {total:f}")
    if kind == "service-resolver":
        subsets = entry.get("Subsets") or {}
        default = entry.get("DefaultSubset") or ""
        if default and default not in subsets:
            raise BadRequest(f'DefaultSubset "{default}" is not a valid subset')
    if kind == "service-intentions":
        _validate_sources(entry.get("Sources"))
    protocol = entry.get("Protocol")
    if kind == "service-defaults" and protocol and protocol not in PROTOCOLS:
        raise BadRequest(f'invalid protocol "{protocol}": must be one of {", ".join(PROTOCOLS)}')


def _validate_sources(sources: Any) -> None:
    if sources is None:
        return
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise BadRequest("Request decode failed: Sources must be a list of objects")
    names = set()
    for source in sources:
        name = source.get("Name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Sources[*].Name is required")
        if name in names:
            raise BadRequest(f'Sources[*].Name "{name}" is duplicated')
        names.add(name)
        if source.get("Action") not in ("allow", "deny") and not source.get("Permissions"):
            raise BadRequest(f'Sources[*].Action must be set to "allow" or "deny" (source "{name}")')


ROUTING_KINDS = ("service-router", "service-splitter")


class ConfigEntries:
    """Reads and writes config entries; every write is one store txn guarded as Consul's cas asks."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def set(self, body: Any, cas: int | None = None) -> bool:
        entry = normalize(body)
        await self._check_protocols(entry)
        key = entry_key(entry["Kind"], entry["Name"])
        # cas=0: only if absent; cas=N: only if its ModifyIndex is still N; no cas: unconditionally.
        compares = [] if cas is None else [Compare(key, "mod", "=", cas)]
        result = await self.store.txn(compares, [Put(key, orjson.dumps(entry))])
        return result.succeeded

    async def _protocol(self, service: str, proposed: dict[str, Any]) -> str:
        """The service's protocol were `proposed` written: its service-defaults, else proxy-defaults, else tcp."""
        def pick(kind: str, name: str, stored: ConfigEntry | None) -> dict[str, Any]:
            if (proposed["Kind"], proposed["Name"]) == (kind, name):
                return proposed
            return stored.body if stored else {}

        defaults = pick("service-defaults", service, await self.find("service-defaults", service))
        if defaults.get("Protocol"):
            return str(defaults["Protocol"])
        proxy = pick("proxy-defaults", "global", await self.find("proxy-defaults", "global")).get("Config") or {}
        return str(proxy.get("protocol") or proxy.get("Protocol") or "tcp").lower()

    async def _check_protocols(self, proposed: dict[str, Any]) -> None:
        """Consul refuses a graph where a router or splitter applies to a service that is not HTTP, HTTP/2 or gRPC,
        whichever entry's write would make it so."""
        kind, name = proposed["Kind"], proposed["Name"]
        if kind in ROUTING_KINDS or kind == "service-defaults":
            services = [name]
        elif kind == "proxy-defaults":
            services = [e.name for k in ROUTING_KINDS for e in (await self.list(k))[0]]
        else:
            return
        for service in services:
            routed = kind in ROUTING_KINDS or any([await self.find(k, service) for k in ROUTING_KINDS])
            protocol = await self._protocol(service, proposed)
            if routed and protocol not in ("http", "http2", "grpc"):
                raise ConfigGraphError(
                    f'discovery chain "{service}" uses a protocol "{protocol}" that does not permit advanced '
                    "routing or splitting behavior"
                )

    async def get(self, kind: str, name: str) -> ConfigEntry:
        kv = await self.store.get(entry_key(check_kind(kind), name))
        if kv is None:
            raise NotFound(f'Config entry not found for "{kind}" / "{name}"')
        return decode_entry(kv)

    async def find(self, kind: str, name: str) -> ConfigEntry | None:
        kv = await self.store.get(entry_key(kind, name))
        return None if kv is None else decode_entry(kv)

    async def list(self, kind: str) -> tuple[list[ConfigEntry], int, int]:
        held = await self.store.range(kind_prefix(check_kind(kind)), prefix=True)
        entries = sorted((decode_entry(kv) for kv in held.kvs), key=lambda e: e.name)
        return entries, held.index, held.revision

    async def delete(self, kind: str, name: str, cas: int | None = None) -> bool:
        key = entry_key(check_kind(kind), name)
        compares = [] if cas is None else [Compare(key, "mod", "=", cas)]
        result = await self.store.txn(compares, [Delete(key)])
        return result.succeeded
