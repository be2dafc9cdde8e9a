"""Every name form of Consul's DNS interface, asked with dig and with dnspython, against a real server."""

from __future__ import annotations

import consul
import dns.rdatatype
import pytest

from dns_support import ask, dig, dig_short, flags, rcode, records, wait_for
from support import ServerProcess


@pytest.fixture(scope="module")
def c(server: ServerProcess) -> consul.Consul:
    client = consul.Consul(host="127.0.0.1", port=server.http_port)
    # The case: two instances with addresses of their own, on the server's node (127.0.0.1).
    client.agent.service.register("web", service_id="web-1", address="127.0.0.11", port=8001, tags=["blue"])
    client.agent.service.register("web", service_id="web-2", address="127.0.0.12", port=8002, tags=["green"],
                                  weights={"Passing": 7, "Warning": 1})
    client.agent.service.register("plain", service_id="plain-1", port=9001)  # no address: the node's
    client.agent.service.register("six", service_id="six-1", address="::1", port=9006)
    client.catalog.register("far", "127.0.0.40", node_meta={"rack": "r1", "rfc1035-raw": "v=spf1 -all"},
                            service={"Service": "db", "ID": "db-1", "Port": 5432})
    return client


def node_name(c: consul.Consul) -> str:
    return str(c.agent.self()["Config"]["NodeName"]).lower()


