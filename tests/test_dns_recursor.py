"""Recursion: names outside the Consul domain go to the configured upstream resolvers (real dnsmasq processes),
with a timeout per upstream and failover past dead, silent and refusing ones, over UDP and TCP."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from dns_support import DnsmasqProcess, ask, dig, dig_short, flags, rcode, records
from support import ServerProcess, free_port


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DnsmasqProcess, DnsmasqProcess]]:
    directory = tmp_path_factory.mktemp("dnsmasq")
    # The first knows nothing and REFUSES; the second is authoritative for example. with one host record.
    refusing = DnsmasqProcess(directory, "--host-record=only.refusing.test,192.0.2.1").start()
    knowing = DnsmasqProcess(directory, "--host-record=outside.example,192.0.2.7",
                             "--host-record=outside.example,2001:db8::7", "--local=/example/").start()
    yield refusing, knowing
    knowing.stop()
    refusing.stop()


@pytest.fixture(scope="module")
def silent() -> Iterator[int]:
    """A UDP port that takes questions and never answers (a resolver that hangs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def resolving(tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[DnsmasqProcess, DnsmasqProcess],
              silent: int) -> Iterator[ServerProcess]:
    refusing, knowing = upstreams
    dead = free_port()  # nothing listens: the kernel answers "port unreachable"
    data_dir: Path = tmp_path_factory.mktemp("dns-recursing") / "data"
    proc = ServerProcess(data_dir, "--dns-recursor-timeout", "500ms", "--recursor", f"127.0.0.1:{dead}",
                         "--recursor", f"127.0.0.1:{silent}", "--recursor", f"127.0.0.1:{refusing.port}",
                         "--recursor", f"127.0.0.1:{knowing.port}").start()
    yield proc
    proc.stop()


def test_names_outside_the_domain_are_answered_by_the_upstream_that_knows(resolving: ServerProcess) -> None:
    port = resolving.dns_port
    assert dig_short(port, "outside.example") == ["192.0.2.7"]
    assert dig_short(port, "outside.example", "AAAA") == ["2001:db8::7"]
    assert dig_short(port, "+tcp", "outside.example") == ["192.0.2.7"]
    reply = ask(port, "outside.example", "A")
    assert rcode(reply) == "NOERROR" and "RA" in flags(reply).split()
    assert records(reply.answer) == ["outside.example. A 192.0.2.7"]
    missing = ask(port, "nosuch.example", "A")  # NXDOMAIN is an answer: passed on, not failed over
    assert rcode(missing) == "NXDOMAIN"
    assert dig_short(port, "only.refusing.test") == ["192.0.2.1"]  # the first upstream that answers wins


def test_consul_names_stay_local_and_say_recursion_is_available(resolving: ServerProcess) -> None:
    port = resolving.dns_port
    c = consul.Consul(host="127.0.0.1", port=resolving.http_port)
    c.agent.service.register("web", service_id="web-1", address="127.0.0.11", port=8001)
    assert dig_short(port, "web.service.consul") == ["127.0.0.11"]
    assert "flags: qr aa rd ra;" in dig(port, "web.service.consul")
    assert rcode(ask(port, "nosuch.service.consul", "A")) == "NXDOMAIN"  # never forwarded
    assert dig_short(port, "-x", "127.0.0.11") == ["web.service.dc1.consul."]


def test_every_upstream_failing_is_servfail(resolving: ServerProcess) -> None:
    reply = ask(resolving.dns_port, "elsewhere.org", "A")  # refused by both dnsmasqs, dead and silent otherwise
    assert rcode(reply) == "SERVFAIL" and "RA" in flags(reply).split()
    log = resolving.log_tail(200_000)
    assert "every recursor failed for elsewhere.org" in log and "Traceback" not in log
