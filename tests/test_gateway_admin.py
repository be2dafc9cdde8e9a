"""The gateway admin API (/api/gateway) and `shipyard gateway apply` against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support import ServerProcess


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> str:
    return server.url + "/api/gateway"


def test_service_route_crud_and_uniqueness(admin: str) -> None:
    r = requests.post(f"{admin}/services", json={"name": "orders", "url": "http://orders:8080/v1"})
    assert r.status_code == 201
    svc = r.json()
    assert (svc["host"], svc["port"], svc["path"], svc["protocol"]) == ("orders", 8080, "/v1", "http")
    dup = requests.post(f"{admin}/services", json={"name": "orders"})
    assert dup.status_code == 409 and dup.json()["fields"] == {"name": "orders"}
    r = requests.post(f"{admin}/services/orders/routes", json={"name": "orders-api", "paths": ["/orders"]})
    assert r.status_code == 201 and r.json()["service"] == "orders" and r.json()["strip_path"] is True
    route_id = r.json()["id"]
    assert requests.post(f"{admin}/routes", json={"name": "orders-api", "paths": ["/x"], "service": "orders"}
                         ).status_code == 409
    listed = requests.get(f"{admin}/services/orders/routes").json()
    assert [x["id"] for x in listed["data"]] == [route_id] and listed["next"] is None
    patched = requests.patch(f"{admin}/routes/orders-api", json={"methods": ["get", "POST"]})
    assert patched.status_code == 200 and patched.json()["methods"] == ["GET", "POST"]
    assert requests.get(f"{admin}/routes/{route_id}").json()["paths"] == ["/orders"]
    # A service with routes cannot go; once they are gone it can.
    assert requests.delete(f"{admin}/services/orders").status_code == 400
    assert requests.delete(f"{admin}/routes/{route_id}").status_code == 204
    assert requests.delete(f"{admin}/services/orders").status_code == 204
    assert requests.get(f"{admin}/services/orders").status_code == 404
    # The freed names can be used again (the unique index followed the deletes).
    assert requests.post(f"{admin}/services", json={"name": "orders"}).status_code == 201
    assert requests.post(f"{admin}/routes", json={"name": "orders-api", "paths": ["/o"], "service": "orders"}
                         ).status_code == 201


def test_schema_errors_and_json_404(admin: str) -> None:
    r = requests.post(f"{admin}/services", json={"host": "x", "retries": "many", "bogus": 1})
    assert r.status_code == 400
    body = r.json()
    assert set(body["fields"]) == {"name", "retries", "bogus"} and "schema violation" in body["message"]
    r = requests.post(f"{admin}/routes", json={"name": "r", "service": "no-such-service", "paths": ["/a"]})
    assert r.status_code == 400 and "service" in r.json()["fields"]
    assert requests.post(f"{admin}/services", data=b"{not json", headers={"content-type": "application/json"}
                         ).status_code == 400
    r = requests.get(f"{admin}/no/such/thing")
    assert r.status_code == 404 and r.json() == {"message": "Not found"}
    assert requests.get(f"{admin}/consumers/nobody").json() == {"message": "Not found"}


def test_consumers_credentials_and_plugins(admin: str) -> None:
    r = requests.post(f"{admin}/consumers", json={"username": "alice", "custom_id": "a-1"})
    assert r.status_code == 201
    alice = r.json()
    assert requests.post(f"{admin}/consumers", json={"username": "alice"}).status_code == 409
    assert requests.post(f"{admin}/consumers", json={"tags": []}).status_code == 400
    key = requests.post(f"{admin}/consumers/alice/key-auth", json={"key": "secret-1"})
    assert key.status_code == 201 and key.json()["consumer"] == alice["id"]
    generated = requests.post(f"{admin}/consumers/alice/key-auth", json={}).json()
    assert len(generated["key"]) >= 20
    assert requests.post(f"{admin}/consumers/alice/key-auth", json={"key": "secret-1"}).status_code == 409
    basic = requests.post(f"{admin}/consumers/alice/basic-auth", json={"username": "alice", "password": "pw"}).json()
    # Stored as a scrypt hash, which reads do not show either (test_security_at_rest checks the store).
    assert basic["username"] == "alice" and "password" not in basic
    jwt_cred = requests.post(f"{admin}/consumers/alice/jwt", json={"key": "alice-iss"}).json()
    assert jwt_cred["algorithm"] == "HS256" and jwt_cred["secret"]
    bad_rsa = requests.post(f"{admin}/consumers/alice/jwt", json={"algorithm": "RS256", "rsa_public_key": "nope"})
    assert bad_rsa.status_code == 400 and "rsa_public_key" in bad_rsa.json()["fields"]
    assert requests.post(f"{admin}/consumers/alice/acls", json={"group": "admins"}).status_code == 201
    assert requests.post(f"{admin}/consumers/alice/acls", json={"group": "admins"}).status_code == 409
    assert [c["group"] for c in requests.get(f"{admin}/consumers/alice/acls").json()["data"]] == ["admins"]
    # Plugins: config validated by the plugin class; one config per name and scope.
    bad = requests.post(f"{admin}/plugins", json={"name": "rate-limiting", "config": {"minute": 0}})
    assert bad.status_code == 400 and "config" in bad.json()["fields"]
    unknown = requests.post(f"{admin}/plugins", json={"name": "no-such-plugin"})
    assert unknown.status_code == 400 and "name" in unknown.json()["fields"]
    ok = requests.post(f"{admin}/consumers/alice/plugins", json={"name": "rate-limiting", "config": {"minute": 5}})
    assert ok.status_code == 201 and ok.json()["consumer"] == alice["id"]
    assert requests.post(f"{admin}/consumers/alice/plugins", json={"name": "rate-limiting", "config": {"hour": 9}}
                         ).status_code == 409
    glob = requests.post(f"{admin}/plugins", json={"name": "cors"}).json()
    patched = requests.patch(f"{admin}/plugins/{glob['id']}", json={"config": {"max_age": 60}})
    assert patched.status_code == 200 and patched.json()["config"] == {"max_age": 60}
    assert requests.patch(f"{admin}/plugins/{glob['id']}", json={"config": {"max_age": -1}}).status_code == 400
    assert requests.get(f"{admin}/consumers/alice/plugins").json()["data"][0]["name"] == "rate-limiting"
    # Deleting the consumer takes its credentials and plugins with it.
    assert requests.delete(f"{admin}/consumers/alice").status_code == 204
    assert requests.post(f"{admin}/consumers", json={"username": "bob"}).status_code == 201
    assert requests.post(f"{admin}/consumers/bob/key-auth", json={"key": "secret-1"}).status_code == 201
    assert all(p.get("consumer") != alice["id"] for p in requests.get(f"{admin}/plugins").json()["data"])


def test_upstreams_and_targets(admin: str) -> None:
    r = requests.post(f"{admin}/upstreams", json={"name": "pay", "algorithm": "consistent-hashing",
                                                 "hash_on": "header", "hash_on_header": "x-user"})
    assert r.status_code == 201
    assert requests.post(f"{admin}/upstreams", json={"name": "pay"}).status_code == 409
    assert requests.post(f"{admin}/upstreams", json={"name": "p2", "hash_on": "header"}).status_code == 400
    t = requests.post(f"{admin}/upstreams/pay/targets", json={"target": "127.0.0.1:9001", "weight": 90})
    assert t.status_code == 201 and t.json()["weight"] == 90
    assert requests.post(f"{admin}/upstreams/pay/targets", json={"target": "127.0.0.1:9002", "weight": 10}
                         ).status_code == 201
    assert requests.post(f"{admin}/upstreams/pay/targets", json={"target": "127.0.0.1:9001"}).status_code == 409
    targets = requests.get(f"{admin}/upstreams/pay/targets").json()["data"]
    assert sorted((x["target"], x["weight"]) for x in targets) == [("127.0.0.1:9001", 90), ("127.0.0.1:9002", 10)]
    assert requests.delete(f"{admin}/upstreams/pay/targets/127.0.0.1:9002").status_code == 204
    assert len(requests.get(f"{admin}/upstreams/pay/targets").json()["data"]) == 1


GATEWAY_YAML = """
_format_version: "3.0"
services:
  - name: catalog
    url: http://catalog:8000/api
    routes:
      - name: catalog-api
        paths: [/catalog]
        plugins:
          - name: rate-limiting
            config: {minute: 100}
    plugins:
      - name: key-auth
