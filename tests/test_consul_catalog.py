"""Consul catalog, agent and health endpoints against a real server, through py-consul.

Covers registration, TTL checks, filters, maintenance, catalog register/deregister, blocking
indexes and Consul's error answers for bad input.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import consul
import pytest
import requests

from support import ServerProcess


def wait_until(what: str, probe: Callable[[], Any], deadline: float = 30.0) -> Any:
    """Polls `probe` until it returns something truthy; fails with `what` after the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def node_name(client: consul.Consul) -> str:
    return client.agent.self()["Config"]["NodeName"]


def check_status(client: consul.Consul, check_id: str) -> str | None:
    check = client.agent.checks().get(check_id)
    return None if check is None else check["Status"]


# ---- agent ------------------------------------------------------------------------------------


def test_agent_self_and_members(client: consul.Consul, server: ServerProcess) -> None:
    me = client.agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["Server"] is True
    assert me["Config"]["Version"] == "1.17.0"
    assert me["Config"]["NodeID"]
    assert me["Stats"]["consul"]["server"] == "true"
    assert me["Stats"]["consul"]["leader_addr"] == client.status.leader()
    members = client.agent.members()
    assert len(members) == 1
    assert members[0]["Name"] == me["Config"]["NodeName"]
    assert members[0]["Port"] == 8301
    assert members[0]["Status"] == 1
    assert members[0]["Tags"]["role"] == "consul"
    assert members[0]["Tags"]["dc"] == "dc1"


def test_node_is_registered_with_serf_health(client: consul.Consul) -> None:
    node = node_name(client)
    _, nodes = client.catalog.nodes()
    assert node in [n["Node"] for n in nodes]
    _, checks = client.health.node(node)
    serf = [c for c in checks if c["CheckID"] == "serfHealth"]
    assert serf and serf[0]["Status"] == "passing" and serf[0]["Name"] == "Serf Health Status"


def test_register_service_with_ttl_check(client: consul.Consul) -> None:
    assert client.agent.service.register(
        "ttl-svc",
        service_id="ttl-svc-1",
        address="10.0.0.5",
        port=9000,
        tags=["v1"],
        meta={"team": "core"},
        check=consul.Check.ttl("30s"),
    )
    svc = client.agent.services()["ttl-svc-1"]
    assert svc["Service"] == "ttl-svc"
    assert svc["Port"] == 9000 and svc["Address"] == "10.0.0.5"
    assert svc["Tags"] == ["v1"] and svc["Meta"] == {"team": "core"}
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert svc["EnableTagOverride"] is False
    assert client.agent.service_definition("ttl-svc-1")["ID"] == "ttl-svc-1"

    check_id = "service:ttl-svc-1"
    assert check_status(client, check_id) == "critical"  # Consul's default initial status
    client.agent.check.ttl_pass(check_id, "all good")
    check = client.agent.checks()[check_id]
    assert check["Status"] == "passing" and check["Output"] == "all good"
    assert check["ServiceName"] == "ttl-svc" and check["Type"] == "ttl"
    client.agent.check.ttl_warn(check_id, "slow")
    assert check_status(client, check_id) == "warning"
    client.agent.check.ttl_fail(check_id)
    assert check_status(client, check_id) == "critical"
    r = requests.put(
        client.http.base_uri + f"/v1/agent/check/update/{check_id}", json={"Status": "passing", "Output": "fine"}
    )
    assert r.status_code == 200
    check = client.agent.checks()[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "fine")

    assert client.agent.service.deregister("ttl-svc-1")
    assert "ttl-svc-1" not in client.agent.services()
    assert check_id not in client.agent.checks()


def test_ttl_check_goes_critical_when_not_updated(client: consul.Consul) -> None:
    client.agent.service.register("ttl-expire", check=consul.Check.ttl("1s"))
    client.agent.check.ttl_pass("service:ttl-expire", "alive")
    assert check_status(client, "service:ttl-expire") == "passing"
    wait_until("the TTL to expire", lambda: check_status(client, "service:ttl-expire") == "critical")
    assert client.agent.checks()["service:ttl-expire"]["Output"].startswith("TTL expired")
    client.agent.service.deregister("ttl-expire")


