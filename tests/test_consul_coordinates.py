"""Consul network coordinates (/v1/coordinate) against a real server: datacenters, nodes, node, update."""

from __future__ import annotations

import consul
import requests

from support import ServerProcess

COORD = {"Adjustment": 0.001, "Error": 0.5, "Height": 0.0002, "Vec": [0.01, 0, 0, 0, 0, 0, 0, 0]}


def test_datacenters_hold_this_server(client: consul.Consul) -> None:
    node = client.agent.self()["Config"]["NodeName"]
    (dc,) = client.coordinate.datacenters()
    assert set(dc) == {"Datacenter", "Coordinates", "AreaID"}
    assert dc["Datacenter"] == "dc1" and dc["Coordinates"][0]["Node"] == node
    assert len(dc["Coordinates"][0]["Coord"]["Vec"]) == 8


def test_update_then_read_node_and_nodes(client: consul.Consul) -> None:
    client.catalog.register("coord-node", "10.1.1.1")
    assert client.coordinate.update("coord-node", COORD) is True
    index, found = client.coordinate.node("coord-node")
    assert found[0]["Node"] == "coord-node" and found[0]["Coord"] == COORD
    assert int(index) >= found[0]["ModifyIndex"]
    _, nodes = client.coordinate.nodes()
    assert "coord-node" in [n["Node"] for n in nodes]


def test_a_node_without_a_coordinate_is_404_with_an_index(server: ServerProcess) -> None:
    response = requests.get(f"{server.url}/v1/coordinate/node/nobody", timeout=10)
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) >= 1


def test_updates_for_unregistered_nodes_are_dropped(client: consul.Consul) -> None:
    assert client.coordinate.update("ghost-node", COORD) is True
    assert client.coordinate.node("ghost-node")[1] is None


def test_an_invalid_coordinate_is_refused(server: ServerProcess) -> None:
    bad = {"Node": "x", "Coord": {**COORD, "Vec": [0, 0]}}
    response = requests.put(f"{server.url}/v1/coordinate/update", json=bad, timeout=10)
    assert response.status_code == 500 and "dimensionality" in response.text
