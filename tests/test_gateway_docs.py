"""API docs on the gateway: two real services with their own OpenAPI documents, routed under different prefixes
(one by a urlprefix- tag from the Consul API, one by the gateway admin API), merged at /docs/openapi.json with
gateway paths that really reach the operations; the Swagger UI page at /docs loads every asset from the gateway."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import jwt
import pytest
import requests

from support import ServerProcess, free_port

APP = str(Path(__file__).parent / "apps" / "openapi_service.py")


def wait_until(check, what: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# Three more routes to the users service, each behind one auth plugin, and a consumer with a credential for each.
AUTH_ROUTES = {
    "/key/users": {"name": "key-auth", "config": {"key_names": ["apikey", "x-api-key"], "key_in_query": False}},
    "/jwt/users": {"name": "jwt", "config": {}},
    "/basic/users": {"name": "basic-auth", "config": {}},
}
JWT_SECRET = "s" * 32


def add_auth_routes(admin: str) -> None:
    for path, plugin in AUTH_ROUTES.items():
        name = "users" + path.split("/")[1]
        assert requests.post(f"{admin}/services/users-api/routes",
                             json={"name": name, "paths": [path], "strip_path": True}).status_code == 201
        assert requests.post(f"{admin}/routes/{name}/plugins", json=plugin).status_code == 201
    assert requests.post(f"{admin}/consumers", json={"username": "alice"}).status_code == 201
    for kind, body in (("key-auth", {"key": "alice-key"}), ("basic-auth", {"username": "alice", "password": "pw"}),
                       ("jwt", {"key": "alice-iss", "secret": JWT_SECRET})):
        assert requests.post(f"{admin}/consumers/alice/{kind}", json=body).status_code == 201


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("docs")
    procs = []
    ports = {}
    for name in ("inventory", "users"):
        port = ports[name] = free_port()
        procs.append(subprocess.Popen([sys.executable, APP, str(port), name], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    server = ServerProcess(base / "data")
    server.extra += ["--gateway-port", str(server.gateway_port), "--gateway-workers", "2"]
    server.start()
    try:
        for port in ports.values():
            wait_until(lambda p=port: requests.get(f"http://127.0.0.1:{p}/health", timeout=1).ok, "the services")
        client = consul.Consul(host="127.0.0.1", port=server.http_port)
        # inventory: by a Fabio tag, with a first instance (sorted first) whose process is gone, so the gateway
        # must get the document from the next passing instance.
        client.agent.service.register("inventory", service_id="inventory-0-gone", address="127.0.0.1",
                                      port=free_port(), tags=["urlprefix-/shop/inventory strip=/shop/inventory"])
        client.agent.service.register("inventory", service_id="inventory-1", address="127.0.0.1",
                                      port=ports["inventory"], tags=["urlprefix-/shop/inventory strip=/shop/inventory"])
        # users: through the admin API, a Kong service over the registry service and a route stripping /api/users.
        client.agent.service.register("users", service_id="users-1", address="127.0.0.1", port=ports["users"])
        admin = server.url + "/api/gateway"
        assert requests.post(f"{admin}/services", json={"name": "users-api", "host": "users"}).status_code == 201
        assert requests.post(f"{admin}/services/users-api/routes",
                             json={"name": "users", "paths": ["/api/users"], "strip_path": True}).status_code == 201
        add_auth_routes(admin)
        yield server
    finally:
        server.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_openapi_merges_both_services_under_gateway_paths(docs_server: ServerProcess) -> None:
    gw = docs_server.gateway_url

    def merged() -> dict | None:
        doc = requests.get(f"{gw}/docs/openapi.json", timeout=10).json()
        return doc if {"inventory", "users-api"} <= {t["name"] for t in doc["tags"]} else None

    doc = wait_until(merged, "both services in the merged document")
    assert doc["openapi"].startswith("3.")
    open_paths = {p for p in doc["paths"] if not p.startswith(tuple(AUTH_ROUTES))}
    assert open_paths == {"/shop/inventory/items", "/shop/inventory/items/{id}", "/api/users/items",
                          "/api/users/items/{id}"}
    assert not any("security" in op for p in open_paths for op in doc["paths"][p].values())
    inventory_get = doc["paths"]["/shop/inventory/items/{id}"]["get"]
    assert inventory_get["tags"] == ["inventory"] and inventory_get["operationId"] == "inventory.get_item"
    assert doc["paths"]["/api/users/items"]["post"]["operationId"] == "users-api.create_item"
    # Both services call their schema Item but define it differently: each keeps its own, and references point at
    # the right one. ItemList is written alike in both but is made of that service's Item: one each as well.
    # HTTPValidationError and ValidationError are the same everywhere: one of each, under their own names.
    assert set(doc["components"]["schemas"]) == {"inventory.Item", "users-api.Item", "inventory.ItemList",
                                                 "users-api.ItemList", "HTTPValidationError", "ValidationError"}
    schema = doc["paths"]["/api/users/items/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert schema["schema"] == {"$ref": "#/components/schemas/users-api.Item"}
    item_list = doc["components"]["schemas"]["inventory.ItemList"]
    assert item_list["items"] == {"$ref": "#/components/schemas/inventory.Item"}
    listed = doc["paths"]["/shop/inventory/items"]["get"]["responses"]["200"]["content"]["application/json"]
    assert listed["schema"] == {"$ref": "#/components/schemas/inventory.ItemList"}
    invalid = doc["paths"]["/api/users/items"]["post"]["responses"]["422"]["content"]["application/json"]
    assert invalid["schema"] == {"$ref": "#/components/schemas/HTTPValidationError"}
    assert doc["components"]["schemas"]["HTTPValidationError"]["properties"]["detail"]["items"] == {
        "$ref": "#/components/schemas/ValidationError"}
    # The documented gateway paths are the ones that work: call each listed GET through the gateway.
    for path in open_paths:
        url = gw + path.replace("{id}", "7")
        r = requests.get(url, timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text)
        body = r.json()
        service = "inventory" if path.startswith("/shop/") else "users"
        assert (body[0] if isinstance(body, list) else body)["service"] == service
    created = requests.post(f"{gw}/api/users/items", json={"id": 3}, timeout=10)
    assert created.status_code == 201 and created.json() == {"id": 3, "service": "users"}


def credential_for(scheme: dict[str, str]) -> dict[str, Any]:
    """requests keyword arguments that present alice's credential the way `scheme` (from the merged document) says,
    as Swagger UI's Authorize would."""
    if scheme["type"] == "http" and scheme["scheme"] == "bearer":
        token = jwt.encode({"iss": "alice-iss", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
        return {"headers": {"Authorization": f"Bearer {token}"}}
    if scheme["type"] == "http" and scheme["scheme"] == "basic":
        return {"auth": ("alice", "pw")}
    if scheme["type"] == "apiKey" and scheme["in"] == "header":
        return {"headers": {scheme["name"]: "alice-key"}}
    if scheme["type"] == "apiKey" and scheme["in"] == "query":
        token = jwt.encode({"iss": "alice-iss", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
        return {"params": {scheme["name"]: token}}
    raise AssertionError(f"unexpected scheme {scheme}")


def test_openapi_security_schemes_come_from_route_plugins(docs_server: ServerProcess) -> None:
    gw = docs_server.gateway_url
    def with_auth_routes() -> dict[str, Any] | None:
        doc: dict[str, Any] = requests.get(f"{gw}/docs/openapi.json", timeout=10).json()
        return doc if "/basic/users/items" in doc["paths"] else None

    doc = wait_until(with_auth_routes, "the auth routes in the document")
    schemes = doc["components"]["securitySchemes"]
    assert schemes == {
        "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "jwt: Authorization: Bearer <token>"},
        "jwt.query.jwt": {"type": "apiKey", "in": "query", "name": "jwt",
                          "description": "jwt: the credential in the 'jwt' query"},
        "key-auth.header.apikey": {"type": "apiKey", "in": "header", "name": "apikey",
                                   "description": "key-auth: the credential in the 'apikey' header"},
        "key-auth.header.x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                      "description": "key-auth: the credential in the 'x-api-key' header"},
        "basic-auth": {"type": "http", "scheme": "basic", "description": "basic-auth"},
    }
    expected = {"/key/users": [{"key-auth.header.apikey": []}, {"key-auth.header.x-api-key": []}],
                "/jwt/users": [{"jwt": []}, {"jwt.query.jwt": []}],
                "/basic/users": [{"basic-auth": []}]}
    for prefix, security in expected.items():
        for path in (f"{prefix}/items", f"{prefix}/items/{{id}}"):
            for method, op in doc["paths"][path].items():
                assert op["security"] == security, (path, method)
    # "Try it out" after Authorize: each scheme the document names gets through; without it, 401. The gateway
    # workers follow the consumers' credentials from the store: the last one made may reach them a moment after
    # the routes did (the document waited for those only).
    for prefix, security in expected.items():
        url = f"{gw}{prefix}/items/7"
        assert requests.get(url, timeout=10).status_code == 401, url
        for requirement in security:
            [name] = requirement

            def through(url: str = url, name: str = name) -> bool:
                r = requests.get(url, timeout=10, **credential_for(schemes[name]))
                return r.status_code == 200 and r.json() == {"id": 7, "service": "users"}

            wait_until(through, f"{url} with the {name} credential", timeout=30)


def test_swagger_ui_page_loads_its_assets_from_the_gateway(docs_server: ServerProcess) -> None:
    gw = docs_server.gateway_url
    page = requests.get(f"{gw}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text and '"/docs/openapi.json"' in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(refs) >= 3 and not [r for r in refs if "//" in r]  # nothing from a CDN or another host
    kinds = {}
    for ref in refs:
        r = requests.get(gw + ref, timeout=10)
        assert r.status_code == 200, ref
        kinds[ref.rsplit(".", 1)[-1]] = r.headers["Content-Type"]
    assert "css" in kinds["css"] and "javascript" in kinds["js"] and kinds["png"] == "image/png"
    bundle = requests.get(f"{gw}/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert len(bundle.content) > 100_000 and "SwaggerUIBundle" in bundle.text
    assert requests.get(f"{gw}/docs/assets/../../etc/passwd", timeout=10).status_code == 404
    assert requests.get(f"{gw}/docs/assets/nope.js", timeout=10).status_code == 404
    refused = requests.post(f"{gw}/docs/openapi.json", timeout=10)
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET"
    # /docs belongs to the gateway; anything else still goes through the routes (404 JSON when none matches).
    missing = requests.get(f"{gw}/docsx", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"message": "no Route matched with those values"}


def test_security_of_several_auth_plugins_and_anonymous() -> None:
    from shipyard.gateway.docs import SecurityScheme, route_auth, security_requirements

    class Plugin:
        def __init__(self, name: str, config: dict[str, Any]) -> None:
            self.name, self.config = name, config

    # Two required plugins: both must pass (AND), each in any of its ways (OR).
    both = route_auth([Plugin("key-auth", {"key_in_query": False}), Plugin("basic-auth", {}),
                       Plugin("rate-limiting", {"minute": 5})])
    assert security_requirements(both) == [{"key-auth.header.apikey": [], "basic-auth": []}]
    # All with `anonymous`: any one of them, or none.
    optional = route_auth([Plugin("jwt", {"anonymous": "guest", "uri_param_names": [], "header_names": ["x-token"]}),
                           Plugin("basic-auth", {"anonymous": "guest"})])
    assert security_requirements(optional) == [{"jwt.header.x-token": []}, {"basic-auth": []}, {}]
    assert optional[0].schemes == (SecurityScheme("jwt.header.x-token", "apiKey", location="header", param="x-token",
                                                  description="jwt: the credential in the 'x-token' header"),)