consumers:
  - username: carol
    keyauth_credentials: [{key: carol-key}]
    basicauth_credentials: [{username: carol, password: s3cret}]
    acls: [{group: readers}]
plugins:
  - name: correlation-id
    config: {echo_downstream: true}
upstreams:
  - name: catalog
    targets: [{target: "127.0.0.1:7001", weight: 50}]
"""


def _shipyard(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, *args],
                          capture_output=True, text=True, timeout=60)


def test_gateway_apply_diff_and_idempotency(fresh_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GATEWAY_YAML)
    dry = _shipyard(fresh_server, "gateway", "apply", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ create service catalog" in dry.stdout and "+ create route catalog-api" in dry.stdout
    assert "11 to create, 0 to update, 0 to delete" in dry.stdout
    admin = fresh_server.url + "/api/gateway"
    assert requests.get(f"{admin}/services").json()["data"] == []
    applied = _shipyard(fresh_server, "gateway", "apply", str(path), "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "applied" in applied.stdout
    again = _shipyard(fresh_server, "gateway", "apply", str(path), "--yes")
    assert again.returncode == 0 and "no changes" in again.stdout
    route = requests.get(f"{admin}/routes/catalog-api").json()
    plugin_names = {p["name"]: p for p in requests.get(f"{admin}/plugins").json()["data"]}
    assert plugin_names["rate-limiting"]["route"] == route["id"]
    assert plugin_names["key-auth"]["service"] == "catalog"
    # The file's credentials are unique like any other: the admin API refuses the same key.
    assert requests.post(f"{admin}/consumers", json={"username": "dave"}).status_code == 201
    assert requests.post(f"{admin}/consumers/dave/key-auth", json={"key": "carol-key"}).status_code == 409
    # An edit shows as one update and one delete, and "dave" (not in the file) is deleted.
    path.write_text(GATEWAY_YAML.replace("minute: 100", "minute: 50").replace("  - name: correlation-id\n"
                                         "    config: {echo_downstream: true}\n", ""))
    diff = _shipyard(fresh_server, "gateway", "apply", str(path), "--dry-run")
    assert "~ update plugin rate-limiting (route=catalog-api)" in diff.stdout and "(config)" in diff.stdout
    assert "- delete plugin correlation-id (global)" in diff.stdout and "- delete consumer dave" in diff.stdout
    assert _shipyard(fresh_server, "gateway", "apply", str(path), "-y").returncode == 0
    assert "no changes" in _shipyard(fresh_server, "gateway", "apply", str(path), "-y").stdout
    routes = _shipyard(fresh_server, "gateway", "routes")
    assert "catalog-api" in routes.stdout and "rate-limiting" in routes.stdout
    # Errors: one line, exit 1, nothing applied.
    path.write_text("services:\n  - name: x\n    routes: [{name: r, paths: [nope]}]\n")
    bad = _shipyard(fresh_server, "gateway", "apply", str(path), "-y")
    assert bad.returncode == 1 and "paths" in bad.stderr and "Traceback" not in bad.stderr
    assert requests.get(f"{admin}/routes/catalog-api").status_code == 200
