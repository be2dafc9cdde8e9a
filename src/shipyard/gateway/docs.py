"""API docs at the gateway: one OpenAPI document merging every routed service's own /openapi.json, with paths
rewritten to the gateway's routes, and a Swagger UI page served from assets shipped in the package (no CDN).

`merge_openapi` is a pure function; `docs_response` is what a worker calls for /docs, /docs/openapi.json and
/docs/assets/*. Never fetches anything but the services' own /openapi.json through the caller's `fetch`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import mimetypes
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DOCS_PATH = "/docs"
SPEC_PATH = "/docs/openapi.json"
ASSETS_PATH = "/docs/assets/"
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png")
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
FETCH_TIMEOUT = 5.0

Response = tuple[int, list[tuple[str, str]], bytes]


@dataclass(frozen=True, slots=True)
class SecurityScheme:
    """One way to present a credential that a route's auth plugin accepts, as an OpenAPI security scheme."""

    name: str  # the key under components.securitySchemes
    type: str  # "http" or "apiKey"
    scheme: str = ""  # http: "bearer" or "basic"
    location: str = ""  # apiKey: "header", "query" or "cookie"
    param: str = ""  # apiKey: the header, query parameter or cookie name
    description: str = ""

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "http":
            out["scheme"] = self.scheme
            if self.scheme == "bearer":
                out["bearerFormat"] = "JWT"
        else:
            out["in"], out["name"] = self.location, self.param
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class RouteAuth:
    """What one auth plugin on a route accepts: any one of `schemes`; `optional` when it lets anonymous through."""

    schemes: tuple[SecurityScheme, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Mount:
    """How one route exposes a service: requests to `prefix` + rest go upstream to service_path + rest when
    strip_path, else unchanged. `auth`: the route's auth plugins (each must pass, unless optional)."""

    prefix: str
    strip_path: bool = True
    service_path: str = ""
    hosts: tuple[str, ...] = ()
    auth: tuple[RouteAuth, ...] = ()


def _api_key(plugin: str, location: str, param: str) -> SecurityScheme:
    return SecurityScheme(f"{plugin}.{location}.{param}", "apiKey", location=location, param=param,
                          description=f"{plugin}: the credential in the {param!r} {location}")


def _jwt_schemes(config: Mapping[str, Any]) -> list[SecurityScheme]:
    headers = [str(h).lower() for h in config.get("header_names") or ["authorization"]]
    out = [SecurityScheme("jwt", "http", scheme="bearer", description="jwt: Authorization: Bearer <token>")
           if h == "authorization" else _api_key("jwt", "header", h) for h in headers]
    out += [_api_key("jwt", "query", str(p)) for p in config.get("uri_param_names", ["jwt"]) or []]
    out += [_api_key("jwt", "cookie", str(c)) for c in config.get("cookie_names") or []]
    return out


def _key_auth_schemes(config: Mapping[str, Any]) -> list[SecurityScheme]:
    names = [str(n) for n in config.get("key_names") or ["apikey"]]
    out = [_api_key("key-auth", "header", n) for n in names] if config.get("key_in_header", True) else []
    out += [_api_key("key-auth", "query", n) for n in names] if config.get("key_in_query", True) else []
    return out


def route_auth(plugins: Iterable[Any]) -> tuple[RouteAuth, ...]:
    """The security schemes of a route's auth plugins (jwt: bearer; key-auth: apiKey per key name and place;
    basic-auth: http basic); other plugins add none."""
    out = []
    for plugin in plugins:
        name, config = getattr(plugin, "name", ""), getattr(plugin, "config", None) or {}
        if name == "jwt":
            schemes = _jwt_schemes(config)
        elif name == "key-auth":
            schemes = _key_auth_schemes(config)
        elif name == "basic-auth":
            schemes = [SecurityScheme("basic-auth", "http", scheme="basic", description="basic-auth")]
        else:
            continue
        if schemes:
            out.append(RouteAuth(tuple(schemes), optional=bool(config.get("anonymous"))))
    return tuple(out)


def security_requirements(auth: tuple[RouteAuth, ...]) -> list[dict[str, list[str]]]:
    """OpenAPI `security` of an operation behind these plugins: each required plugin must pass (AND), each by
    any one of its schemes (OR); when all are optional (anonymous allowed), any one of them or none."""
    required = [a for a in auth if not a.optional]
    if not required:
        alternatives: list[dict[str, list[str]]] = [{s.name: []} for a in auth for s in a.schemes]
        return [*alternatives, {}]
    return [{s.name: [] for s in combo} for combo in itertools.product(*(a.schemes for a in required))]


def gateway_paths(upstream_path: str, mount: Mount) -> str | None:
    """The gateway path that reaches `upstream_path` through `mount`, None when this route cannot reach it."""
    service_path = mount.service_path.rstrip("/")
    if mount.strip_path:
        if service_path:
            if upstream_path != service_path and not upstream_path.startswith(service_path + "/"):
                return None
            upstream_path = upstream_path[len(service_path):] or "/"
        prefix = mount.prefix.rstrip("/")
        return (prefix + upstream_path) if upstream_path != "/" or not prefix else prefix or "/"
    full = service_path + upstream_path if service_path else upstream_path
    return full if full.startswith(mount.prefix) else None


def _rewrite_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v in renames:
                out[k] = renames[v]
            else:
                out[k] = _rewrite_refs(v, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    """Every `$ref` string under node."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for k, v in node.items() if k != "$ref"))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


Components = dict[str, dict[str, Any]]  # section -> name -> object


def _components_of(doc: Mapping[str, Any]) -> Components:
    comps = doc.get("components")
    if not isinstance(comps, Mapping):
        return {}
    return {str(sec): dict(items) for sec, items in comps.items() if isinstance(items, Mapping)}


def _clashing(all_components: Iterable[Components]) -> set[str]:
    """Refs (#/components/<section>/<name>) defined differently by two documents, or defined alike but referring
    (transitively) to one that is: those get a name per service; every other component is shared under its own
    name, once (FastAPI's HTTPValidationError, the same in every service, is one schema)."""
    variants: dict[str, list[Any]] = {}
    for comps in all_components:
        for section, items in comps.items():
            for name, item in items.items():
                variants.setdefault(f"#/components/{section}/{name}", []).append(item)
    clash = {ref for ref, items in variants.items() if any(i != items[0] for i in items[1:])}
    grew = True
    while grew:
        spread = {ref for ref, items in variants.items()
                  if ref not in clash and len(items) > 1 and any(_refs(i) & clash for i in items)}
        clash |= spread
        grew = bool(spread)
    return clash


def _renamed_security(security: Any, renames: Mapping[str, str]) -> Any:
    if not isinstance(security, list):
        return security
    return [{renames.get(k, k): v for k, v in req.items()} if isinstance(req, dict) else req for req in security]


@dataclass(slots=True)
class _ServiceDoc:
    """One service's document on its way into the merged one, with the names its components get there."""

    name: str
    doc: dict[str, Any]
    mounts: list[Mount]
    renames: dict[str, str]  # "#/components/<section>/<name>" -> its ref in the merged document
    scheme_renames: dict[str, str]  # security scheme name -> its name in the merged document

    def operations(self, item: Mapping[str, Any], mount: Mount) -> dict[str, Any]:
        """A path item as the gateway exposes it: tagged with the service, unique operationIds, and the `security`
        of the route's auth plugins (or the service's own, renamed, when the route has none)."""
        out = copy.deepcopy(dict(item))
        gateway_security = security_requirements(mount.auth) if mount.auth else None
        doc_security = _renamed_security(self.doc.get("security"), self.scheme_renames)
        for method in HTTP_METHODS:
            op = out.get(method)
            if not isinstance(op, dict):
                continue
            op["tags"] = [self.name]
            if op.get("operationId"):
                op["operationId"] = f"{self.name}.{op['operationId']}"
            if gateway_security is not None:
                op["security"] = gateway_security
            elif "security" in op:
                op["security"] = _renamed_security(op["security"], self.scheme_renames)
            elif doc_security is not None:
                op["security"] = doc_security
        return out


def _service_doc(name: str, doc: dict[str, Any], mounts: list[Mount], clash: set[str]) -> _ServiceDoc:
    renames = {}
    for section, items in _components_of(doc).items():
        for component in items:
            ref = f"#/components/{section}/{component}"
            if ref in clash:
                renames[ref] = f"#/components/{section}/{name}.{component}"
    schemes = {ref.rsplit("/", 1)[1]: new.rsplit("/", 1)[1] for ref, new in renames.items()
               if ref.startswith("#/components/securitySchemes/")}
    return _ServiceDoc(name, doc, mounts, renames, schemes)


def _gateway_schemes(services: Iterable[tuple[str, Any, list[Mount]]]) -> dict[str, Any]:
    return {scheme.name: scheme.to_openapi() for _, _, mounts in services
            for mount in mounts for auth in mount.auth for scheme in auth.schemes}


def _add_service(merged: dict[str, Any], entry: _ServiceDoc) -> None:
    for section, items in _components_of(entry.doc).items():
        target = merged["components"].setdefault(section, {})
        for component, item in items.items():
            ref = f"#/components/{section}/{component}"
            target[entry.renames.get(ref, ref).rsplit("/", 1)[1]] = _rewrite_refs(item, entry.renames)
    merged["tags"].append({"name": entry.name, "description": str((entry.doc.get("info") or {}).get("title") or "")})
    for upstream_path, item in entry.doc["paths"].items():
        if not isinstance(item, Mapping):
            continue
        item = _rewrite_refs(dict(item), entry.renames)
        for mount in entry.mounts:
            path = gateway_paths(str(upstream_path), mount)
            if path is not None and path not in merged["paths"]:
                merged["paths"][path] = entry.operations(item, mount)


def merge_openapi(services: Iterable[tuple[str, Mapping[str, Any], list[Mount]]], *, title: str = "Shipyard gateway"
                  ) -> dict[str, Any]:
    """One OpenAPI 3 document from (service name, its OpenAPI document, the routes that expose it). Components
    defined alike everywhere are shared once; a name two services define differently gets the service name as a
    prefix in each (`inventory.Item`, `users.Item`). Operations are tagged with their service, their operationIds
    made unique, and carry the security schemes of their route's auth plugins (so Swagger UI can authorize)."""
    valid = [(name, copy.deepcopy(dict(doc)), mounts) for name, doc, mounts in sorted(services, key=lambda s: s[0])
             if isinstance(doc, Mapping) and isinstance(doc.get("paths"), Mapping)]
    gateway_schemes = _gateway_schemes(valid)
    clash = _clashing([*(_components_of(doc) for _, doc, _ in valid), {"securitySchemes": gateway_schemes}])
    merged: dict[str, Any] = {"openapi": "3.0.3", "info": {"title": title, "version": "1"}, "paths": {},
                              "components": {"securitySchemes": dict(gateway_schemes)} if gateway_schemes else {},
                              "tags": []}
    for name, doc, mounts in valid:
        _add_service(merged, _service_doc(name, doc, mounts, clash))
    return merged


def swagger_ui_dir() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


@functools.cache
def _asset(name: str) -> bytes:
    # Read once per worker (a few MB at most): later requests never touch the disk from the event loop.
    return (swagger_ui_dir() / name).read_bytes()


def swagger_page(spec_url: str = SPEC_PATH) -> bytes:
    url = orjson.dumps(spec_url).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>API docs — Shipyard gateway</title>
<link rel="stylesheet" href="{ASSETS_PATH}swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PATH}favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS_PATH}swagger-ui-bundle.js"></script>
<script src="{ASSETS_PATH}swagger-ui-standalone-preset.js"></script>
<script>window.ui = SwaggerUIBundle({{url: {url}, dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "StandaloneLayout"}});</script>
</body></html>""".encode()


def mounts_by_service(route_table: Any) -> dict[str, tuple[Any, list[Mount]]]:
    """backend name -> (backend, mounts) from a RouteTable (its `routes` of CompiledRoute)."""
    out: dict[str, tuple[Any, list[Mount]]] = {}
    for route in getattr(route_table, "routes", []):
        spec = route.spec
        service_path = route.service_path.decode() if isinstance(route.service_path, bytes) else str(
            route.service_path or "")
        strip = bool(spec.strip_path)
        backend = route.backend
        mounts = out.setdefault(backend.name, (backend, []))[1]
        auth = route_auth(route.plugins.plugins if getattr(route, "plugins", None) is not None else ())
        for prefix in spec.paths or ("/",):
            if getattr(spec, "strip_prefix", "") and prefix.startswith(spec.strip_prefix):
                mounts.append(Mount(spec.strip_prefix, True, service_path, tuple(spec.hosts), auth))
            else:
                mounts.append(Mount(prefix, strip, service_path, tuple(spec.hosts), auth))
    return out


async def docs_response(path: str, route_table: Any, fetch: Callable[[Any, str], Awaitable[bytes | None]]
                        ) -> Response | None:
    """(status, headers, body) for a docs path, None for any other path. `fetch(backend, "/openapi.json")`
    returns the body an instance of that backend answered (None when it has none)."""
    if path in (DOCS_PATH, DOCS_PATH + "/"):
        return 200, [("Content-Type", "text/html; charset=utf-8")], swagger_page()
    if path.startswith(ASSETS_PATH):
        name = path[len(ASSETS_PATH):]
        if name not in ASSETS:
            return 404, [("Content-Type", "application/json")], b'{"message":"Not found"}'
        body = _asset(name)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return 200, [("Content-Type", ctype), ("Cache-Control", "public, max-age=86400")], body
    if path != SPEC_PATH:
        return None
    services = mounts_by_service(route_table)

    async def one(name: str, backend: Any, mounts: list[Mount]) -> tuple[str, Mapping[str, Any], list[Mount]] | None:
        try:
            raw = await asyncio.wait_for(fetch(backend, "/openapi.json"), FETCH_TIMEOUT)
            doc = orjson.loads(raw) if raw else None
        except (TimeoutError, OSError, orjson.JSONDecodeError, ValueError):
            return None
        return (name, doc, mounts) if isinstance(doc, Mapping) else None

    found = await asyncio.gather(*(one(n, b, m) for n, (b, m) in services.items()))
    merged = merge_openapi([f for f in found if f is not None])
    return 200, [("Content-Type", "application/json")], orjson.dumps(merged)
