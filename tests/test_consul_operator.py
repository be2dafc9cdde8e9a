"""Consul /v1/operator against a real server: one server that leads and votes, autopilot settings with cas,
no gossip keyring, usage counts."""

from __future__ import annotations

import consul
import pytest
import requests

from support import ServerProcess


def test_raft_configuration_is_this_one_server(client: consul.Consul) -> None:
    me = client.agent.self()["Config"]
    config = client.operator.raft_config()
    assert config["Index"] == 0
    (server,) = config["Servers"]
    assert (server["ID"], server["Node"]) == (me["NodeID"], me["NodeName"])
    assert server["Leader"] is True and server["Voter"] is True
    assert server["Address"] == client.status.leader()


def test_removing_peers_is_refused(client: consul.Consul, server: ServerProcess) -> None:
    with pytest.raises(consul.ConsulException, match="was not found in the Raft configuration"):
        client.operator.raft_remove_peer(address="10.255.255.1:8300")
    with pytest.raises(consul.ConsulException, match="cannot remove the only server"):
        client.operator.raft_remove_peer(peer_id=client.agent.self()["Config"]["NodeID"])
    response = requests.delete(f"{server.url}/v1/operator/raft/peer", timeout=10)
    assert response.status_code == 400 and "Must specify either ?id" in response.text


def test_leadership_has_nowhere_to_go(client: consul.Consul) -> None:
    with pytest.raises(consul.ConsulException, match="cannot find peer"):
        client.operator.raft_transfer_leader()


def test_autopilot_configuration_defaults_and_cas(client: consul.Consul) -> None:
    config = client.operator.autopilot_configuration()
    assert config["CleanupDeadServers"] is True and config["LastContactThreshold"] == "200ms"
    assert client.operator.update_autopilot_configuration(max_trailing_logs=500, cas=config["ModifyIndex"] + 7) is False
    assert client.operator.update_autopilot_configuration(max_trailing_logs=500, cas=config["ModifyIndex"]) is True
    updated = client.operator.autopilot_configuration()
    assert updated["MaxTrailingLogs"] == 500 and updated["ModifyIndex"] > config["ModifyIndex"]


def test_autopilot_health_and_state(client: consul.Consul, server: ServerProcess) -> None:
    health = client.operator.autopilot_health()
    assert health["Healthy"] is True and health["FailureTolerance"] == 0
    assert [(s["Leader"], s["Voter"], s["Healthy"]) for s in health["Servers"]] == [(True, True, True)]
    state = requests.get(f"{server.url}/v1/operator/autopilot/state", timeout=10).json()
    assert state["Voters"] == [state["Leader"]] and state["Servers"][state["Leader"]]["Status"] == "leader"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_keyring_without_gossip_encryption(server: ServerProcess, method: str) -> None:
    body = None if method == "GET" else {"Key": "8CooQRX1+VK7MsQQK6lx2LhumpSfQzUjE63HdAu2hgA="}
    response = requests.request(method, f"{server.url}/v1/operator/keyring", json=body, timeout=10)
    assert response.status_code == 500 and "encryption not enabled" in response.text


def test_usage_counts_the_catalog(client: consul.Consul) -> None:
    client.agent.service.register("usage-a", service_id="usage-a1")
    client.agent.service.register("usage-a", service_id="usage-a2")
    usage = client.operator.usage()
    assert usage["KnownLeader"] is True
    counts = usage["Usage"]["dc1"]
    services = client.catalog.services()[1]
    instances = sum(len(client.catalog.service(name)[1]) for name in services)
    assert counts["Services"] == len(services) and counts["ServiceInstances"] == instances
    assert counts["Nodes"] == len(client.catalog.nodes()[1])
