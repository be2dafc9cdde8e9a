"""The compiled discovery chain of a service (Consul's /v1/discovery-chain): routers, splitters and resolvers from
the service's config entries, down to targets in this datacenter.

Reads config entries and compiles; it writes nothing and knows no HTTP.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

from shipyard.errors import BadRequest
from shipyard.registry.config_entries import ConfigEntries

if TYPE_CHECKING:
    from shipyard.store import Store

L7_PROTOCOLS = ("http", "http2", "grpc")
DEFAULT_CONNECT_TIMEOUT = "5s"
MAX_DEPTH = 16  # redirects and splits that loop are refused, as Consul does


class ChainCompiler:
    """One compilation: the entries it read, the nodes and targets it built."""

    def __init__(self, service: str, datacenter: str, trust_domain: str, entries: dict[tuple[str, str], Any],
                 overrides: dict[str, Any]) -> None:
        self.service = service
        self.datacenter = datacenter
        self.trust_domain = trust_domain
        self.entries = entries
        self.overrides = overrides
        self.nodes: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, dict[str, Any]] = {}

    def entry(self, kind: str, name: str) -> dict[str, Any] | None:
        found = self.entries.get((kind, name))
        return found if isinstance(found, dict) else None

    def protocol(self, service: str) -> str:
        if self.overrides.get("OverrideProtocol"):
            return str(self.overrides["OverrideProtocol"]).lower()
        defaults = self.entry("service-defaults", service) or {}
        if defaults.get("Protocol"):
            return str(defaults["Protocol"]).lower()
        proxy = (self.entry("proxy-defaults", "global") or {}).get("Config") or {}
        return str(proxy.get("protocol") or proxy.get("Protocol") or "tcp").lower()

    def target_id(self, service: str, subset: str) -> str:
        return ".".join(p for p in (subset, service, "default", "default", self.datacenter) if p)

    def resolver_node(self, service: str, subset: str = "", depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise BadRequest(f"detected circular resolver redirect for service {service!r}")
        resolver = self.entry("service-resolver", service) or {}
        redirect = resolver.get("Redirect") or {}
        if redirect.get("Service") or redirect.get("ServiceSubset"):
            return self.resolver_node(redirect.get("Service") or service, redirect.get("ServiceSubset") or "",
                                      depth + 1)
        subset = subset or str(resolver.get("DefaultSubset") or "")
        subsets = resolver.get("Subsets") or {}
        if subset and subset not in subsets:
            raise BadRequest(f"service {service!r} does not have a subset named {subset!r}")
        timeout = str(self.overrides.get("OverrideConnectTimeout") or resolver.get("ConnectTimeout")
                      or DEFAULT_CONNECT_TIMEOUT)
        target = self.add_target(service, subset, self.datacenter, timeout, subsets)
        name = f"resolver:{target}"
        node: dict[str, Any] = {"Type": "resolver", "Name": target,
                                "Resolver": {"ConnectTimeout": timeout, "Default": not resolver, "Target": target}}
        failover = self.failover_targets(service, subset, resolver, timeout)
        if failover:
            node["Resolver"]["Failover"] = {"Targets": failover}
        self.nodes[name] = node
        return name

    def failover_targets(self, service: str, subset: str, resolver: dict[str, Any], timeout: str) -> list[str]:
        """Consul's resolver Failover for this subset (or "*"): other services, subsets or datacenters, in order."""
        failover = (resolver.get("Failover") or {})
        policy = failover.get(subset or "*") or failover.get("*") or {}
        if not policy:
            return []
        other = str(policy.get("Service") or service)
        other_subset = str(policy.get("ServiceSubset") or "")
        other_subsets = (self.entry("service-resolver", other) or {}).get("Subsets") or {}
        datacenters = [str(dc) for dc in policy.get("Datacenters") or []] or [self.datacenter]
        found = [self.add_target(other, other_subset, dc, timeout, other_subsets) for dc in datacenters]
        own = self.target_id(service, subset)
        return [t for t in found if t != own]

    def add_target(self, service: str, subset: str, datacenter: str, timeout: str,
                   subsets: dict[str, Any]) -> str:
        target = ".".join(p for p in (subset, service, "default", "default", datacenter) if p)
        sni = ".".join(p for p in (subset, service, "default", datacenter, "internal", self.trust_domain) if p)
        self.targets[target] = {
            "ID": target, "Service": service, "ServiceSubset": subset, "Namespace": "default",
            "Partition": "default", "Datacenter": datacenter, "Peer": "",
            "MeshGateway": self.overrides.get("OverrideMeshGateway") or {"Mode": ""},
            "Subset": subsets.get(subset) or {}, "TransparentProxy": {}, "ConnectTimeout": timeout,
            "SNI": sni, "Name": sni,
        }
        return target

    def splitter_node(self, service: str, depth: int = 0) -> str:
        splitter = self.entry("service-splitter", service)
        if splitter is None or self.protocol(service) not in L7_PROTOCOLS:
            return self.resolver_node(service)
        if depth > MAX_DEPTH:
            raise BadRequest(f"detected circular reference in service-splitter for {service!r}")
        splits = []
        for split in splitter.get("Splits") or []:
            target_service = split.get("Service") or service
            if split.get("ServiceSubset") or target_service == service:
                next_node = self.resolver_node(target_service, split.get("ServiceSubset") or "")
            else:
                next_node = self.splitter_node(target_service, depth + 1)
            splits.append({"Weight": split.get("Weight", 0), "NextNode": next_node})
        name = f"splitter:{service}.default.default"
        self.nodes[name] = {"Type": "splitter", "Name": f"{service}.default.default", "Splits": splits}
        return name

    def router_node(self, service: str) -> str:
        router = self.entry("service-router", service)
        if router is None or self.protocol(service) not in L7_PROTOCOLS:
            return self.splitter_node(service)
        routes = []
        for route in router.get("Routes") or []:
            destination = route.get("Destination") or {}
            target_service = destination.get("Service") or service
            next_node = (self.resolver_node(target_service, destination["ServiceSubset"])
                         if destination.get("ServiceSubset") else self.splitter_node(target_service))
            routes.append({"Definition": route, "NextNode": next_node})
        # Consul appends the catch-all route to the service itself.
        catch_all = {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": service}}
        routes.append({"Definition": catch_all, "NextNode": self.splitter_node(service)})
        name = f"router:{service}.default.default"
        self.nodes[name] = {"Type": "router", "Name": f"{service}.default.default", "Routes": routes}
        return name

    def compile(self) -> dict[str, Any]:
        start = self.router_node(self.service)
        customized = bool(self.overrides)
        custom_hash = hashlib.sha256(orjson.dumps(self.overrides, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        configured = any((kind, self.service) in self.entries
                         for kind in ("service-router", "service-splitter", "service-resolver"))
        return {
            "ServiceName": self.service, "Namespace": "default", "Partition": "default",
            "Datacenter": self.datacenter, "CustomizationHash": custom_hash if customized else "",
            "Default": not configured and not customized, "Protocol": self.protocol(self.service),
            "ServiceMeta": (self.entry("service-defaults", self.service) or {}).get("Meta") or {},
            "EnvoyExtensions": None, "StartNode": start, "Nodes": self.nodes, "Targets": self.targets,
        }


async def compile_chain(store: Store, service: str, datacenter: str, trust_domain: str,
                        overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """(the compiled chain, the config entries' index it was compiled from)."""
    entries: dict[tuple[str, str], Any] = {}
    index = 0
    config = ConfigEntries(store)
    for kind in ("service-defaults", "proxy-defaults", "service-router", "service-splitter", "service-resolver"):
        found, kind_index, _ = await config.list(kind)
        index = max(index, kind_index)
        entries.update({(kind, e.name): e.body for e in found})
    chain = ChainCompiler(service, datacenter, trust_domain, entries, overrides or {}).compile()
    return chain, index
