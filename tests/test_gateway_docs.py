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

import consul
import pytest
import requests

from support import ServerProcess, free_port

APP = str(Path(__file__).parent / "apps" / "openapi_service.py")


def wait_until(check, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
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
    assert set(doc["paths"]) == {"/shop/inventory/items", "/shop/inventory/items/{id}", "/api/users/items",
                                 "/api/users/items/{id}"}
    inventory_get = doc["paths"]["/shop/inventory/items/{id}"]["get"]
    assert inventory_get["tags"] == ["inventory"] and inventory_get["operationId"] == "inventory.get_item"
    assert doc["paths"]["/api/users/items"]["post"]["operationId"] == "users-api.create_item"
    # Both services call their schema Item: each keeps its own, and references point at the right one.
    assert {"inventory.Item", "users-api.Item"} <= set(doc["components"]["schemas"])
    schema = doc["paths"]["/api/users/items/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert schema["schema"] == {"$ref": "#/components/schemas/users-api.Item"}
    # The documented gateway paths are the ones that work: call each listed GET through the gateway.
    for path in doc["paths"]:
        url = gw + path.replace("{id}", "7")
        r = requests.get(url, timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text)
        body = r.json()
        service = "inventory" if path.startswith("/shop/") else "users"
        assert (body[0] if isinstance(body, list) else body)["service"] == service
    created = requests.post(f"{gw}/api/users/items", json={"id": 3}, timeout=10)
    assert created.status_code == 201 and created.json() == {"id": 3, "service": "users"}


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