def test_agent_check_register_and_deregister(client: consul.Consul) -> None:
    client.agent.service.register("chk-owner", service_id="chk-owner-1")
    assert client.agent.check.register(
        "extra", check=consul.Check.ttl("30s"), check_id="extra-1", service_id="chk-owner-1", notes="n"
    )
    check = client.agent.checks()["extra-1"]
    assert check["ServiceID"] == "chk-owner-1" and check["ServiceName"] == "chk-owner" and check["Notes"] == "n"
    # a node-level check (no service)
    assert client.agent.check.register("node-disk", check=consul.Check.ttl("30s"))
    assert client.agent.checks()["node-disk"]["ServiceID"] == ""
    assert client.agent.check.deregister("extra-1")
    assert client.agent.check.deregister("node-disk")
    assert "extra-1" not in client.agent.checks()
    client.agent.service.deregister("chk-owner-1")


def test_reregistration_keeps_status_and_replace_existing_checks(client: consul.Consul) -> None:
    checks = [{"CheckID": "re-a", "TTL": "30s"}, {"CheckID": "re-b", "TTL": "30s"}]
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "re", "Checks": checks})
    assert r.status_code == 200
    client.agent.check.ttl_pass("re-a")
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "re", "Checks": checks})
    assert r.status_code == 200
    assert check_status(client, "re-a") == "passing"  # re-registering does not flap
    r = requests.put(
        client.http.base_uri + "/v1/agent/service/register?replace-existing-checks=true",
        json={"Name": "re", "Checks": checks[:1]},
    )
    assert r.status_code == 200
    assert check_status(client, "re-b") is None
    assert check_status(client, "re-a") == "passing"
    client.agent.service.deregister("re")


def test_snake_case_and_lowercase_keys(client: consul.Consul) -> None:
    body = {
        "name": "snake",
        "id": "snake-1",
        "port": 81,
        "enable_tag_override": True,
        "tags": ["x"],
        "weights": {"passing": 3, "warning": 0},
        "check": {"check_id": "snake-ttl", "ttl": 30_000_000_000, "deregister_critical_service_after": "90m"},
    }
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json=body)
    assert r.status_code == 200, r.text
    svc = client.agent.services()["snake-1"]
    assert svc["EnableTagOverride"] is True and svc["Weights"] == {"Passing": 3, "Warning": 0}
    check = client.agent.checks()["snake-ttl"]
    assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1h30m0s"
    client.agent.service.deregister("snake-1")


# ---- health and filters -----------------------------------------------------------------------


def test_health_service_passing_and_tag_filters(client: consul.Consul) -> None:
    for i, tags in enumerate((["blue", "canary"], ["blue"], ["green"])):
        client.agent.service.register(
            "hs", service_id=f"hs-{i}", port=7000 + i, tags=tags, check=consul.Check.ttl("60s")
        )
    client.agent.check.ttl_pass("service:hs-0")
    client.agent.check.ttl_pass("service:hs-2")

    _, all_entries = client.health.service("hs")
    assert sorted(e["Service"]["ID"] for e in all_entries) == ["hs-0", "hs-1", "hs-2"]
    entry = all_entries[0]
    assert {c["CheckID"] for c in entry["Checks"]} >= {"serfHealth", "service:hs-0"}
    assert entry["Node"]["Node"] == node_name(client)

    _, passing = client.health.service("hs", passing=True)
    assert sorted(e["Service"]["ID"] for e in passing) == ["hs-0", "hs-2"]
    _, blue = client.health.service("hs", tag="blue")
    assert sorted(e["Service"]["ID"] for e in blue) == ["hs-0", "hs-1"]
    _, blue_canary = client.health.service("hs", tag=["blue", "canary"])
    assert [e["Service"]["ID"] for e in blue_canary] == ["hs-0"]
    _, blue_passing = client.health.service("hs", tag="blue", passing=True)
    assert [e["Service"]["ID"] for e in blue_passing] == ["hs-0"]

    _, by_tag = client.catalog.service("hs", tag="green")
    assert [s["ServiceID"] for s in by_tag] == ["hs-2"]
    assert by_tag[0]["ServicePort"] == 7002 and by_tag[0]["ServiceTags"] == ["green"]

    _, checks = client.health.checks("hs")
    assert sorted(c["CheckID"] for c in checks) == ["service:hs-0", "service:hs-1", "service:hs-2"]
    _, critical = client.health.state("critical")
    assert "service:hs-1" in [c["CheckID"] for c in critical]
    assert "service:hs-0" not in [c["CheckID"] for c in critical]
    _, anything = client.health.state("any")
    assert {"service:hs-0", "service:hs-1", "serfHealth"} <= {c["CheckID"] for c in anything}
    for i in range(3):
        client.agent.service.deregister(f"hs-{i}")
    assert client.health.service("hs")[1] == []


