"""Consul's ACL system on a real `shipyard server --acl`: the ACL API through py-consul, rules enforced on the Consul
API and on Shipyard's own APIs (native jobs, store, bus, gateway admin, Marathon), with Consul's 403 texts.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
import requests

from shipyard.acl import ANONYMOUS_TOKEN_ID, Authorizer, RulesError, parse_rules
from support import ServerProcess, free_port

MANAGEMENT = str(uuid.uuid4())


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("acl") / "data"
    proc = ServerProcess(data_dir, "--acl", "--acl-initial-management", MANAGEMENT, "--no-gateway").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def admin(acl_server: ServerProcess) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=acl_server.http_port, token=MANAGEMENT)


def hcl_policy(admin: consul.Consul, name: str, rules: str) -> dict[str, Any]:
    """A policy with HCL rules (py-consul sends rules as JSON, from a dict; both are Consul's rules language)."""
    answer = requests.put(f"http://{admin.http.host}:{admin.http.port}/v1/acl/policy", timeout=10,
                          headers={"X-Consul-Token": MANAGEMENT}, json={"Name": name, "Rules": rules})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def token_with(admin: consul.Consul, rules: str) -> str:
    """A new token whose one policy has these HCL rules; its SecretID."""
    policy = hcl_policy(admin, f"p-{uuid.uuid4().hex[:8]}", rules)
    return str(admin.acl.token.create(policies_id=[policy["ID"]])["SecretID"])


def call(server: ServerProcess, method: str, path: str, token: str = "", **kw: object) -> requests.Response:
    headers = {"X-Consul-Token": token} if token else {}
    return requests.request(method, server.url + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


# ---- the rules language and decisions (pure) -------------------------------------------------------------------
def test_exact_beats_prefix_and_longest_prefix_wins() -> None:
    authz = Authorizer(parse_rules('''
        key_prefix "" { policy = "read" }
        key_prefix "app/" { policy = "write" }
        key_prefix "app/secret/" { policy = "deny" }
        key "app/secret/shared" { policy = "read" }
    '''), default_allow=False, accessor_id="a")
    assert authz.allows("key", "other", "read") and not authz.allows("key", "other", "write")
    assert authz.allows("key", "app/x", "write")
    assert not authz.allows("key", "app/secret/x", "read")
    assert authz.allows("key", "app/secret/shared", "read")
    assert not authz.allows("key", "app/secret/shared", "write")


def test_deny_wins_between_policies_and_list_grants_read() -> None:
    rules = parse_rules('key_prefix "a/" { policy = "write" }') + parse_rules('key_prefix "a/" { policy = "deny" }')
    assert not Authorizer(rules, default_allow=True).allows("key", "a/b", "read")
    listing = Authorizer(parse_rules('key_prefix "" { policy = "list" }'), default_allow=False)
    assert listing.allows("key", "x", "read") and listing.allows("key", "x", "list")
    assert not listing.allows("key", "x", "write")


def test_default_allow_still_keeps_acl_management() -> None:
    anyone = Authorizer([], default_allow=True, accessor_id=ANONYMOUS_TOKEN_ID)
    assert anyone.allows("key", "x", "write") and anyone.allows("job", "web", "write")
    assert not anyone.allows("acl", "", "read")


def test_json_rules_and_shipyard_resources() -> None:
    authz = Authorizer(parse_rules('{"job_prefix": {"web": {"policy": "write"}}, "gateway": "read", '
                                   '"bus_prefix": {"mail": {"policy": "read"}}, "store": "deny"}'),
                       default_allow=False)
    assert authz.allows("job", "web-frontend", "write") and not authz.allows("job", "db", "read")
    assert authz.allows("gateway", "", "read") and not authz.allows("gateway", "", "write")
    assert authz.allows("bus", "mail.send", "read") and not authz.allows("store", "", "read")


@pytest.mark.parametrize(("rules", "line", "words"), [
    ('key_prefix "a/" {\n  policy = "read"\n}\nkey "b" {\n  policy = \n}', 6, "unexpected"),
    ('key "a" { policy = "read" }\n\nsparkle "b" { policy = "read" }', 3, "unknown resource 'sparkle'"),
    ('key "a" { policy = "read" }\nservice "web" {\n  policy = "wirte"\n}', 3, "invalid policy 'wirte'"),
])
def test_malformed_rules_name_their_line(rules: str, line: int, words: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(rules)
    assert info.value.status == 400 and info.value.detail == {"line": line}
    assert f"line {line}" in info.value.message and words in info.value.message


# ---- the ACL API through py-consul -----------------------------------------------------------------------------
def test_bootstrap_once_then_403(acl_server: ServerProcess, tmp_path: Path) -> None:
    fresh = ServerProcess(tmp_path / "data", "--acl", "--no-gateway").start()
    try:
        c = consul.Consul(host="127.0.0.1", port=fresh.http_port)
        token = c.acl.bootstrap()
        assert token["Policies"] == [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}]
        me = consul.Consul(host="127.0.0.1", port=fresh.http_port, token=token["SecretID"]).acl.token.read_self()
        assert me["AccessorID"] == token["AccessorID"] and me["SecretID"] == token["SecretID"]
        with pytest.raises(consul.ACLPermissionDenied, match="ACL bootstrap no longer allowed"):
            c.acl.bootstrap()
    finally:
        fresh.stop()
    # A server given an initial management token is bootstrapped already, as Consul is.
    with pytest.raises(consul.ACLPermissionDenied, match="ACL bootstrap no longer allowed"):
        consul.Consul(host="127.0.0.1", port=acl_server.http_port).acl.bootstrap()


def test_policy_crud_list_and_by_name(acl_server: ServerProcess, admin: consul.Consul) -> None:
    policy = admin.acl.policy.create(name="kv-app", description="app config",
                                     rules={"key_prefix": {"app/": {"policy": "read"}}})
    assert '"app/"' in admin.acl.policy.read(policy["ID"])["Rules"]
    by_name = call(acl_server, "GET", "/v1/acl/policy/name/kv-app", MANAGEMENT).json()
    assert by_name["ID"] == policy["ID"]
    updated = admin.acl.policy.update(policy["ID"], "kv-app2", rules={"key_prefix": {"app/": {"policy": "write"}}})
    assert updated["Name"] == "kv-app2" and "write" in updated["Rules"]
    names = {p["Name"] for p in admin.acl.policy.list()}
    assert {"global-management", "kv-app2"} <= names
    assert admin.acl.policy.delete(policy["ID"]) is True
    assert "kv-app2" not in {p["Name"] for p in admin.acl.policy.list()}


def test_token_crud_list_clone_and_self(acl_server: ServerProcess, admin: consul.Consul) -> None:
    policy = hcl_policy(admin, "svc-read", 'service_prefix "" { policy = "read" }')
    role = admin.acl.role.create(name="readers", policies_id=[policy["ID"]])
    token = admin.acl.token.create(description="ci", policies_id=[policy["ID"]])
    with_role = admin.acl.token.create(description="by role", roles_id=[role["ID"]])
    assert uuid.UUID(token["SecretID"]) and token["Policies"] == [{"ID": policy["ID"], "Name": "svc-read"}]
    # Read back: the secret is shown only by the write that made it (the store keeps a hash of it).
    read = admin.acl.token.read(token["AccessorID"])
    assert read["Description"] == "ci" and read["SecretID"] == "<hidden>"
    assert [t["AccessorID"] for t in admin.acl.token.list(policy=policy["ID"])] == [token["AccessorID"]]
    assert [t["AccessorID"] for t in admin.acl.token.list(role=role["ID"])] == [with_role["AccessorID"]]
    billing = admin.acl.token.create(service_identities=[{"ServiceName": "ledger-api"}])
    assert [t["AccessorID"] for t in admin.acl.token.list(servicename="ledger-api")] == [billing["AccessorID"]]
    me = consul.Consul(host="127.0.0.1", port=acl_server.http_port, token=token["SecretID"]).acl.token.read_self()
    assert me["AccessorID"] == token["AccessorID"]
    clone = admin.acl.token.clone(token["AccessorID"], description="copy")
    assert clone["AccessorID"] != token["AccessorID"] and clone["SecretID"] != token["SecretID"]
    assert clone["Policies"] == token["Policies"] and clone["Description"] == "copy"
    updated = admin.acl.token.update(token["AccessorID"], description="ci2", policies_id=[policy["ID"]])
    assert updated["Description"] == "ci2"
    assert admin.acl.token.delete(token["AccessorID"]) is True
    gone = call(acl_server, "GET", "/v1/kv/x", token["SecretID"])
    assert (gone.status_code, gone.text) == (403, "ACL not found")


def test_role_crud_list_and_by_name(admin: consul.Consul) -> None:
    policy = hcl_policy(admin, "node-read", 'node_prefix "" { policy = "read" }')
    role = admin.acl.role.create(name="ops", description="operators", policies_id=[policy["ID"]])
    assert admin.acl.role.read(role["ID"])["Policies"] == [{"ID": policy["ID"], "Name": "node-read"}]
    assert admin.acl.role.read_by_name("ops")["ID"] == role["ID"]
    assert role["ID"] in [r["ID"] for r in admin.acl.role.list(policy=policy["ID"])]
    admin.acl.role.update(role["ID"], name="ops2", policies_id=[policy["ID"]])
    assert admin.acl.role.read(role["ID"])["Name"] == "ops2"
    assert admin.acl.role.delete(role["ID"]) is True
    assert admin.acl.role.read(role["ID"]) is None  # a 404, as Consul answers a read of what is not there


def test_bad_rules_are_400_with_the_line(acl_server: ServerProcess) -> None:
    for rules, line in (('key "a" {\n  policy = "read"\n}\nnot valid {', 4), ('key "a" { policy = "nope" }', 1),
                        ('\nwidget "a" { policy = "read" }', 2)):
        answer = call(acl_server, "PUT", "/v1/acl/policy", MANAGEMENT, json={"Name": "bad", "Rules": rules})
        assert answer.status_code == 400, answer.text
        assert f"line {line}" in answer.text


# ---- enforcement on the Consul API -----------------------------------------------------------------------------
def test_key_prefix_read_token(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.kv.put("app/db", "url")
    admin.kv.put("other/db", "x")
    reader = token_with(admin, 'key_prefix "app/" { policy = "read" }')
    c = consul.Consul(host="127.0.0.1", port=acl_server.http_port, token=reader)
    assert c.kv.get("app/db")[1]["Value"] == b"url"
    with pytest.raises(consul.ACLPermissionDenied):
        c.kv.put("app/db", "new")
    denied = call(acl_server, "GET", "/v1/kv/other/db", reader)
    assert denied.status_code == 403
    assert denied.text.startswith("Permission denied: token with AccessorID '")
    assert denied.text.endswith("' lacks permission 'key:read' on \"other/db\"")
    # A recursive read of everything is cut down to what the token may read, and says so.
    everything = call(acl_server, "GET", "/v1/kv/?recurse", reader)
    assert [e["Key"] for e in everything.json()] == ["app/db"]
    assert everything.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"


def test_token_sources_header_bearer_and_query(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.kv.put("src/k", "v")
    reader = token_with(admin, 'key "src/k" { policy = "read" }')
    for headers, params in (({"X-Consul-Token": reader}, {}), ({"Authorization": f"Bearer {reader}"}, {}),
                            ({}, {"token": reader})):
        answer = requests.get(acl_server.url + "/v1/kv/src/k", headers=headers, params=params, timeout=10)
        assert answer.status_code == 200, (headers, params, answer.text)


def test_unknown_token_is_acl_not_found(acl_server: ServerProcess) -> None:
    answer = call(acl_server, "GET", "/v1/catalog/services", str(uuid.uuid4()))
    assert (answer.status_code, answer.text) == (403, "ACL not found")


def test_expired_token_is_acl_not_found(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.kv.put("exp/k", "v")
    policy = hcl_policy(admin, f"p-{uuid.uuid4().hex[:8]}", 'key "exp/k" { policy = "read" }')
    made = call(acl_server, "PUT", "/v1/acl/token", MANAGEMENT,
                json={"Policies": [{"ID": policy["ID"]}], "ExpirationTTL": "1s"})
    assert made.status_code == 200, made.text
    secret = made.json()["SecretID"]
    assert call(acl_server, "GET", "/v1/kv/exp/k", secret).status_code == 200
    expired: list[requests.Response] = []
    _wait(lambda: expired.append(call(acl_server, "GET", "/v1/kv/exp/k", secret)) or
          expired[-1].status_code != 200, "the token to expire")
    assert (expired[-1].status_code, expired[-1].text) == (403, "ACL not found")


def test_catalog_lists_are_filtered(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.agent.service.register("web", service_id="web-1", port=1)
    admin.agent.service.register("db", service_id="db-1", port=2)
    web_reader = token_with(admin, 'service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    services = call(acl_server, "GET", "/v1/catalog/services", web_reader)
    assert set(services.json()) == {"web"}
    assert services.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert [s["ServiceName"] for s in call(acl_server, "GET", "/v1/catalog/service/db", web_reader).json()] == []
    assert [s["ServiceName"] for s in call(acl_server, "GET", "/v1/catalog/service/web", web_reader).json()] == [
        "web"]
    agent_view = call(acl_server, "GET", "/v1/agent/services", web_reader).json()
    assert set(agent_view) == {"web-1"}
    full = call(acl_server, "GET", "/v1/catalog/services", MANAGEMENT)
    assert {"web", "db"} <= set(full.json()) and "X-Consul-Results-Filtered-By-ACLs" not in full.headers


def test_service_token_registers_only_its_service(acl_server: ServerProcess, admin: consul.Consul) -> None:
    token = admin.acl.token.create(service_identities=[{"ServiceName": "billing"}])["SecretID"]
    c = consul.Consul(host="127.0.0.1", port=acl_server.http_port, token=token)
    assert c.agent.service.register("billing", service_id="billing-1", port=3) is True
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.service.register("payments", service_id="payments-1", port=4)
    admin.agent.service.register("web", service_id="web-1", port=1)  # this test's own, whatever ran before it
    denied = call(acl_server, "PUT", "/v1/agent/service/deregister/web-1", token)
    assert denied.status_code == 403 and "'service:write' on \"web\"" in denied.text
    assert c.agent.service.deregister("billing-1") is True


def test_deny_wins(acl_server: ServerProcess, admin: consul.Consul) -> None:
    writer = hcl_policy(admin, "all-keys", 'key_prefix "" { policy = "write" }')
    denier = hcl_policy(admin, "no-secrets", 'key_prefix "" { policy = "deny" }')
    token = admin.acl.token.create(policies_id=[writer["ID"], denier["ID"]])["SecretID"]
    assert call(acl_server, "PUT", "/v1/kv/anything", token, data=b"x").status_code == 403


def test_anonymous_token(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.kv.put("public/motd", "hello")
    assert call(acl_server, "GET", "/v1/kv/public/motd").status_code == 403
    policy = hcl_policy(admin, "public", 'key_prefix "public/" { policy = "read" }')
    admin.acl.token.update(ANONYMOUS_TOKEN_ID, policies_id=[policy["ID"]], description="Anonymous Token")
    assert call(acl_server, "GET", "/v1/kv/public/motd").status_code == 200
    denied = call(acl_server, "GET", "/v1/kv/private")
    assert denied.status_code == 403 and "anonymous token lacks permission 'key:read'" in denied.text
    admin.acl.token.update(ANONYMOUS_TOKEN_ID, description="Anonymous Token")
    assert call(acl_server, "GET", "/v1/kv/public/motd").status_code == 403


def test_blocking_query_under_acls(acl_server: ServerProcess, admin: consul.Consul) -> None:
    admin.kv.put("watch/k", "1")
    reader = token_with(admin, 'key_prefix "watch/" { policy = "read" }')
    c = consul.Consul(host="127.0.0.1", port=acl_server.http_port, token=reader)
    index, _ = c.kv.get("watch/k")
    seen: list[bytes] = []
    waiter = threading.Thread(target=lambda: seen.append(c.kv.get("watch/k", index=index, wait="20s")[1]["Value"]))
    waiter.start()
    admin.kv.put("watch/k", "2")
    waiter.join(25)
    assert seen == [b"2"]


def test_blocking_queries_woken_together_are_filtered_per_token(acl_server: ServerProcess,
                                                                admin: consul.Consul) -> None:
    """Watchers of the same health query share one read after a change (api/consul/common.py); each still gets
    what its own token may see."""
    def register(node: str, sid: str) -> None:
        body = {"Node": node, "Address": "10.9.9.9", "Service": {"Service": "shared", "ID": sid, "Port": 80}}
        assert call(acl_server, "PUT", "/v1/catalog/register", MANAGEMENT, json=body).status_code == 200

    register("n-a", "shared-a")
    register("n-b", "shared-b")
    one_node = token_with(admin, 'service "shared" { policy = "read" }\nnode "n-a" { policy = "read" }')
    every_node = token_with(admin, 'service "shared" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    index = call(acl_server, "GET", "/v1/health/service/shared", every_node).headers["X-Consul-Index"]
    answers: dict[str, requests.Response] = {}

    def block(name: str, token: str) -> None:
        answers[name] = requests.get(f"{acl_server.url}/v1/health/service/shared?index={index}&wait=20s",
                                     headers={"X-Consul-Token": token}, timeout=30)

    waiters = [threading.Thread(target=block, args=(f"{kind}-{i}", token)) for i in range(5)
               for kind, token in (("one", one_node), ("every", every_node))]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)  # all of them blocked on the same index
    register("n-b", "shared-b2")
    for waiter in waiters:
        waiter.join(25)
    assert len(answers) == 10
    for name, answer in answers.items():
        assert answer.status_code == 200 and int(answer.headers["X-Consul-Index"]) > int(index), answer.text
        ids = sorted(e["Service"]["ID"] for e in answer.json())
        if name.startswith("one"):
            assert ids == ["shared-a"] and answer.headers["X-Consul-Results-Filtered-By-ACLs"] == "true", name
        else:
            assert ids == ["shared-a", "shared-b", "shared-b2"], name
            assert "X-Consul-Results-Filtered-By-ACLs" not in answer.headers


# ---- enforcement on Shipyard's own APIs ------------------------------------------------------------------------
SPEC = {"name": "webapp", "cmd": "sleep 60", "instances": 0}
NODE = socket.gethostname()  # the server's node (no --node given)


@pytest.mark.parametrize(("method", "path", "body", "rules"), [
    ("POST", "/api/v1/jobs", SPEC, 'job_prefix "web" { policy = "write" }'),
    ("GET", "/api/v1/jobs/webapp", None, 'job "webapp" { policy = "read" }'),
    ("GET", f"/api/v1/nodes/{NODE}", None, f'node "{NODE}" {{ policy = "read" }}'),
    ("POST", f"/api/v1/nodes/{NODE}/eligibility", {"eligible": True}, f'node "{NODE}" {{ policy = "write" }}'),
    ("GET", "/v2/apps/webapp", None, 'job_prefix "" { policy = "read" }'),
    ("GET", "/api/gateway/services", None, 'gateway = "read"'),
    ("GET", "/api/gateway/metrics", None, 'gateway = "read"'),
    ("PUT", "/api/v1/bus/queues/mail", {}, 'bus_prefix "mail" { policy = "write" }'),
    ("GET", "/api/v1/store/kv/jobs/", None, 'store = "read"'),
])
def test_native_marathon_gateway_bus_store_need_their_rule(acl_server: ServerProcess, admin: consul.Consul,
                                                           method: str, path: str, body: object, rules: str) -> None:
    if method == "GET" and "webapp" in path:
        assert call(acl_server, "POST", "/api/v1/jobs", MANAGEMENT, json=SPEC).status_code in (200, 201)
    wrong = token_with(admin, 'key_prefix "" { policy = "write" }\njob "db" { policy = "write" }')
    refused = call(acl_server, method, path, wrong, json=body)
    assert refused.status_code == 403, refused.text
    assert "Permission denied: token with AccessorID" in refused.text
    right = token_with(admin, rules)
    allowed = call(acl_server, method, path, right, json=body)
    # The gateway metrics need running workers, which this server (--no-gateway) has not: past the ACL, a 404.
    assert allowed.status_code < 400 or (path.endswith("/metrics") and allowed.status_code == 404), allowed.text


def test_marathon_denial_has_marathons_shape(acl_server: ServerProcess) -> None:
    answer = call(acl_server, "GET", "/v2/apps")
    assert answer.status_code == 200 and answer.headers.get("X-Consul-Results-Filtered-By-ACLs") in (None, "true")
    refused = call(acl_server, "DELETE", "/v2/apps/webapp")
    assert refused.status_code == 403 and refused.json()["message"].startswith("Permission denied: anonymous token")


def test_jobs_list_is_filtered(acl_server: ServerProcess, admin: consul.Consul) -> None:
    for name in ("webjobs", "dbjobs"):
        spec = {**SPEC, "name": name}
        assert call(acl_server, "POST", "/api/v1/jobs", MANAGEMENT, json=spec).status_code in (200, 201)
    token = token_with(admin, 'job "webjobs" { policy = "read" }')
    jobs = call(acl_server, "GET", "/api/v1/jobs", token)
    assert [j["id"] for j in jobs.json()["jobs"]] == ["webjobs"]
    assert jobs.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"


def test_acl_api_needs_acl_rules(acl_server: ServerProcess, admin: consul.Consul) -> None:
    reader = token_with(admin, 'acl = "read"')
    assert call(acl_server, "GET", "/v1/acl/policies", reader).status_code == 200
    refused = call(acl_server, "PUT", "/v1/acl/policy", reader, json={"Name": "x", "Rules": ""})
    assert refused.status_code == 403 and "lacks permission 'acl:write'" in refused.text


# ---- internal callers ------------------------------------------------------------------------------------------
def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.ConnectionError:
            pass  # the gateway workers start listening just after the control API answers
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _instance_token(server: ServerProcess, job: str) -> str:
    """The SHIPYARD_HTTP_TOKEN the agent handed the job's running instance (read from its environment)."""
    allocs = call(server, "GET", "/api/v1/allocs", MANAGEMENT, params={"job": job}).json()["allocations"]
    pids = [(a.get("status") or {}).get("pid") for a in allocs if (a.get("status") or {}).get("pid")]
    if not pids:
        return ""
    env = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SHIPYARD_HTTP_TOKEN=")), "")


def test_gateway_workers_and_instances_hold_scoped_tokens(tmp_path: Path) -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    server = ServerProcess(tmp_path / "data", "--acl", "--acl-initial-management", MANAGEMENT).start()
    try:
        admin = consul.Consul(host="127.0.0.1", port=server.http_port, token=MANAGEMENT)
        admin.agent.service.register("hello", service_id="hello-1", address="127.0.0.1",
                                     port=upstream.server_address[1], tags=["urlprefix-/hello strip=/hello"])
        # The workers follow the store through the server's API with their own token (store and gateway read).
        _wait(lambda: requests.get(server.gateway_url + "/hello/", timeout=5).status_code == 200, "the route")
        spec = {"name": "sleeper", "cmd": "sleep 600", "instances": 1}
        assert call(server, "POST", "/api/v1/jobs", MANAGEMENT, json=spec).status_code == 201
        _wait(lambda: bool(_instance_token(server, "sleeper")), "the instance")
        token = _instance_token(server, "sleeper")
        me = call(server, "GET", "/v1/acl/token/self", token).json()
        assert me["ServiceIdentities"] == [{"ServiceName": "sleeper"}] and me["SecretID"] == token
        assert call(server, "PUT", "/v1/agent/service/register", token,
                    json={"Name": "sleeper", "ID": "sleeper-x", "Port": 5}).status_code == 200
        assert call(server, "PUT", "/v1/agent/service/register", token,
                    json={"Name": "hello", "ID": "hello-2", "Port": 6}).status_code == 403
        assert call(server, "GET", "/v1/kv/sleeper/db", token).status_code == 404  # readable, not there
        assert call(server, "GET", "/v1/kv/other/db", token).status_code == 403
        assert "sleeper" in call(server, "GET", "/v1/catalog/services", token).json()
        # The next server (which adopts the instance) still honours the token the instance holds.
        server.restart()
        assert call(server, "GET", "/v1/acl/token/self", token).status_code == 200
        _wait(lambda: requests.get(server.gateway_url + "/hello/", timeout=5).status_code == 200, "the route again")
        call(server, "DELETE", "/api/v1/jobs/sleeper", MANAGEMENT)
    finally:
        server.stop()
        upstream.shutdown()


def _shipyard(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env={**os.environ, **(env or {})})


def test_up_with_acl_prints_the_management_token_once_and_keeps_it_private(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "shipyard.yaml").write_text("services:\n  sleeper:\n    cmd: sleep 600\n    instances: 1\n")
    http_port = free_port()
    addr = f"127.0.0.1:{http_port}"
    ports = ["--http-port", str(http_port), "--gateway-port", str(free_port()), "--dns-port", str(free_port()),
             "--vault-port", str(free_port())]
    clean = {"SHIPYARD_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN": ""}
    try:
        done = _shipyard("up", "--acl", *ports, cwd=project, env=clean)
        assert done.returncode == 0, done.stdout + done.stderr
        saved = project / ".shipyard" / "data" / "acl-management-token"
        token = saved.read_text().strip()
        assert f"ACL management token (shown once; kept in {saved}" in done.stdout and token in done.stdout
        assert saved.stat().st_mode & 0o777 == 0o600
        assert requests.get(f"http://{addr}/v1/kv/x", timeout=5).status_code == 403  # default deny
        me = requests.get(f"http://{addr}/v1/acl/token/self", headers={"X-Consul-Token": token}, timeout=5)
        assert me.json()["Policies"][0]["Name"] == "global-management"
        # The CLI sends the token from the environment; without it the server's answer is filtered.
        listed = _shipyard("ps", "--http-addr", addr, cwd=project, env={"SHIPYARD_HTTP_TOKEN": token})
        assert listed.returncode == 0 and "sleeper" in listed.stdout
        anonymous = _shipyard("ps", "--http-addr", addr, cwd=project, env=clean)
        assert "sleeper" not in anonymous.stdout
        assert "note: the server left out what this ACL token may not read (no token sent" in anonymous.stderr
        again = _shipyard("up", "--http-addr", addr, cwd=project, env=clean)  # finds the kept token
        assert again.returncode == 0 and token not in again.stdout, again.stdout + again.stderr
    finally:
        _shipyard("down", "--http-addr", addr, cwd=project, env=clean)


def test_every_route_has_its_own_rule() -> None:
    """A route without a rule in api/acl_table.py needs operator:write (fail closed); this lists any such route so
    that it gets its rule (the web console checks its cookie's token itself)."""
    from aiohttp import web

    from shipyard.api.acl_table import PREFIXES, lookup
    from shipyard.api.consul import add_consul_routes
    from shipyard.api.context import PLATFORM
    from shipyard.api.marathon import add_marathon_routes
    from shipyard.api.native import add_native_routes

    class Config:
        acl = True
        acl_token_persistence = True

    class Platform:
        config = Config()

    app = web.Application()
    app[PLATFORM] = Platform()  # type: ignore[assignment]
    add_consul_routes(app)
    add_native_routes(app)
    add_marathon_routes(app)
    catch_all = {id(rule) for prefix, rule in PREFIXES if prefix in ("/v1/", "/v2/", "/api/")}

    def routes(application: web.Application) -> Iterator[tuple[str, str]]:
        for route in application.router.routes():
            sub = getattr(route.resource, "_app", None)
            if isinstance(sub, web.Application):
                yield from routes(sub)
            elif route.resource is not None and route.method != "HEAD":
                yield route.method, route.resource.canonical

    unruled = sorted((method, path) for method, path in routes(app)
                     if id(lookup(method, path, path)) in catch_all and path != "/v2/eventSubscriptions")
    assert unruled == []


def test_dns_answers_only_what_the_anonymous_token_may_read(acl_server: ServerProcess, admin: consul.Consul) -> None:
    import dns.message
    import dns.query
    import dns.rcode

    admin.agent.service.register("dnsweb", service_id="dnsweb-1", address="127.0.0.1", port=7)

    def ask() -> dns.message.Message:
        query = dns.message.make_query("dnsweb.service.consul", "SRV")
        return dns.query.udp(query, "127.0.0.1", port=acl_server.dns_port, timeout=5)

    assert ask().rcode() == dns.rcode.NXDOMAIN  # default deny: the anonymous token reads no service
    policy = hcl_policy(admin, "dns-read", 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    admin.acl.token.update(ANONYMOUS_TOKEN_ID, policies_id=[policy["ID"]], description="Anonymous Token")
    try:
        answer = ask()
        assert answer.rcode() == dns.rcode.NOERROR
        assert [rr.port for rrset in answer.answer for rr in rrset] == [7]
    finally:
        admin.acl.token.update(ANONYMOUS_TOKEN_ID, description="Anonymous Token")
    assert ask().rcode() == dns.rcode.NXDOMAIN


def test_the_agents_dns_token_answers_dns_and_only_dns(acl_server: ServerProcess, admin: consul.Consul) -> None:
    """Consul's `dns` agent token (`consul acl set-agent-token dns`): DNS answers as it may read, while HTTP requests
    without a token stay the anonymous token's (the default token would open both)."""
    import dns.message
    import dns.query
    import dns.rcode

    admin.agent.service.register("dnsapi", service_id="dnsapi-1", address="127.0.0.1", port=8)
    secret = admin.acl.token.create(templated_policies=[{"builtin/dns": {}}])["SecretID"]
    query = dns.message.make_query("dnsapi.service.consul", "SRV")
    assert dns.query.udp(query, "127.0.0.1", port=acl_server.dns_port, timeout=5).rcode() == dns.rcode.NXDOMAIN
    # Setting the token writes nothing to the store: the view DNS just cut must still be cut again.
    assert call(acl_server, "PUT", "/v1/agent/token/dns", MANAGEMENT, json={"Token": secret}).status_code == 200
    try:
        answer = dns.query.udp(query, "127.0.0.1", port=acl_server.dns_port, timeout=5)
        assert [rr.port for rrset in answer.answer for rr in rrset] == [8]
        assert call(acl_server, "GET", "/v1/catalog/service/dnsapi").json() == []  # anonymous: filtered out
        assert call(acl_server, "PUT", "/v1/agent/token/nope", MANAGEMENT, json={"Token": secret}).status_code == 404
    finally:
        call(acl_server, "PUT", "/v1/agent/token/dns", MANAGEMENT, json={"Token": ""})


def test_templated_policy_builtin_service_grants_like_a_service_identity(acl_server: ServerProcess,
                                                                         admin: consul.Consul) -> None:
    token = admin.acl.token.create(templated_policies=[{"builtin/service": {"Name": "ledger"}}])["SecretID"]
    assert call(acl_server, "PUT", "/v1/agent/service/register", token,
                json={"Name": "ledger", "ID": "ledger-1", "Port": 9}).status_code == 200
    assert call(acl_server, "PUT", "/v1/agent/service/register", token,
                json={"Name": "other", "ID": "other-1", "Port": 9}).status_code == 403
    bad = call(acl_server, "PUT", "/v1/acl/token", MANAGEMENT,
               json={"TemplatedPolicies": [{"TemplateName": "builtin/nope", "TemplateVariables": {"name": "x"}}]})
    assert bad.status_code == 400 and "builtin/nope" in bad.text
