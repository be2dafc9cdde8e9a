"""The route table: an immutable value built by `build_route_table(store contents)` and swapped whole (Fabio's model).

It owns matching a request to a route and its backend; it never does I/O, never mutates after it is built, and
never keeps per-connection state (only a bounded cache of match results, which is a pure function of its input).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from shipyard.gateway.balancer import Balancer, build_balancer
from shipyard.gateway.own_listeners import OwnListeners
from shipyard.gateway.paths import RegexError, canonical_prefix, compile_route_regex, regex_error_text
from shipyard.gateway.plugin_chain import ConsumerIndex, PluginChain, build_consumers, records_under, resolve_plugins
from shipyard.gateway.plugins.base import PLUGINS, Plugin
from shipyard.gateway.routes import (
    BackendSpec,
    RouteSpec,
    StoreContents,
    Target,
    _seconds,
    balancing_from_record,
    healthy_targets,
    parse_target,
    records,
    registry_instances,
    route_from_record,
    route_from_tag,
)

log = logging.getLogger("shipyard.gateway.table")

MATCH_CACHE_SIZE = 10000


@dataclass(slots=True)
class Backend:
    spec: BackendSpec
    balancer: Balancer

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(slots=True)
class CompiledRoute:
    spec: RouteSpec
    backend: Backend
    plugins: PluginChain | None  # None when no plugin applies: the proxy skips building a RequestContext
    service_path: bytes
    response_phase: bool = False  # some plugin here overrides response(): upstream headers are handed to it
    log_phase: bool = False  # some plugin here overrides log()
    fast_plugins: tuple[Any, ...] | None = None  # the plugins, when all have fast_access and may use it (base.py)


@dataclass(slots=True)
class Match:
    route: CompiledRoute
    upstream_path: bytes  # the path to send upstream (strip_path, strip=, service path applied), no query

    @property
    def backend(self) -> Backend:
        return self.route.backend

    @property
    def plugins(self) -> list[Any]:
        return self.route.plugins.plugins if self.route.plugins is not None else []

    def plugins_for_consumer(self, consumer_id: str | None) -> list[Any]:
        return self.route.plugins.for_consumer(consumer_id) if self.route.plugins is not None else []


# An entry of a host group: (kind, prefix or compiled regex, order key, route). kind 0: prefix, 1: regex, 2: any path.
_Entry = tuple[int, Any, tuple[int, int], CompiledRoute]


class RouteTable:
    """`match(method, host, path, headers)`: host (exact, then wildcard, then any host), longest path prefix, then
    regex routes by priority, then routes without paths; the first whose methods and headers fit wins."""

    def __init__(self, routes: list[CompiledRoute], consumers: ConsumerIndex, revision: int = 0) -> None:
        self.routes = routes
        self.consumers = consumers
        self.revision = revision
        self.uses_headers = any(r.spec.headers for r in routes)
        exact: dict[str, list[_Entry]] = {}
        wildcard: dict[str, list[_Entry]] = {}
        anyhost: list[_Entry] = []
        for route in routes:
            entries: list[_Entry] = []
            for path in route.spec.paths:
                # Request paths are matched in their canonical form (paths.py): so are the routes' prefixes.
                prefix = canonical_prefix(path).encode("utf-8", "surrogateescape")
                entries.append((0, prefix, (0, -len(prefix)), route))
            for pattern, priority in route.spec.regex_paths:
                try:
                    entries.append((1, compile_route_regex(pattern), (1, -priority), route))
                except RegexError as exc:
                    log.warning("route %s: bad regex %r: %s", route.spec.id, pattern, regex_error_text(exc))
            if not route.spec.paths and not route.spec.regex_paths:
                entries.append((2, b"", (2, 0), route))
            for host in route.spec.hosts or ("",):
                if not host:
                    anyhost.extend(entries)
                elif host.startswith("*."):
                    wildcard.setdefault(host[1:], []).extend(entries)
                else:
                    exact.setdefault(host, []).extend(entries)
        for group in (*exact.values(), *wildcard.values(), anyhost):
            group.sort(key=lambda e: e[2])
        self._exact = exact
        self._wildcard = sorted(wildcard.items(), key=lambda item: -len(item[0]))  # longest suffix first
        self._any = anyhost
        self._cache: dict[tuple[bytes, bytes, bytes], Match | None] = {}

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, method: bytes, host: bytes, path: bytes,
              headers: Callable[[], Mapping[str, str]] | None = None) -> Match | None:
        """host: lowercase without port; path: without the query string; headers: called only when a route has
        header conditions, returns lowercase names -> value."""
        if not self.uses_headers:
            key = (method, host, path)
            found = self._cache.get(key, False)
            if found is not False:
                return found  # type: ignore[return-value]
            result = self._match(method, host, path, None)
            if len(self._cache) >= MATCH_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = result
            return result
        return self._match(method, host, path, headers() if headers is not None else {})

    def _match(self, method: bytes, host: bytes, path: bytes, headers: Mapping[str, str] | None) -> Match | None:
        host_s = host.decode("latin-1")
        groups = []
        if host_s in self._exact:
            groups.append(self._exact[host_s])
        for suffix, entries in self._wildcard:
            if host_s.endswith(suffix):
                groups.append(entries)
        groups.append(self._any)
        method_s = method.decode("latin-1")
        for entries in groups:
            for kind, pattern, _, route in entries:
                if kind == 0:
                    if not path.startswith(pattern):
                        continue
                    matched = len(pattern)
                elif kind == 1:
                    m = pattern.match(path)
                    if m is None:
                        continue
                    matched = m.end()
                else:
                    matched = 0
                spec = route.spec
                if spec.methods and method_s not in spec.methods:
                    continue
                if spec.headers and not _headers_fit(spec.headers, headers or {}):
                    continue
                return Match(route, _upstream_path(route, path, matched))
        return None


def _headers_fit(wanted: tuple[tuple[str, tuple[str, ...]], ...], headers: Mapping[str, str]) -> bool:
    for name, values in wanted:
        value = headers.get(name)
        if value is None or value not in values:
            return False
    return True


def _upstream_path(route: CompiledRoute, path: bytes, matched: int) -> bytes:
    spec = route.spec
    if spec.strip_path and matched:
        path = path[matched:]
    elif spec.strip_prefix:
        prefix = spec.strip_prefix.encode()
        if path.startswith(prefix):
            path = path[len(prefix) :]
    if route.service_path:
        base = route.service_path
        if not path or path == b"/":
            return base if path == b"" else base.rstrip(b"/") + b"/"
        return base.rstrip(b"/") + (path if path.startswith(b"/") else b"/" + path)
    if not path.startswith(b"/"):
        path = b"/" + path
    return path


# ---- building ---------------------------------------------------------------------------------------------


def _job_routes(contents: StoreContents) -> tuple[list[RouteSpec], list[dict[str, Any]]]:
    """Routes from `routes:` of each running service job; their `plugins:` become route-scoped plugin records."""
    routes: list[RouteSpec] = []
    plugin_records: list[dict[str, Any]] = []
    for key, job in records(contents, "jobs/"):
        if job.get("status") == "stopped":
            continue
        spec = job.get("spec") or {}
        name = str(spec.get("name") or unquote(key[len("jobs/") :]))
        if spec.get("kind", "service") != "service":
            continue
        for i, raw in enumerate(spec.get("routes") or []):
            if not isinstance(raw, Mapping):
                continue
            route_id = f"job:{name}:{i}"
            plugins = []
            for j, p in enumerate(raw.get("plugins") or []):
                if isinstance(p, Mapping) and p.get("name"):
                    plugins.append({"id": f"{route_id}:{j}", "name": p["name"], "config": p.get("config") or {},
                                    "enabled": p.get("enabled", True), "route": route_id})
            record = {k: v for k, v in raw.items() if k != "plugins"}
            record.setdefault("id", route_id)
            record["id"] = route_id
            record.setdefault("name", f"{name}-{i}")
            route = route_from_record(record, source="job", default_service=name, default_strip=False,
                                      plugins=tuple(plugins))
            if route is not None:
                routes.append(route)
                plugin_records.extend(plugins)
    return routes, plugin_records


# Targets refused because they are the server's own listeners, already logged (bounded: a warning per target).
_REFUSED_LOGGED: set[tuple[str, str]] = set()


def _without_own(found: tuple[Target, ...], own: OwnListeners, service: str) -> tuple[Target, ...]:
    """The targets that are not this server's own listeners; a registered service (or a urlprefix- tag) cannot
    make the gateway a door to the control API, the DNS port or the gateway itself."""
    # The ones kept are checked again once connected (upstream.py): a host name may resolve to this host.
    kept = tuple(replace(t, guarded=True) for t in found if not own.covers(t.host, t.port))
    if len(kept) < len(found):
        for target in found:
            if target not in kept and (service, target.address) not in _REFUSED_LOGGED:
                if len(_REFUSED_LOGGED) < 10000:
                    _REFUSED_LOGGED.add((service, target.address))
                log.warning("service %s: not routing to %s, a port of this server's own (name it in a gateway "
                            "service through the admin API to route there)", service, target.address)
    return kept


def build_route_table(contents: StoreContents, revision: int = 0, own: OwnListeners | None = None) -> RouteTable:
    """The whole table as a pure function of the store contents under gateway/, catalog/ and jobs/.

    own: this server's listeners. Targets that are among them are dropped unless the admin API names them
    literally (a gateway service's url or host:port, or an upstream's targets) for a route of the admin API or a
    job: never for a urlprefix- tag, never from the catalog's instances."""
    instances = registry_instances(contents)
    services = {rec.get("name") or unquote(k[len("gateway/services/") :]): rec
                for k, rec in records(contents, "gateway/services/")}
    upstreams = {rec.get("name") or unquote(k[len("gateway/upstreams/") :]): rec
                 for k, rec in records(contents, "gateway/upstreams/")}
    targets: dict[str, list[Target]] = {}
    for key, rec in records(contents, "gateway/targets/"):
        upstream = unquote(key[len("gateway/targets/") :].partition("/")[0])
        target = parse_target(str(rec.get("target") or ""), rec.get("weight", 100))
        if target is not None:
            targets.setdefault(upstream, []).append(target)

    route_specs: list[RouteSpec] = []
    for _, rec in records(contents, "gateway/routes/"):
        route = route_from_record(rec, source="gateway")
        if route is not None:
            route_specs.append(route)
    for name, insts in sorted(instances.items()):
        index = 0
        seen: set[str] = set()
        for inst in insts:
            for tag in inst.tags:
                if tag.startswith("urlprefix-") and tag not in seen:
                    seen.add(tag)
                    route = route_from_tag(tag, name, index)
                    index += 1
                    if route is not None:
                        route_specs.append(route)
    job_routes, job_plugins = _job_routes(contents)
    route_specs.extend(job_routes)

    backends: dict[tuple[str, bool], Backend] = {}

    def backend_for(service: str, from_tag: bool) -> Backend:
        if (service, from_tag) in backends:
            return backends[(service, from_tag)]
        record = services.get(service) or {}
        host = str(record.get("host") or service)
        upstream = upstreams.get(host)
        explicit = True  # named by the admin API (an upstream's targets, a service's literal address)
        if targets.get(host):
            found = tuple(sorted(targets[host], key=lambda t: t.address))
        elif host in instances:
            found = healthy_targets(instances[host])
            explicit = False
        else:
            literal = parse_target(f"{host}:{record.get('port')}" if record.get("port") else host, 1)
            found = (literal,) if literal is not None else ()
        if own is not None and (from_tag or not explicit):
            found = _without_own(found, own, service)
        spec = BackendSpec(
            name=service,
            targets=found,
            balancing=balancing_from_record(upstream),
            path=str(record.get("path") or ""),
            connect_timeout=_seconds(record.get("connect_timeout"), 5.0),
            read_timeout=_seconds(record.get("read_timeout"), 60.0),
            write_timeout=_seconds(record.get("write_timeout"), 60.0),
            retries=int(record.get("retries", 5) if isinstance(record.get("retries", 5), int) else 5),
            tls=record.get("protocol") == "https",
            tls_verify=record.get("tls_verify") is True,
        )
        backend = backends[(service, from_tag)] = Backend(spec, build_balancer(found, spec.balancing))
        return backend

    plugin_records = [*records_under(contents, "gateway/plugins/"), *job_plugins]
    compiled: list[CompiledRoute] = []
    for spec in route_specs:
        backend = backend_for(spec.service, spec.source == "tag")
        service_record = services.get(spec.service) or {"name": spec.service}
        chain = resolve_plugins(plugin_records, service=service_record, route={"id": spec.id, "name": spec.name})
        path = backend.spec.path
        # Consumer-scoped plugins may add phases once a consumer is known: count every plugin class they name.
        classes = [type(p) for p in chain.plugins] + [
            PLUGINS[r["name"]] for records_ in getattr(chain, "_consumer_records", {}).values()
            for _, r in records_ if r.get("name") in PLUGINS
        ]
        response_phase = any(c.response is not Plugin.response for c in classes)
        log_phase = any(c.log is not Plugin.log for c in classes)
        fast = (chain.plugins and not response_phase and not log_phase and not getattr(chain, "_consumer_records", None)
                and all(p.fast_access is not None for p in chain.plugins))
        compiled.append(CompiledRoute(
            spec=spec, backend=backend,
            plugins=chain if chain.plugins else None,  # consumer-scoped ones need an auth plugin here
            service_path=path.encode() if path and path != "/" else b"",
            response_phase=response_phase, log_phase=log_phase,
            fast_plugins=tuple(chain.plugins) if fast else None,
        ))
    return RouteTable(compiled, build_consumers(contents), revision)