def test_health_state_rejects_unknown_state(server: ServerProcess) -> None:
    r = requests.get(server.url + "/v1/health/state/sideways")
    assert r.status_code == 400
    assert "sideways" in r.text


# ---- catalog ----------------------------------------------------------------------------------


def test_catalog_register_deregister(client: consul.Consul) -> None:
    assert client.catalog.register(
        "ext-node",
        "192.0.2.10",
        service={"Service": "ext-db", "ID": "db1", "Port": 5432, "Tags": ["primary"]},
        check={"CheckID": "db-alive", "Name": "db alive", "Status": "passing", "ServiceID": "db1"},
        node_meta={"rack": "r1"},
    )
    _, nodes = client.catalog.nodes()
    ext = [n for n in nodes if n["Node"] == "ext-node"]
    assert ext and ext[0]["Address"] == "192.0.2.10" and ext[0]["Meta"] == {"rack": "r1"}
    _, by_meta = client.catalog.nodes(node_meta={"rack": "r1"})
    assert [n["Node"] for n in by_meta] == ["ext-node"]

    _, services = client.catalog.services()
    assert services["ext-db"] == ["primary"]
    _, instances = client.catalog.service("ext-db")
    assert len(instances) == 1
    inst = instances[0]
    assert inst["Node"] == "ext-node" and inst["Address"] == "192.0.2.10"
    assert inst["ServiceAddress"] == "" and inst["ServicePort"] == 5432
    assert inst["NodeMeta"] == {"rack": "r1"} and inst["ServiceWeights"] == {"Passing": 1, "Warning": 1}
    assert inst["Datacenter"] == "dc1" and inst["CreateIndex"] > 0 and inst["ModifyIndex"] > 0

    _, node = client.catalog.node("ext-node")
    assert node["Node"]["Node"] == "ext-node"
    assert set(node["Services"]) == {"db1"}
    _, passing = client.health.service("ext-db", passing=True)
    assert len(passing) == 1  # no serfHealth on an external node: only the registered check counts

    assert client.catalog.deregister("ext-node", service_id="db1")
    assert client.catalog.service("ext-db")[1] == []
    assert client.catalog.node("ext-node")[1]["Services"] == {}
    assert client.catalog.deregister("ext-node")
    assert client.catalog.node("ext-node")[1] is None
    assert "ext-node" not in [n["Node"] for n in client.catalog.nodes()[1]]
    assert client.catalog.datacenters() == ["dc1"]


def test_catalog_register_requires_node_and_address(server: ServerProcess) -> None:
    r = requests.put(server.url + "/v1/catalog/register", json={"Address": "1.2.3.4"})
    assert r.status_code == 400 and "Must provide node" in r.text
    r = requests.put(server.url + "/v1/catalog/register", json={"Node": "n"})
    assert r.status_code == 400 and "Must provide address" in r.text


# ---- maintenance ------------------------------------------------------------------------------


def test_service_maintenance(client: consul.Consul) -> None:
    client.agent.service.register("maint", service_id="maint-1", check=consul.Check.ttl("60s"))
    client.agent.check.ttl_pass("service:maint-1")
    assert len(client.health.service("maint", passing=True)[1]) == 1
    assert client.agent.service.maintenance("maint-1", "true", "deploying")
    check = client.agent.checks()["_service_maintenance:maint-1"]
    assert check["Status"] == "critical" and check["Notes"] == "deploying"
    assert check["Name"] == "Service Maintenance Mode"
    assert client.health.service("maint", passing=True)[1] == []
    assert client.agent.service.maintenance("maint-1", "false")
    assert "_service_maintenance:maint-1" not in client.agent.checks()
    assert len(client.health.service("maint", passing=True)[1]) == 1

    r = requests.put(client.http.base_uri + "/v1/agent/service/maintenance/nope?enable=true")
    assert r.status_code == 404
    r = requests.put(client.http.base_uri + "/v1/agent/service/maintenance/maint-1")
    assert r.status_code == 400 and r.text == "Missing value for enable"
    r = requests.put(client.http.base_uri + "/v1/agent/service/maintenance/maint-1?enable=maybe")
    assert r.status_code == 400 and "Invalid value for enable" in r.text
    client.agent.service.deregister("maint-1")


