"""Consul's agent, catalog and health endpoints as Consul answers them (issue 12), against a real server.

Each test is one behaviour py-consul (or another Consul client) relies on: shapes, error texts, index headers.
"""

from __future__ import annotations

import socket
from pathlib import Path

import consul
import pytest
import requests

from support import ServerProcess


def get(server: ServerProcess, path: str, **params: str) -> requests.Response:
    return requests.get(server.url + path, params=params, timeout=10)


def put(server: ServerProcess, path: str, body: object = None, **params: str) -> requests.Response:
    return requests.put(server.url + path, json=body, params=params, timeout=10)


def node_name(server: ServerProcess) -> str:
    return str(get(server, "/v1/agent/self").json()["Config"]["NodeName"])


# ---- agent ----------------------------------------------------------------------------------------------------


def test_agent_checks_are_the_agents_own(server: ServerProcess, client: consul.Consul) -> None:
    client.agent.check.register("own-ttl", consul.Check.ttl("30s"))
    try:
        assert set(client.agent.checks()) == {"own-ttl"}  # no serfHealth: that is the servers' view of the node
        _, on_node = client.health.node(node_name(server))
        assert {"serfHealth", "own-ttl"} <= {c["CheckID"] for c in on_node}
    finally:
        client.agent.check.deregister("own-ttl")


