"""Consul answers as Consul does where clients depend on it: ?dc=, /v1/acl/*, and the documented response shapes.

The table test holds response examples from Consul's API documentation (hashicorp/consul,
website/content/api-docs/{catalog,health,session}.mdx and agent/check.mdx): the same data registered here must
come back with every documented field, of the documented JSON type, and the documented durations as written.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from support import ServerProcess

# ---- ?dc= ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/catalog/services"), ("GET", "/v1/catalog/nodes"), ("GET", "/v1/catalog/service/consul"),
    ("GET", "/v1/health/service/consul"), ("GET", "/v1/health/state/any"), ("GET", "/v1/kv/some/key"),
    ("PUT", "/v1/kv/some/key"), ("GET", "/v1/session/list"), ("PUT", "/v1/session/create"),
    ("GET", "/v1/status/leader"), ("PUT", "/v1/txn"),
])
def test_unknown_datacenter_is_no_path_to_datacenter(server: ServerProcess, method: str, path: str) -> None:
    r = requests.request(method, server.url + path, params={"dc": "elsewhere"}, data=b"[]", timeout=10)
    assert (r.status_code, r.text) == (500, "No path to datacenter")
    assert r.headers["Content-Type"].startswith("text/plain")


def test_unknown_datacenter_writes_nothing(server: ServerProcess) -> None:
    r = requests.put(server.url + "/v1/kv/dc-test", params={"dc": "dc2"}, data=b"x", timeout=10)
    assert r.status_code == 500
    assert requests.get(server.url + "/v1/kv/dc-test", timeout=10).status_code == 404


def test_own_datacenter_and_local_endpoints_answer(server: ServerProcess) -> None:
    ok = requests.get(server.url + "/v1/catalog/services", params={"dc": "dc1"}, timeout=10)
    assert ok.status_code == 200 and isinstance(ok.json(), dict)
    # Agent endpoints are the local agent's and ignore ?dc=; the datacenter list is not scoped either.
    assert requests.get(server.url + "/v1/agent/self", params={"dc": "dc2"}, timeout=10).status_code == 200
    assert requests.get(server.url + "/v1/catalog/datacenters", params={"dc": "dc2"}, timeout=10).json() == ["dc1"]


# ---- /v1/acl/* ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/acl/tokens"), ("PUT", "/v1/acl/bootstrap"), ("GET", "/v1/acl/token/self"),
    ("PUT", "/v1/acl/policy"), ("DELETE", "/v1/acl/role/abc"), ("GET", "/v1/acl/replication"),
])
def test_acl_endpoints_answer_as_consul_with_acls_disabled(server: ServerProcess, method: str, path: str) -> None:
    r = requests.request(method, server.url + path, timeout=10)
    assert (r.status_code, r.text) == (401, "ACL support disabled")


def test_py_consul_raises_a_clear_error_for_acls(server: ServerProcess) -> None:
    import consul

    client = consul.Consul(host="127.0.0.1", port=server.http_port)
    with pytest.raises(consul.ACLDisabled):
        client.acl.token.list()


# ---- Consul's documented response examples ------------------------------------------------------------------

# website/content/api-docs/catalog.mdx, "Register Entity", sample payload (Namespace: Enterprise only).
DOC_REGISTER = {
    "Datacenter": "dc1",
    "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
    "Node": "t2.320",
    "Address": "192.168.10.10",
    "TaggedAddresses": {"lan": "192.168.10.10", "wan": "10.0.10.10"},
    "NodeMeta": {"somekey": "somevalue"},
    "Service": {"ID": "redis1", "Service": "redis", "Tags": ["primary", "v1"], "Address": "127.0.0.1",
                "Meta": {"redis_version": "4.0"}, "Port": 8000},
    "Check": {"Node": "t2.320", "CheckID": "service:redis1", "Name": "Redis health check",
              "Notes": "Script based health check", "Status": "passing", "ServiceID": "redis1",
              "Definition": {"TCP": "localhost:8888", "Interval": "5s", "Timeout": "1s",
                             "DeregisterCriticalServiceAfter": "30s"}},
    "SkipNodeUpdate": False,
}
# health.mdx "List Checks for Service" / agent/check.mdx "List Checks": one check.
DOC_CHECK = {"Node": "foobar", "CheckID": "service:redis", "Name": "Service 'redis' check", "Status": "passing",
             "Notes": "", "Output": "", "ServiceID": "redis", "ServiceName": "redis", "ServiceTags": ["primary"]}
# catalog.mdx "List Nodes": one node.
DOC_NODE = {"ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "baz", "Address": "10.1.10.11",
            "Datacenter": "dc1", "TaggedAddresses": {"lan": "10.1.10.11", "wan": "10.1.10.11"},
            "Meta": {"instance_type": "t2.medium"}}
# health.mdx "List Service Instances for Service": one entry (Namespace: Enterprise only).
DOC_SERVICE_ENTRY = {
    "Node": DOC_NODE,
    "Service": {"ID": "redis", "Service": "redis", "Tags": ["primary"], "Address": "10.1.10.12",
                "Meta": {"redis_version": "4.0"}, "Port": 8000, "Weights": {"Passing": 10, "Warning": 1}},
    "Checks": [DOC_CHECK],
}
# session.mdx "Read Session": one session.
DOC_SESSION = {"ID": "adf4238a-882b-9ddc-4a9d-5b6758e4159e", "Name": "test-session", "Node": "raja-laptop-02",
               "LockDelay": 15000000000, "Behavior": "release", "TTL": "30s", "NodeChecks": ["serfHealth"],
               "ServiceChecks": None, "CreateIndex": 1086449, "ModifyIndex": 1086449}


FREE_FORM_MAPS = frozenset({"Meta", "NodeMeta", "TaggedAddresses", "ServiceMeta"})


def same_shape(documented: Any, ours: Any, where: str = "") -> list[str]:
    """Where `ours` lacks a documented field or holds another JSON type (null matches any, as Go decodes it)."""
    if documented is None or ours is None:
        return []
    if isinstance(documented, dict):
        if not isinstance(ours, dict):
            return [f"{where}: object expected, got {json.dumps(ours)[:60]}"]
        problems = []
        for key, value in documented.items():
            if key not in ours:
                problems.append(f"{where}.{key}: missing")
            elif key in FREE_FORM_MAPS:
                # Their keys are the example's data, not fields: only the type is the shape.
                problems += [] if isinstance(ours[key], dict) else [f"{where}.{key}: object expected"]
            else:
                problems += same_shape(value, ours[key], f"{where}.{key}")
        return problems
    if isinstance(documented, list):
        if not isinstance(ours, list):
            return [f"{where}: array expected"]
        if not documented:
            return []
        return [p for item in ours[:1] for p in same_shape(documented[0], item, f"{where}[0]")]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (documented, ours))
    if type(documented) is not type(ours) and not numbers:
        return [f"{where}: {type(documented).__name__} expected, got {type(ours).__name__}"]
    return []


@pytest.fixture(scope="module")
def documented(server: ServerProcess) -> ServerProcess:
    r = requests.put(server.url + "/v1/catalog/register", json=DOC_REGISTER, timeout=10)
    assert r.status_code == 200, r.text
    r = requests.put(server.url + "/v1/agent/service/register", timeout=10, json={
        "ID": "redis", "Name": "redis", "Tags": ["primary"], "Address": "10.1.10.12", "Port": 8000,
        "Meta": {"redis_version": "4.0"}, "Weights": {"Passing": 10, "Warning": 1}, "Check": {"TTL": "30s"},
    })
    assert r.status_code == 200, r.text
    return server


def get(server: ServerProcess, path: str) -> Any:
    r = requests.get(server.url + path, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def node_name(server: ServerProcess) -> str:
    return str(get(server, "/v1/agent/self")["Config"]["NodeName"])


EXAMPLES = [
    ("catalog.mdx List Nodes", "/v1/catalog/nodes", DOC_NODE, lambda answer, _: answer),
    ("health.mdx List Checks for Service", "/v1/health/checks/redis", DOC_CHECK, lambda answer, _: answer),
    ("health.mdx List Checks for Node", "/v1/health/node/{node}", DOC_CHECK, lambda answer, _: answer),
    ("health.mdx List Service Instances", "/v1/health/service/redis", DOC_SERVICE_ENTRY, lambda answer, _: answer),
    ("agent/check.mdx List Checks", "/v1/agent/checks", DOC_CHECK, lambda answer, _: list(answer.values())),
]


@pytest.mark.parametrize("source, path, example, elements", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_answers_have_the_documented_shape(documented: ServerProcess, source: str, path: str, example: Any,
                                           elements: Any) -> None:
    answer = elements(get(documented, path.format(node=node_name(documented))), None)
    assert answer, f"{path} answered nothing"
    problems = [p for item in answer for p in same_shape(example, item)]
    assert problems == [], f"{source}: {problems}"


def test_documented_check_definition_comes_back_as_documented(documented: ServerProcess) -> None:
    checks = {c["CheckID"]: c for c in get(documented, "/v1/health/node/t2.320")}
    check = checks["service:redis1"]
    for key in ("Node", "CheckID", "Name", "Notes", "Status", "ServiceID"):
        assert check[key] == DOC_REGISTER["Check"][key]  # type: ignore[index]
    assert {k: check["Definition"][k] for k in ("TCP", "Interval", "Timeout", "DeregisterCriticalServiceAfter")} \
        == DOC_REGISTER["Check"]["Definition"]  # type: ignore[index]
    nodes = {n["Node"]: n for n in get(documented, "/v1/catalog/nodes")}
    assert nodes["t2.320"]["TaggedAddresses"] == DOC_REGISTER["TaggedAddresses"]
    assert nodes["t2.320"]["Meta"] == DOC_REGISTER["NodeMeta"]


def test_documented_session_comes_back_as_documented(documented: ServerProcess) -> None:
    r = requests.put(documented.url + "/v1/session/create", timeout=10,
                     json={"Name": "test-session", "LockDelay": "15s", "TTL": "30s"})
    assert r.status_code == 200, r.text
    (session,) = get(documented, f"/v1/session/info/{r.json()['ID']}")
    assert same_shape(DOC_SESSION, session) == []
    for key in ("Name", "LockDelay", "Behavior", "TTL", "NodeChecks"):
        assert session[key] == DOC_SESSION[key], key