def test_node_maintenance(client: consul.Consul) -> None:
    client.agent.service.register("nm", check=consul.Check.ttl("60s"))
    client.agent.check.ttl_pass("service:nm")
    assert len(client.health.service("nm", passing=True)[1]) == 1
    assert client.agent.maintenance("true", "kernel upgrade")
    assert client.agent.checks()["_node_maintenance"]["Notes"] == "kernel upgrade"
    assert client.health.service("nm", passing=True)[1] == []
    assert client.agent.maintenance("false")
    assert "_node_maintenance" not in client.agent.checks()
    assert len(client.health.service("nm", passing=True)[1]) == 1
    client.agent.service.deregister("nm")


# ---- blocking queries -------------------------------------------------------------------------


def test_blocking_health_service_wakes_only_for_its_service(client: consul.Consul, server: ServerProcess) -> None:
    client.agent.service.register("blk", service_id="blk-1", check=consul.Check.ttl("60s"))
    index, entries = client.health.service("blk")
    assert len(entries) == 1 and int(index) > 0

    # Writes elsewhere (a KV key, another service) leave this query's index where it was.
    requests.put(server.url + "/v1/kv/unrelated/key", data=b"v")
    client.agent.service.register("blk-other")
    same_index, _ = client.health.service("blk", index=index, wait="1s")
    assert same_index == index

    result: dict[str, Any] = {}

    def block() -> None:
        result["value"] = client.health.service("blk", index=index, wait="30s")

    waiter = threading.Thread(target=block)
    waiter.start()
    client.agent.service.register("blk", service_id="blk-2")
    waiter.join(40)
    assert not waiter.is_alive()
    new_index, new_entries = result["value"]
    assert int(new_index) > int(index)
    assert sorted(e["Service"]["ID"] for e in new_entries) == ["blk-1", "blk-2"]

    # A status change is a change of the health answer too.
    index2, _ = client.health.service("blk")
    client.agent.check.ttl_pass("service:blk-1")
    index3, _ = client.health.service("blk", index=index2, wait="30s")
    assert int(index3) > int(index2)
    for sid in ("blk-1", "blk-2", "blk-other"):
        client.agent.service.deregister(sid)
    index4, entries4 = client.health.service("blk", index=index3, wait="30s")
    assert entries4 == [] and int(index4) > int(index3)


