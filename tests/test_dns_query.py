"""Prepared queries over DNS (`<query>.query[.<dc>].consul`), asked with dig and with dnspython, against a real
server: by name and by ID, health and tag filters, DNS.TTL, templates, Near ordering, unknown queries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import consul
import dns.edns
import dns.message
import dns.query
import pytest
import requests

from dns_support import ask, dig, dig_short, rcode, records
from support import ServerProcess


@pytest.fixture(scope="module")
def c(server: ServerProcess) -> consul.Consul:
    client = consul.Consul(host="127.0.0.1", port=server.http_port)
    _register(client, "pq1", "127.0.0.51", "api", ["v1"], "passing")
    _register(client, "pq2", "127.0.0.52", "api", ["v2"], "warning")
    _register(client, "pq3", "127.0.0.53", "api", ["v1"], "critical")
    # An instance with an address of its own: its SRV target is an .addr name, as in the service form.
    _register(client, "pq4", "127.0.0.54", "api", ["v1"], "passing", own_address="127.0.0.64")
    return client


@pytest.fixture
def queries(server: ServerProcess) -> Iterator[str]:
    api = f"{server.url}/v1/query"
    yield api
    for query in requests.get(api, timeout=10).json():
        requests.delete(f"{api}/{query['ID']}", timeout=10)


def _register(client: consul.Consul, node: str, address: str, service: str, tags: list[str], status: str,
              *, own_address: str = "") -> None:
    check = {"Node": node, "CheckID": f"{node}-{service}", "Name": "c", "Status": status, "ServiceID": service}
    port = 8000 + int(address.rsplit(".")[-1])
    client.catalog.register(node, address, service={"Service": service, "ID": service, "Tags": tags,
                                                    "Address": own_address, "Port": port}, check=check)


def _create(api: str, body: dict[str, Any]) -> str:
    response = requests.post(api, json=body, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["ID"])


def _in_order(message: dns.message.Message) -> list[str]:
    """The answer section's records in the order the server sent them."""
    return [str(rd) for rrset in message.answer for rd in rrset]


def test_a_query_answers_by_name_and_by_id(server: ServerProcess, c: consul.Consul, queries: str) -> None:
    port = server.dns_port
    query_id = _create(queries, {"Name": "api-all", "Service": {"Service": "api"}})
    everyone = ["127.0.0.51", "127.0.0.52", "127.0.0.64"]  # critical pq3 is left out, pq4 by its own address
    assert dig_short(port, "api-all.query.consul") == everyone
    assert dig_short(port, f"{query_id}.query.consul") == everyone
    assert dig_short(port, "api-all.query.dc1.consul") == everyone
    srv = ask(port, "api-all.query.consul", "SRV")
    assert rcode(srv) == "NOERROR"
    assert records(srv.answer) == [
        "api-all.query.consul. SRV 1 1 8051 pq1.node.dc1.consul.",
        "api-all.query.consul. SRV 1 1 8052 pq2.node.dc1.consul.",
        "api-all.query.consul. SRV 1 1 8054 7f000040.addr.dc1.consul.",
    ]
    assert records(srv.additional, "A") == ["7f000040.addr.dc1.consul. A 127.0.0.64",
                                            "pq1.node.dc1.consul. A 127.0.0.51", "pq2.node.dc1.consul. A 127.0.0.52"]
    assert dig_short(port, "_api-all._tcp.query.consul", "SRV") == [
        "1 1 8051 pq1.node.dc1.consul.", "1 1 8052 pq2.node.dc1.consul.", "1 1 8054 7f000040.addr.dc1.consul."]
    assert rcode(ask(port, "api-all.query.dc9.consul", "A")) == "NXDOMAIN"  # no other datacenter to run it in


def test_only_passing_and_tags_filter_the_answers(server: ServerProcess, c: consul.Consul, queries: str) -> None:
    port = server.dns_port
    _create(queries, {"Name": "api-passing", "Service": {"Service": "api", "OnlyPassing": True}})
    _create(queries, {"Name": "api-v2", "Service": {"Service": "api", "Tags": ["v2"]}})
    _create(queries, {"Name": "api-not-v2", "Service": {"Service": "api", "Tags": ["!v2"]}})
    assert dig_short(port, "api-passing.query.consul") == ["127.0.0.51", "127.0.0.64"]
    assert dig_short(port, "api-v2.query.consul") == ["127.0.0.52"]
    assert dig_short(port, "api-not-v2.query.consul", "SRV") == ["1 1 8051 pq1.node.dc1.consul.",
                                                                 "1 1 8054 7f000040.addr.dc1.consul."]