def test_srv_targets_are_the_instances_own_addresses(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    srv = ask(port, "web.service.consul", "SRV")
    assert records(srv.answer) == [
        "web.service.consul. SRV 1 1 8001 7f00000b.addr.dc1.consul.",
        "web.service.consul. SRV 1 7 8002 7f00000c.addr.dc1.consul.",  # weight from Weights.Passing
    ]
    assert records(srv.additional, "A") == ["7f00000b.addr.dc1.consul. A 127.0.0.11",
                                            "7f00000c.addr.dc1.consul. A 127.0.0.12"]
    # A client that follows the SRV target with a second question gets the instance, not the node.
    assert dig_short(port, "7f00000b.addr.dc1.consul", "A") == ["127.0.0.11"]
    assert dig_short(port, "7f00000c.addr.dc1.consul", "A") == ["127.0.0.12"]
    assert dig_short(port, "web.service.consul", "A") == ["127.0.0.11", "127.0.0.12"]
    full = dig(port, "web.service.consul", "SRV")
    assert "flags: qr aa rd;" in full and "ADDITIONAL SECTION" in full
    assert ["7f00000b.addr.dc1.consul.", "0", "IN", "A", "127.0.0.11"] in [line.split() for line in full.splitlines()]


def test_srv_target_is_the_node_when_the_instance_has_no_address(server: ServerProcess, c: consul.Consul) -> None:
    node = node_name(c)
    srv = ask(server.dns_port, "plain.service.consul", "SRV")
    assert records(srv.answer) == [f"plain.service.consul. SRV 1 1 9001 {node}.node.dc1.consul."]
    assert records(srv.additional, "A") == [f"{node}.node.dc1.consul. A 127.0.0.1"]
    assert records(srv.additional, "TXT") == [f'{node}.node.dc1.consul. TXT "consul-network-segment="']
    assert dig_short(server.dns_port, "plain.service.consul") == ["127.0.0.1"]


def test_ipv6_instances_answer_aaaa_and_a_32_digit_addr_target(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    target = "0" * 31 + "1"
    assert dig_short(port, "six.service.consul", "AAAA") == ["::1"]
    assert "status: NOERROR" in dig(port, "six.service.consul", "A") and dig_short(port, "six.service.consul") == []
    srv = ask(port, "six.service.consul", "SRV")
    assert records(srv.answer) == [f"six.service.consul. SRV 1 1 9006 {target}.addr.dc1.consul."]
    assert records(srv.additional, "AAAA") == [f"{target}.addr.dc1.consul. AAAA ::1"]
    assert dig_short(port, f"{target}.addr.dc1.consul", "AAAA") == ["::1"]
    assert dig_short(port, f"{target}.addr.consul", "AAAA") == ["::1"]


def test_tag_rfc2782_and_datacenter_forms(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    assert dig_short(port, "blue.web.service.consul") == ["127.0.0.11"]
    assert dig_short(port, "_web._green.service.consul", "SRV") == ["1 7 8002 7f00000c.addr.dc1.consul."]
    assert len(dig_short(port, "_web._tcp.service.consul", "SRV")) == 2
    assert len(dig_short(port, "_web._tcp.consul", "SRV")) == 2  # SRV questions may leave ".service" out
    assert dig_short(port, "web.service.dc1.consul") == ["127.0.0.11", "127.0.0.12"]
    assert dig_short(port, "web.service.dc1.dc.consul") == ["127.0.0.11", "127.0.0.12"]
    assert dig_short(port, "WEB.Service.CONSUL") == ["127.0.0.11", "127.0.0.12"]
    for name in ("red.web.service.consul", "web.service.dc9.consul", "nosuch.service.consul"):
        answer = ask(port, name, "A")
        assert rcode(answer) == "NXDOMAIN" and records(answer.authority, "SOA"), name


def test_node_lookup_answers_its_address_and_meta_as_txt(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    assert dig_short(port, "far.node.consul") == ["127.0.0.40"]
    assert dig_short(port, "far.node.dc1.consul", "TXT") == ['"rack=r1"', '"v=spf1 -all"']  # rfc1035-: value only
    a = ask(port, "far.node.consul", "A")
    assert records(a.additional, "TXT") == ['far.node.consul. TXT "rack=r1"', 'far.node.consul. TXT "v=spf1 -all"']
    anything = ask(port, "far.node.consul", "ANY")
    assert {dns.rdatatype.to_text(r.rdtype) for r in anything.answer} == {"A", "TXT"}
    assert dig_short(port, "db.service.consul", "SRV") == ["1 1 5432 far.node.dc1.consul."]
    missing = ask(port, "nosuch.node.consul", "A")
    assert rcode(missing) == "NXDOMAIN" and records(missing.authority, "SOA")


def test_consul_service_soa_and_ns_name_the_server(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    node = node_name(c)
    assert dig_short(port, "consul.service.consul", "SRV") == [f"1 1 8300 {node}.node.dc1.consul."]
    assert dig_short(port, "consul.service.consul") == ["127.0.0.1"]
    soa = ask(port, "consul", "SOA")
    (line,) = records(soa.answer)
    assert line.startswith("consul. SOA ns.consul. hostmaster.consul. ") and line.endswith(" 3600 600 86400 0")
    assert records(soa.authority) == [f"consul. NS {node}.node.dc1.consul."]
    assert records(soa.additional) == [f"{node}.node.dc1.consul. A 127.0.0.1"]
    assert dig_short(port, "consul", "NS") == [f"{node}.node.dc1.consul."]


def test_prepared_query_names_are_nxdomain_with_soa(server: ServerProcess, c: consul.Consul) -> None:
    # No query of these names exists: Consul answers NXDOMAIN with the SOA (tests/test_dns_query.py: known ones).
    for name in ("nosuch.query.consul", "_nosuch._tcp.query.consul", "nosuch.query.dc1.consul"):
        out = dig(server.dns_port, name, "SRV")
        assert "status: NXDOMAIN" in out, name
        assert ["consul.", "0", "IN", "SOA", "ns.consul.", "hostmaster.consul."] in [
            line.split()[:6] for line in out.splitlines()], name


def test_reverse_lookups_name_nodes_and_instances(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    assert dig_short(port, "-x", "127.0.0.40") == ["far.node.dc1.consul."]
    assert dig_short(port, "-x", "127.0.0.12") == ["web.service.dc1.consul."]
    assert "status: NXDOMAIN" in dig(port, "-x", "192.0.2.99")


def test_unknown_types_and_names_get_consuls_codes(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    mx = ask(port, "web.service.consul", "MX")  # a known name, a type it has none of: NODATA with the SOA
    assert rcode(mx) == "NOERROR" and mx.answer == [] and records(mx.authority, "SOA")
    assert rcode(ask(port, "web.nonsense.consul", "A")) == "NXDOMAIN"
    assert rcode(ask(port, "consul", "AXFR", tcp=True)) == "NOTIMP"
    refused = ask(port, "example.com", "A")  # no recursors configured
    assert rcode(refused) == "REFUSED" and "ra" not in flags(refused).lower().split()


def test_only_passing_is_off_by_default_and_weights_follow_status(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    c.agent.service.register("svc", service_id="svc-ok", address="127.0.0.21", port=1, check={"TTL": "600s"},
                             weights={"Passing": 9, "Warning": 2})
    c.agent.service.register("svc", service_id="svc-warn", address="127.0.0.22", port=2, check={"TTL": "600s"},
                             weights={"Passing": 9, "Warning": 2})
    c.agent.service.register("svc", service_id="svc-bad", address="127.0.0.23", port=3, check={"TTL": "600s"})
    c.agent.check.ttl_pass("service:svc-ok")
    c.agent.check.ttl_warn("service:svc-warn")
    c.agent.check.ttl_fail("service:svc-bad")
    wait_for(lambda: dig_short(port, "svc.service.consul") == ["127.0.0.21", "127.0.0.22"])
    assert dig_short(port, "svc.service.consul", "SRV") == ["1 2 2 7f000016.addr.dc1.consul.",
                                                            "1 9 1 7f000015.addr.dc1.consul."]


def test_answers_are_shuffled_per_query(server: ServerProcess, c: consul.Consul) -> None:
    for i in range(6):
        c.agent.service.register("many", service_id=f"many-{i}", address=f"127.0.1.{i + 1}", port=7000 + i)
    wait_for(lambda: len(ask(server.dns_port, "many.service.consul", "A", payload=4096).answer[0]) == 6)
    orders = {tuple(str(rd) for rd in ask(server.dns_port, "many.service.consul", "A", payload=4096).answer[0])
              for _ in range(30)}
    assert len(orders) > 1


def test_connect_names_answer_the_services_proxies(server: ServerProcess, c: consul.Consul) -> None:
    port = server.dns_port
    c.agent.service.register("web-sidecar-proxy", service_id="web-proxy-1", address="127.0.0.31", port=21000,
                             kind="connect-proxy", proxy={"DestinationServiceName": "web"})
    wait_for(lambda: dig_short(port, "web.connect.consul", "SRV") == ["1 1 21000 7f00001f.addr.dc1.consul."])
    assert dig_short(port, "web.connect.consul") == ["127.0.0.31"]
    assert rcode(ask(port, "web.ingress.consul", "A")) == "NXDOMAIN"  # no ingress gateways exist
    assert rcode(ask(port, "plain.connect.consul", "A")) == "NXDOMAIN"