def test_blocking_queries_woken_together_each_get_their_own_answer(server: ServerProcess) -> None:
    """Watchers woken by one change share a read only when they ask the same thing (path and query but index and
    wait): each of these variants of one service's queries gets what a fresh query of it answers."""
    def register(sid: str, tags: list[str], status: str) -> None:
        body = {"Node": "shared-n", "Address": "10.9.9.8", "Service": {"Service": "fan", "ID": sid, "Tags": tags},
                "Check": {"CheckID": f"c-{sid}", "ServiceID": sid, "Status": status}}
        assert requests.put(server.url + "/v1/catalog/register", json=body, timeout=10).status_code == 200

    register("fan-1", ["a"], "passing")
    register("fan-2", ["b"], "critical")
    # path -> how many instances a fresh query of it answers once fan-3 (tag a, passing) is there
    variants = {"/v1/health/service/fan": 3, "/v1/health/service/fan?passing": 2, "/v1/health/service/fan?tag=a": 2,
                "/v1/health/service/fan?filter=Service.ID%20%3D%3D%20%22fan-3%22": 1, "/v1/catalog/service/fan": 3,
                "/v1/catalog/service/fan?tag=b": 1}
    index = requests.get(server.url + "/v1/health/service/fan", timeout=10).headers["X-Consul-Index"]
    answers: dict[tuple[str, int], Any] = {}

    def block(path: str, i: int) -> None:
        joiner = "&" if "?" in path else "?"
        got = requests.get(f"{server.url}{path}{joiner}index={index}&wait=20s", timeout=30)
        answers[(path, i)] = (got.status_code, int(got.headers["X-Consul-Index"]), got.json())

    waiters = [threading.Thread(target=block, args=(path, i)) for path in variants for i in range(4)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)  # all of them blocked on the same index
    register("fan-3", ["a"], "passing")
    for waiter in waiters:
        waiter.join(25)
    assert len(answers) == len(variants) * 4
    for path, count in variants.items():
        fresh = requests.get(server.url + path, timeout=10).json()
        assert len(fresh) == count, (path, fresh)
        for i in range(4):
            status, new_index, body = answers[(path, i)]
            assert status == 200 and new_index > int(index) and body == fresh, (path, body, fresh)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"Name": ', "Request decode failed"),
        (b"", "Request decode failed"),
        (b'["not", "an", "object"]', "Request decode failed"),
        (b'{"Name": "x", "Port": "abc"}', "Request decode failed: json: cannot unmarshal string"),
        (b'{"Name": "x", "Tags": "a,b"}', "Request decode failed"),
        (b'{"Name": "x", "Meta": {"k": 1}}', "Request decode failed"),
        (b'{"Name": "x", "Check": {"TTL": "10x"}}', 'time: invalid duration "10x"'),
        (b'{"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "bogus"}}', "invalid duration"),
        (b'{"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}', "Interval must be > 0"),
        (b'{"Name": "x", "Check": {"TTL": "5s", "Interval": "5s"}}', "Interval and TTL cannot both be specified"),
        (b'{"Name": "x", "Check": {"TTL": "5s", "Status": "sunny"}}', "Status for checks must"),
        (b'{"Name": "x", "Address": "0.0.0.0"}', "Invalid service address"),
        (b'{"Name": "x", "Weights": {"Passing": 0}}', "Invalid Weights"),
        (b'{"Port": 80}', "Missing service name"),
    ],
)
def test_service_register_rejects_bad_input(server: ServerProcess, body: bytes, expected: str) -> None:
    r = requests.put(server.url + "/v1/agent/service/register", data=body)
    assert r.status_code == 400
    assert expected in r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "x" not in consul.Consul(host="127.0.0.1", port=server.http_port).agent.services()
    assert requests.get(server.url + "/v1/agent/self").status_code == 200


def test_check_endpoints_reject_bad_input(server: ServerProcess) -> None:
    r = requests.put(server.url + "/v1/agent/check/register", json={"TTL": "10s"})
    assert r.status_code == 400 and r.text == "Missing check name"
    r = requests.put(server.url + "/v1/agent/check/register", json={"Name": "c", "TTL": "10s", "Status": "x"})
    assert r.status_code == 400 and r.text == "Bad check status"
    r = requests.put(server.url + "/v1/agent/check/register", json={"Name": "c"})
    assert r.status_code == 400 and "TTL must be > 0" in r.text
    r = requests.put(server.url + "/v1/agent/check/register", json={"Name": "c", "TTL": "5s", "ServiceID": "ghost"})
    assert r.status_code == 404 and r.text == 'ServiceID "ghost" does not exist'
    r = requests.put(server.url + "/v1/agent/check/update/whatever", json={"Status": "great"})
    assert r.status_code == 400 and r.text == "Invalid check status: 'great'"
    r = requests.put(server.url + "/v1/agent/check/pass/ghost")
    assert r.status_code == 404
    assert r.text == 'Unknown check ID "ghost". Ensure that the check ID is passed, not the check name.'
    r = requests.put(server.url + "/v1/agent/check/deregister/ghost")
    assert r.status_code == 404
    r = requests.put(server.url + "/v1/agent/service/deregister/ghost")
    assert r.status_code == 404
    assert r.text == 'Unknown service ID "ghost". Ensure that the service ID is passed, not the service name.'
    r = requests.get(server.url + "/v1/agent/service/ghost")
    assert r.status_code == 404
    assert requests.get(server.url + "/v1/agent/self").status_code == 200
