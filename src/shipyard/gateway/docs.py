"""API docs at the gateway: one OpenAPI document merging every routed service's own /openapi.json, with paths
rewritten to the gateway's routes, and a Swagger UI page served from assets shipped in the package (no CDN).

`merge_openapi` is a pure function; `docs_response` is what a worker calls for /docs, /docs/openapi.json and
/docs/assets/*. Never fetches anything but the services' own /openapi.json through the caller's `fetch`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
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
class Mount:
    """How one route exposes a service: requests to `prefix` + rest go upstream to service_path + rest when
    strip_path, else unchanged."""

    prefix: str
    strip_path: bool = True
    service_path: str = ""
    hosts: tuple[str, ...] = ()


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


def merge_openapi(services: Iterable[tuple[str, Mapping[str, Any], list[Mount]]], *, title: str = "Shipyard gateway"
                  ) -> dict[str, Any]:
    """One OpenAPI 3 document from (service name, its OpenAPI document, the routes that expose it). Component
    names get the service name as a prefix (two services may both define `Item`); operations are tagged with
    their service and their operationIds made unique."""
    merged: dict[str, Any] = {"openapi": "3.0.3", "info": {"title": title, "version": "1"}, "paths": {},
                              "components": {}, "tags": []}
    for service, doc, mounts in sorted(services, key=lambda s: s[0]):
        if not isinstance(doc, Mapping) or not isinstance(doc.get("paths"), Mapping):
            continue
        doc = copy.deepcopy(dict(doc))
        renames: dict[str, str] = {}
        components = doc.get("components") if isinstance(doc.get("components"), Mapping) else {}
        for section, items in components.items():
            if not isinstance(items, Mapping):
                continue
            target = merged["components"].setdefault(section, {})
            for name in items:
                renames[f"#/components/{section}/{name}"] = f"#/components/{section}/{service}.{name}"
            for name, item in items.items():
                target[f"{service}.{name}"] = item
        for section, items in merged["components"].items():
            merged["components"][section] = _rewrite_refs(items, renames)
        merged["tags"].append({"name": service, "description": str((doc.get("info") or {}).get("title") or "")})
        for upstream_path, item in doc["paths"].items():
            if not isinstance(item, Mapping):
                continue
            item = _rewrite_refs(dict(item), renames)
            for mount in mounts:
                path = gateway_paths(str(upstream_path), mount)
                if path is None or path in merged["paths"]:
                    continue
                new_item = copy.deepcopy(item)
                for method in HTTP_METHODS:
                    op = new_item.get(method)
                    if isinstance(op, dict):
                        op["tags"] = [service]
                        if op.get("operationId"):
                            op["operationId"] = f"{service}.{op['operationId']}"
                merged["paths"][path] = new_item
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
        for prefix in spec.paths or ("/",):
            if getattr(spec, "strip_prefix", "") and prefix.startswith(spec.strip_prefix):
                mounts.append(Mount(spec.strip_prefix, True, service_path, tuple(spec.hosts)))
            else:
                mounts.append(Mount(prefix, strip, service_path, tuple(spec.hosts)))
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
