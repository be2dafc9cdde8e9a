"""Consul user events against a real server: fire (payload, filters, errors), list (name filter, order) and blocking."""

from __future__ import annotations

import threading

import consul
import pytest
import requests

from support import ServerProcess


def test_fire_answers_the_event_and_list_returns_its_payload(client: consul.Consul) -> None:
    fired = client.event.fire("deploy-a", "v1.2.3")
    assert fired["Name"] == "deploy-a"
    assert fired["Version"] == 1 and fired["LTime"] >= 1 and fired["ID"]
    _, events = client.event.list(name="deploy-a")
    assert [(e["ID"], e["Payload"]) for e in events] == [(fired["ID"], b"v1.2.3")]


def test_events_are_listed_oldest_first_with_rising_ltime(client: consul.Consul) -> None:
    ids = [client.event.fire("order-check", str(i))["ID"] for i in range(3)]
    _, events = client.event.list(name="order-check")
    assert [e["ID"] for e in events] == ids
    assert [e["LTime"] for e in events] == sorted(e["LTime"] for e in events)


def test_an_event_without_a_body_has_a_null_payload(server: ServerProcess) -> None:
    fired = requests.put(f"{server.url}/v1/event/fire/nobody", timeout=10).json()
    assert fired["Payload"] is None


def test_node_filter_that_misses_this_node_is_not_kept_by_it(client: consul.Consul) -> None:
    node = client.agent.self()["Config"]["NodeName"]
    client.event.fire("filtered", "x", node="^no-such-node$")
    client.event.fire("filtered", "y", node=f"^{node}$")
    _, events = client.event.list(name="filtered")
    assert [e["Payload"] for e in events] == [b"y"]
    assert events[0]["NodeFilter"] == f"^{node}$"


def test_service_and_tag_filters_match_this_nodes_services(client: consul.Consul) -> None:
    client.agent.service.register("evsvc", tags=["blue"])
    client.event.fire("svc-filtered", "blue", service="^evsvc$", tag="^blue$")
    client.event.fire("svc-filtered", "green", service="^evsvc$", tag="^green$")
    client.event.fire("svc-filtered", "other", service="^othersvc$")
    _, events = client.event.list(name="svc-filtered")
    assert [e["Payload"] for e in events] == [b"blue"]


def test_list_filters_by_name_only(client: consul.Consul) -> None:
    client.event.fire("name-only", "p")
    _, events = client.event.list(name="name-only", service="unrelated", tag="whatever")
    assert [e["Payload"] for e in events] == [b"p"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v1/event/fire/x?tag=a", "Cannot provide tag filter without service filter"),
        ("/v1/event/fire/x?node=(", "Failed to parse node filter"),
    ],
)
def test_bad_fire_requests_are_400(server: ServerProcess, path: str, message: str) -> None:
    response = requests.put(server.url + path, timeout=10)
    assert response.status_code == 400
    assert message in response.text


def test_an_oversized_event_is_refused(server: ServerProcess) -> None:
    response = requests.put(f"{server.url}/v1/event/fire/big", data=b"x" * 600, timeout=10)
    assert response.status_code == 500
    assert "exceeds configured limit of 512 bytes" in response.text


def test_another_datacenter_has_no_path(client: consul.Consul) -> None:
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        client.event.fire("x", "y", dc="dc2")


def test_list_blocks_until_an_event_is_fired(client: consul.Consul, server: ServerProcess) -> None:
    index, _ = client.event.list(name="blocker")
    result: dict[str, object] = {}

    def wait() -> None:
        result["answer"] = client.event.list(name="blocker", index=index, wait="30s")

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # still blocked: nothing new yet
    client.event.fire("blocker", "now")
    waiter.join(20)
    assert not waiter.is_alive()
    new_index, events = result["answer"]  # type: ignore[misc]
    assert int(new_index) > int(index)
    assert [e["Payload"] for e in events] == [b"now"]


def test_the_buffer_keeps_the_last_256_events(fresh_server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=fresh_server.http_port)
    for i in range(260):
        c.event.fire("ring", str(i))
    _, events = c.event.list(name="ring")
    assert len(events) == 256
    assert events[0]["Payload"] == b"4" and events[-1]["Payload"] == b"259"
