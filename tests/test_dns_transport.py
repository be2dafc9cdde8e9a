"""Sizing of DNS replies as Consul does it: udp_answer_limit, EDNS0 buffer sizes, the TC bit and full answers
over TCP; and the --domain/--alt-domain/--dns-* options of `shipyard server`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from dns_support import ask, dig, dig_short, flags, rcode, records, wait_for
from support import ServerProcess

CONFIGURED = ("--domain", "sy.internal", "--alt-domain", "alt.test", "--dns-only-passing", "--dns-node-ttl", "30s",
              "--dns-service-ttl", "web*=10s", "--dns-service-ttl", "webx=20s", "--dns-a-record-limit", "2",
              "--dns-enable-truncate", "--dns-no-allow-stale")


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("dns-configured") / "data"
    proc = ServerProcess(data_dir, *CONFIGURED).start()
    yield proc
    proc.stop()


def register_many(server: ServerProcess, name: str, count: int) -> None:
    c = consul.Consul(host="127.0.0.1", port=server.http_port)
    for i in range(count):
        c.agent.service.register(name, service_id=f"{name}-{i}", address=f"127.0.2.{i + 1}", port=10000 + i)
    wait_for(lambda: len(records(ask(server.dns_port, f"{name}.service.{domain(server)}", "SRV", tcp=True).answer))
             == count)


def domain(server: ServerProcess) -> str:
    return "sy.internal" if "--domain" in server.extra else "consul"


def test_plain_udp_gets_udp_answer_limit_answers_without_tc_by_default(server: ServerProcess) -> None:
    register_many(server, "wide", 12)
    port = server.dns_port
    plain = ask(port, "wide.service.consul", "SRV")  # no EDNS0: 512 bytes, at most udp_answer_limit (3) answers
    assert len(records(plain.answer)) == 3 and "TC" not in flags(plain)  # Consul's enable_truncate is off
    assert len(records(plain.additional, "A")) == 3  # each kept answer keeps its address, no other
    assert len(records(ask(port, "wide.service.consul", "A").answer)) == 3
    assert len(records(ask(port, "wide.service.consul", "SRV", payload=4096).answer)) == 12  # EDNS0 buffer honoured
    full = ask(port, "wide.service.consul", "SRV", tcp=True)
    assert len(records(full.answer)) == 12 and len(records(full.additional, "A")) == 12
    assert "EDNS: version: 0, flags:; udp: 4096" in dig(port, "+bufsize=4096", "wide.service.consul", "SRV")


def test_a_small_edns_buffer_gets_as_many_answers_as_fit(server: ServerProcess) -> None:
    register_many(server, "huge", 60)
    reply = ask(server.dns_port, "huge.service.consul", "SRV", payload=1232)
    assert 5 < len(records(reply.answer)) < 60
    out = dig(server.dns_port, "+bufsize=1232", "huge.service.consul", "SRV")
    size = int(out.split("MSG SIZE  rcvd: ")[1].split()[0])
    assert 1232 - 100 < size <= 1232 - 8  # filled up to the buffer, less the UDP header, as Consul does
    assert len(records(ask(server.dns_port, "huge.service.consul", "SRV", tcp=True).answer)) == 60


def test_tc_bit_sends_clients_to_tcp_for_the_full_answer(configured: ServerProcess) -> None:
    register_many(configured, "big", 12)
    port = configured.dns_port
    plain = ask(port, "big.service.sy.internal", "SRV")
    assert len(records(plain.answer)) == 3 and "TC" in flags(plain).split()
    out = dig(port, "+noedns", "big.service.sy.internal", "SRV")  # dig follows TC to TCP, as stub resolvers do
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 12," in out
    assert len(dig_short(port, "+tcp", "big.service.sy.internal", "SRV")) == 12
    complete = ask(port, "big.service.sy.internal", "SRV", payload=4096)
    assert len(records(complete.answer)) == 12 and "TC" not in flags(complete).split()


def test_domain_and_alt_domain(configured: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=configured.http_port)
    c.agent.service.register("web", service_id="web-1", address="127.0.0.11", port=8001)
    port = configured.dns_port
    wait_for(lambda: dig_short(port, "web.service.sy.internal") == ["127.0.0.11"])
    assert dig_short(port, "web.service.sy.internal", "SRV") == ["1 1 8001 7f00000b.addr.dc1.sy.internal."]
    assert dig_short(port, "web.service.alt.test", "SRV") == ["1 1 8001 7f00000b.addr.dc1.alt.test."]
    assert dig_short(port, "7f00000b.addr.dc1.alt.test") == ["127.0.0.11"]
    assert rcode(ask(port, "web.service.consul", "A")) == "REFUSED"  # not this server's domain any more
    missing = ask(port, "nosuch.service.alt.test", "A")
    assert rcode(missing) == "NXDOMAIN" and records(missing.authority)[0].startswith(
        "alt.test. SOA ns.alt.test. hostmaster.alt.test. ")


def test_only_passing_ttls_and_a_record_limit(configured: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=configured.http_port)
    port = configured.dns_port
    for i, status in enumerate(("pass", "pass", "pass", "warn")):
        c.agent.service.register("webapp", service_id=f"webapp-{i}", address=f"127.0.3.{i + 1}", port=1000 + i,
                                 check={"TTL": "600s"})
        getattr(c.agent.check, f"ttl_{status}")(f"service:webapp-{i}")
    c.agent.service.register("webx", service_id="webx-1", address="127.0.4.1", port=1)
    c.agent.service.register("other", service_id="other-1", address="127.0.4.2", port=1)
    # only_passing: the warning instance is left out; SRV is not subject to a_record_limit.
    wait_for(lambda: len(dig_short(port, "webapp.service.sy.internal", "SRV")) == 3)
    assert "1 1 1003 7f000304.addr.dc1.sy.internal." not in dig_short(port, "webapp.service.sy.internal", "SRV")
    a = ask(port, "webapp.service.sy.internal", "A", tcp=True)
    assert len(records(a.answer)) == 2  # a_record_limit, whatever the transport
    assert {rrset.ttl for rrset in a.answer} == {10}  # web* glob
    assert ask(port, "webx.service.sy.internal", "A").answer[0].ttl == 20  # exact name beats the glob
    assert ask(port, "other.service.sy.internal", "A").answer[0].ttl == 0
    node = str(c.agent.self()["Config"]["NodeName"])
    assert ask(port, f"{node}.node.sy.internal", "A").answer[0].ttl == 30  # node_ttl
    assert ask(port, "7f000401.addr.dc1.sy.internal", "A").answer[0].ttl == 30
    srv = ask(port, "webx.service.sy.internal", "SRV")
    assert srv.answer[0].ttl == 20 and {r.ttl for r in srv.additional} == {20}


def test_a_registration_is_answered_by_the_next_question(server: ServerProcess, configured: ServerProcess) -> None:
    # Default (allow_stale): the view follows the store revision; --dns-no-allow-stale: the store is read per
    # question. Either way a write the API has acknowledged is in the very next answer, and so is its removal.
    for proc, zone in ((server, "consul"), (configured, "sy.internal")):
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        c.agent.service.register("fresh", service_id="fresh-1", address="127.0.5.1", port=1)
        assert dig_short(proc.dns_port, f"fresh.service.{zone}") == ["127.0.5.1"]
        c.agent.service.deregister("fresh-1")
        assert rcode(ask(proc.dns_port, f"fresh.service.{zone}", "A")) == "NXDOMAIN"


def test_flag_values_are_checked_at_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    for bad in (["--recursor", "not an address:x"], ["--dns-node-ttl", "soon"], ["--dns-service-ttl", "web"],
                ["--domain", "a..b"]):
        out = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "server", "--dev", *bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Invalid value" in out.stderr and "Traceback" not in out.stderr, bad
