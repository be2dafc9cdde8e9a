"""Consul's DNS interface answered for `dig`, the resolver everybody has, over UDP and TCP."""

from __future__ import annotations

import socket
import subprocess
import time

import consul

from support import ServerProcess, need_binary


def dig(server: ServerProcess, *args: str) -> str:
    binary = need_binary("dig")
    cmd = [binary, "@127.0.0.1", "-p", str(server.dns_port), "+time=2", "+tries=1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


def short(server: ServerProcess, *args: str) -> list[str]:
    return sorted(line for line in dig(server, "+short", *args).splitlines() if line)


def wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_service_a_and_srv_answers_only_healthy(server: ServerProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=server.http_port)
    c.agent.service.register("dnsweb", service_id="dnsweb-1", address="127.0.0.2", port=8081, tags=["blue"],
                             check={"TTL": "60s"})
    c.agent.service.register("dnsweb", service_id="dnsweb-2", address="127.0.0.3", port=8082, tags=["green"],
                             check={"TTL": "60s"})
    c.agent.check.ttl_pass("service:dnsweb-1")
    c.agent.check.ttl_pass("service:dnsweb-2")
    assert short(server, "dnsweb.service.consul", "A") == ["127.0.0.2", "127.0.0.3"]
    srv = short(server, "dnsweb.service.consul", "SRV")
    assert srv == ["1 1 8081 7f000002.addr.dc1.consul.", "1 1 8082 7f000003.addr.dc1.consul."]  # their own addresses
    full = dig(server, "dnsweb.service.consul", "SRV")
    assert "ADDITIONAL SECTION" in full and "127.0.0.2" in full
    assert short(server, "blue.dnsweb.service.consul", "A") == ["127.0.0.2"]
    assert short(server, "_dnsweb._green.service.consul", "SRV")[0].startswith("1 1 8082 ")
    assert short(server, "dnsweb.service.dc1.consul", "A") == ["127.0.0.2", "127.0.0.3"]
    assert short(server, "+tcp", "dnsweb.service.consul", "A") == ["127.0.0.2", "127.0.0.3"]
    c.agent.check.ttl_fail("service:dnsweb-2")
    wait_for(lambda: short(server, "dnsweb.service.consul", "A") == ["127.0.0.2"])


def test_unknown_names_and_node_lookup(server: ServerProcess) -> None:
    out = dig(server, "nosuch.service.consul", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out
    assert "status: REFUSED" in dig(server, "example.com", "A")
    node = consul.Consul(host="127.0.0.1", port=server.http_port).agent.self()["Config"]["NodeName"]
    assert short(server, f"{node}.node.consul", "A") == ["127.0.0.1"]


def test_garbage_datagram_does_not_break_the_server(server: ServerProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x00\x01garbage", ("127.0.0.1", server.dns_port))
    with socket.create_connection(("127.0.0.1", server.dns_port)) as s:
        s.sendall(b"\x00\x05abc")  # a TCP frame that promises more than it sends, then hangs up
    assert "status: NXDOMAIN" in dig(server, "nosuch.service.consul", "A")