def test_agent_self_members_and_wan(server: ServerProcess, client: consul.Consul) -> None:
    me = client.agent.self()
    assert set(me) == {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta", "xDS"}
    assert me["xDS"]["Ports"] == {"Plaintext": -1, "TLS": -1}
    lan = client.agent.members()
    assert me["Member"] in lan and lan[0]["Tags"]["dc"] == "dc1" and lan[0]["Tags"]["role"] == "consul"
    wan = client.agent.members(wan=True)
    assert [m["Name"] for m in wan] == [f"{me['Config']['NodeName']}.dc1"]


def test_agent_service_shape_and_tagged_addresses(server: ServerProcess, client: consul.Consul) -> None:
    client.agent.service.register("shape", tagged_addresses={"lan": {"address": "10.0.0.9", "port": 81}})
    try:
        assert client.agent.services()["shape"] == {
            "ID": "shape", "Service": "shape", "Tags": [], "Meta": {}, "Port": 0, "Address": "",
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "Datacenter": "dc1",
            "TaggedAddresses": {"lan": {"Address": "10.0.0.9", "Port": 81}},
        }
        _, [instance] = client.catalog.service("shape")
        assert instance["ServiceTaggedAddresses"] == {"lan": {"Address": "10.0.0.9", "Port": 81}}
    finally:
        client.agent.service.deregister("shape")


def test_sidecar_service_is_registered_and_removed_with_its_parent(server: ServerProcess,
                                                                   client: consul.Consul) -> None:
    client.agent.service.register("web-sc", port=8080, connect={"sidecar_service": {}})
    services = client.agent.services()
    sidecar = services["web-sc-sidecar-proxy"]
    assert sidecar["Kind"] == "connect-proxy" and sidecar["Port"] == 21000
    assert sidecar["Proxy"]["DestinationServiceName"] == "web-sc" and sidecar["Proxy"]["LocalServicePort"] == 8080
    assert "Connect" not in services["web-sc"]
    _, proxies = client.catalog.connect("web-sc")
    assert [p["ServiceID"] for p in proxies] == ["web-sc-sidecar-proxy"]
    _, healthy = client.health.connect("web-sc")
    assert [e["Service"]["ID"] for e in healthy] == ["web-sc-sidecar-proxy"]
    client.agent.service.deregister("web-sc")
    assert "web-sc-sidecar-proxy" not in client.agent.services()


def test_force_leave_reload_and_token_without_acls(server: ServerProcess) -> None:
    missing = put(server, "/v1/agent/force-leave/nonexistent-node", prune="1")
    assert (missing.status_code, missing.text) == (500, "agent: No node found with name 'nonexistent-node'")
    assert put(server, f"/v1/agent/force-leave/{node_name(server)}").status_code == 200
    assert put(server, "/v1/agent/reload").status_code == 200
    token = put(server, "/v1/agent/token/default", {"Token": "x"})
    assert (token.status_code, token.text) == (401, "ACL support disabled")


def test_metrics_json_and_prometheus(server: ServerProcess) -> None:
    metrics = get(server, "/v1/agent/metrics").json()
    assert set(metrics) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    gauges = {g["Name"]: g["Value"] for g in metrics["Gauges"]}
    assert gauges["consul.state.nodes"] >= 1 and gauges["consul.runtime.alloc_bytes"] > 0
    text = get(server, "/v1/agent/metrics", format="prometheus")
    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE consul_state_nodes gauge" in text.text


def test_monitor_streams_the_log_and_refuses_unknown_levels(server: ServerProcess) -> None:
    bad = get(server, "/v1/agent/monitor", loglevel="not-a-real-level")
    assert (bad.status_code, bad.text) == (400, "Unknown log level: not-a-real-level")
    with requests.get(server.url + "/v1/agent/monitor", params={"loglevel": "info"}, stream=True,
                      timeout=10) as stream:
        assert stream.status_code == 200
        put(server, "/v1/agent/reload")  # logs one INFO line
        lines = stream.iter_lines()
        line = next(lines).decode()
        assert "[INFO]" in line and "agent reload requested" in line


def test_leave_shuts_the_server_down(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--no-gateway", dev=True).start()
    try:
        assert put(proc, "/v1/agent/leave").status_code == 200
        assert proc.proc is not None
        assert proc.proc.wait(20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proc.http_port), timeout=2).close()
    finally:
        proc.stop()


# ---- catalog and health ---------------------------------------------------------------------------------------


def test_consul_service_of_the_server(server: ServerProcess, client: consul.Consul) -> None:
    _, services = client.catalog.services()
    assert services["consul"] == []
    _, [instance] = client.catalog.service("consul")
    assert instance["Node"] == node_name(server) and instance["ServicePort"] == 8300
    _, [entry] = client.health.service("consul")
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth"]
    _, node = client.catalog.node(node_name(server))
    assert "consul" in node["Services"]
    assert "consul" not in client.agent.services()


@pytest.mark.parametrize("path", ["/v1/catalog/connect/nothing", "/v1/health/connect/nothing",
                                  "/v1/health/ingress/nothing", "/v1/catalog/gateway-services/nothing"])
def test_empty_answers_carry_an_index(server: ServerProcess, path: str) -> None:
    answer = get(server, path)
    assert answer.status_code == 200 and answer.json() == []
    assert int(answer.headers["X-Consul-Index"]) >= 1


@pytest.mark.parametrize("path", ["/v1/catalog/service/consul", "/v1/catalog/connect/consul",
                                  "/v1/health/service/consul", "/v1/health/connect/consul"])
def test_unknown_peer_selects_nothing(server: ServerProcess, path: str) -> None:
    answer = get(server, path, peer="unknown-peer")
    assert answer.status_code == 200 and answer.json() == []
    assert "X-Consul-Index" in answer.headers


def test_gateway_services_and_ingress_health(server: ServerProcess, client: consul.Consul) -> None:
    client.catalog.register("n-igw", "10.1.10.51", service={"service": "igw", "kind": "ingress-gateway"})
    client.catalog.register("n-igw", "10.1.10.51", service={"service": "web-igw", "port": 8080})
    entry = {"Kind": "ingress-gateway", "Name": "igw",
             "Listeners": [{"Port": 8080, "Protocol": "tcp", "Services": [{"Name": "web-igw"}]}]}
    assert put(server, "/v1/config", entry).status_code == 200
    try:
        links = client.catalog.gateway_services("igw")
        assert [(g["Gateway"]["Name"], g["Service"]["Name"], g["GatewayKind"], g["Port"]) for g in links] == [
            ("igw", "web-igw", "ingress-gateway", 8080)]
        _, gateways = client.health.ingress("web-igw")
        assert [e["Service"]["ID"] for e in gateways] == ["igw"]
    finally:
        requests.delete(server.url + "/v1/config/ingress-gateway/igw", timeout=10)
        client.catalog.deregister("n-igw")


def test_deregister_in_another_datacenter_is_refused(server: ServerProcess) -> None:
    answer = put(server, "/v1/catalog/deregister", {"Node": "n2", "Datacenter": "dc2"})
    assert (answer.status_code, answer.text) == (500, "No path to datacenter")


def test_text_plain_json_from_a_client_but_not_from_a_browser(server: ServerProcess) -> None:
    # py-consul's asyncio client sends JSON as text/plain; a browser (Mozilla/...) may not.
    body = b'{"Name": "plain-text"}'
    client_ua = {"Content-Type": "text/plain; charset=utf-8", "User-Agent": "Python/3.11 aiohttp/3.9"}
    assert requests.put(server.url + "/v1/agent/service/register", data=body, headers=client_ua,
                        timeout=10).status_code == 200
    browser = {"Content-Type": "text/plain", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    assert requests.put(server.url + "/v1/agent/service/register", data=body, headers=browser,
                        timeout=10).status_code == 415
    put(server, "/v1/agent/service/deregister/plain-text")


def test_merge_central_config_folds_defaults_into_proxies(server: ServerProcess, client: consul.Consul) -> None:
    client.agent.service.register("mcc-web", port=8080, connect={"sidecar_service": {}})
    assert put(server, "/v1/config", {"Kind": "proxy-defaults", "Name": "global",
                                      "Config": {"local_connect_timeout_ms": 1000}}).status_code == 200
    assert put(server, "/v1/config", {"Kind": "service-defaults", "Name": "mcc-web",
                                      "Protocol": "http"}).status_code == 200
    try:
        _, [plain] = client.catalog.service("mcc-web-sidecar-proxy")
        assert "Config" not in plain["ServiceProxy"]
        _, [merged] = client.catalog.service("mcc-web-sidecar-proxy", merge_central_config=True)
        assert merged["ServiceProxy"]["Config"] == {"local_connect_timeout_ms": 1000, "protocol": "http"}
        _, [entry] = client.health.service("mcc-web-sidecar-proxy", merge_central_config=True)
        assert entry["Service"]["Proxy"]["Config"]["protocol"] == "http"
        _, [service] = client.catalog.service("mcc-web", merge_central_config=True)
        assert service["ServiceProxy"] == {}  # not a proxy: Consul leaves it as it is
    finally:
        requests.delete(server.url + "/v1/config/proxy-defaults/global", timeout=10)
        requests.delete(server.url + "/v1/config/service-defaults/mcc-web", timeout=10)
        client.agent.service.deregister("mcc-web")