def test_the_answer_ttl_is_the_querys_dns_ttl(server: ServerProcess, c: consul.Consul, queries: str) -> None:
    port = server.dns_port
    _create(queries, {"Name": "api-ttl", "Service": {"Service": "api", "Tags": ["v2"]}, "DNS": {"TTL": "42s"}})
    _create(queries, {"Name": "api-no-ttl", "Service": {"Service": "api", "Tags": ["v2"]}})
    assert [rrset.ttl for rrset in ask(port, "api-ttl.query.consul", "A").answer] == [42]
    assert [rrset.ttl for rrset in ask(port, "api-ttl.query.consul", "SRV").answer] == [42]
    assert ["api-ttl.query.consul.", "42", "IN", "A", "127.0.0.52"] in [
        line.split() for line in dig(port, "api-ttl.query.consul", "A").splitlines()]
    assert [rrset.ttl for rrset in ask(port, "api-no-ttl.query.consul", "A").answer] == [0]  # service_ttl's default


def test_unknown_and_empty_queries_are_nxdomain_with_soa(server: ServerProcess, c: consul.Consul,
                                                         queries: str) -> None:
    port = server.dns_port
    _create(queries, {"Name": "nobody", "Service": {"Service": "no-such-service"}})
    for name in ("nosuch.query.consul", "nobody.query.consul", "00000000-0000-0000-0000-000000000000.query.consul"):
        answer = ask(port, name, "A")
        assert rcode(answer) == "NXDOMAIN" and answer.answer == [], name
        assert records(answer.authority, "SOA")[0].startswith("consul. SOA ns.consul. hostmaster.consul."), name
        out = dig(port, name, "SRV")
        assert "status: NXDOMAIN" in out and ["consul.", "0", "IN", "SOA", "ns.consul.", "hostmaster.consul."] in [
            line.split()[:6] for line in out.splitlines()], name


def test_a_template_answers_names_under_its_prefix(server: ServerProcess, c: consul.Consul, queries: str) -> None:
    port = server.dns_port
    _create(queries, {"Name": "svc-", "Template": {"Type": "name_prefix_match"},
                      "Service": {"Service": "${name.suffix}", "OnlyPassing": True}})
    _create(queries, {"Name": "tagged-", "Template": {"Type": "name_prefix_match", "Regexp": "^tagged-(.+)-(.+)$"},
                      "Service": {"Service": "${match(2)}", "Tags": ["${match(1)}"]}})
    assert dig_short(port, "svc-api.query.consul") == ["127.0.0.51", "127.0.0.64"]
    assert dig_short(port, "tagged-v2-api.query.consul", "SRV") == ["1 1 8052 pq2.node.dc1.consul."]
    assert rcode(ask(port, "svc-nosuch.query.consul", "A")) == "NXDOMAIN"


def test_near_agent_and_near_ip_order_the_answers(server: ServerProcess, c: consul.Consul, queries: str) -> None:
    port = server.dns_port
    me = str(c.agent.self()["Config"]["NodeName"])
    c.agent.service.register("nearby", service_id="nearby", port=9100)  # on the server's node, 127.0.0.1
    for node, address, x in ((me, "", 0.0), ("far1", "127.0.0.71", 0.55), ("far2", "127.0.0.72", 0.1),
                             ("far3", "127.0.0.73", 0.3)):
        if address:
            _register(c, node, address, "nearby", [], "passing")
        c.coordinate.update(node, {"Adjustment": 0, "Error": 0.1, "Height": 0, "Vec": [x, 0, 0, 0, 0, 0, 0, 0]})
    _create(queries, {"Name": "near-agent", "Service": {"Service": "nearby", "Near": "_agent"}})
    _create(queries, {"Name": "near-ip", "Service": {"Service": "nearby", "Near": "_ip"}})
    by_distance = ["127.0.0.1", "127.0.0.72", "127.0.0.73", "127.0.0.71"]
    # Sorted answers are not shuffled again afterwards: every question gets the same order.
    for _ in range(5):
        assert _in_order(ask(port, "near-agent.query.consul", "A", payload=4096)) == by_distance
    # A plain UDP question gets udp_answer_limit (3) answers, as for the service form: the nearest ones.
    assert _in_order(ask(port, "near-agent.query.consul", "A")) == by_distance[:3]
    assert [rd.split()[-1] for rd in _in_order(ask(port, "near-agent.query.consul", "SRV", tcp=True))] == [
        f"{me.lower()}.node.dc1.consul.", "far2.node.dc1.consul.", "far3.node.dc1.consul.", "far1.node.dc1.consul."]
    # `_ip`: the client's address (127.0.0.1, the server's node), or the client subnet a resolver forwards.
    assert _in_order(ask(port, "near-ip.query.consul", "A", payload=4096)) == by_distance
    for_far3 = dns.message.make_query("near-ip.query.consul", "A", use_edns=0,
                                      options=[dns.edns.ECSOption("127.0.0.73", 32)])
    answer = dns.query.udp(for_far3, "127.0.0.1", port=port, timeout=5)
    assert _in_order(answer) == ["127.0.0.73", "127.0.0.72", "127.0.0.71", "127.0.0.1"]
    assert dig(port, "+short", "+subnet=127.0.0.73/32", "near-ip.query.consul").split()[0] == "127.0.0.73"
