"""Numbers too large for what they describe, and packets that are not questions, against a real server.

Each is refused the way the protocol's own server refuses it (Consul's 400 texts, Marathon's 422, a dropped DNS
packet), never with a 500, a traceback in the log or a blocking query that never ends.
"""

from __future__ import annotations

import socket
import struct

import dns.flags
import dns.message
import httpx
import pytest

from support import ServerProcess

GO_MAX_HOURS = "2562047h"  # the longest whole-hour Go time.Duration (int64 nanoseconds)


def consul_put(server: ServerProcess, path: str, body: object) -> httpx.Response:
    return httpx.put(server.url + path, json=body, timeout=30)


def assert_no_traceback(server: ServerProcess) -> None:
    log = server.log_tail(200_000)
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


@pytest.mark.parametrize(("path", "body", "text"), [
    ("/v1/agent/service/register", {"Name": "b1", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": 1e300}},
     "Request decode failed: duration out of range for DeregisterCriticalServiceAfter: 1e+300"),
    ("/v1/agent/service/register", {"Name": "b2", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "9999999999h"}},
     'Request decode failed: time: invalid duration "9999999999h"'),
    ("/v1/agent/check/register", {"Name": "b3", "TTL": 1e300},
     "Request decode failed: duration out of range for TTL: 1e+300"),
    ("/v1/agent/service/register", {"Name": "b4", "Weights": {"Passing": 1e300, "Warning": 1}},
     "Request decode failed: json: cannot unmarshal number into Go struct field ServiceDefinition.Passing of type int"),
    ("/v1/agent/service/register", {"Name": "b5", "Port": 1e300},
     "Request decode failed: json: cannot unmarshal number into Go struct field ServiceDefinition.Port of type int"),
    ("/v1/catalog/register", {"Node": "n1", "Address": "127.0.0.1",
                              "Service": {"Service": "b6", "Weights": {"Passing": 1e300, "Warning": 1}}},
     "Request decode failed: json: cannot unmarshal number into Go struct field NodeService.Passing of type int"),
    ("/v1/catalog/register", {"Node": "n1", "Address": "127.0.0.1",
                              "Check": {"CheckID": "b7", "Name": "b7", "Definition": {"HTTP": "http://127.0.0.1:1/",
                                                                                    "Interval": "99999999999999h"}}},
     'Request decode failed: time: invalid duration "99999999999999h"'),
    ("/v1/session/create", {"LockDelay": "99999999999999h"},
     'Request decode failed: time: invalid duration "99999999999999h"'),
    ("/v1/session/create", {"TTL": "99999999999999h"},
     "Session TTL '99999999999999h' invalid: time: invalid duration \"99999999999999h\""),
])
def test_consul_numbers_beyond_go_range_are_400(server: ServerProcess, path: str, body: object, text: str) -> None:
    r = consul_put(server, path, body)
    assert (r.status_code, r.text) == (400, text)
    assert_no_traceback(server)


def test_consul_longest_go_duration_is_still_accepted(server: ServerProcess) -> None:
    r = consul_put(server, "/v1/agent/check/register", {"Name": "longest", "TTL": GO_MAX_HOURS})
    assert r.status_code == 200, r.text
    checks = httpx.get(server.url + "/v1/agent/checks", timeout=30).json()
    assert checks["longest"]["Definition"]["TTL"] == "2562047h0m0s"


@pytest.mark.parametrize("index", [
    "18446744073709551616",  # 2^64: one past Consul's uint64
    "99999999999999999999999999999999",
    "9" * 5000,  # past Python's int() digit limit too
    "+5", " 5", "1_0", "-1", "0x10",
])
def test_blocking_index_that_is_no_uint64_is_invalid_index(server: ServerProcess, index: str) -> None:
    # Before: 2^64 and above were taken as an index from the future, and the request waited for it.
    r = httpx.get(server.url + "/v1/kv/bounds", params={"index": index}, timeout=30)
    assert (r.status_code, r.text) == (400, "Invalid index")


def test_blocking_index_at_uint64_max_and_bad_wait(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/v1/kv/bounds", params={"index": str(2**64 - 1), "wait": "10ms"}, timeout=30)
    assert r.status_code == 404 and int(r.headers["X-Consul-Index"]) >= 1
    r = httpx.get(server.url + "/v1/kv/bounds", params={"index": "1", "wait": "99999999999999h"}, timeout=30)
    assert (r.status_code, r.text) == (400, "Invalid wait time")


@pytest.mark.parametrize(("field", "path"), [
    ({"instances": 1e300}, "/instances"),
    ({"cpus": 1e300}, "/resources/cpu"),
    ({"mem": 1e300}, "/resources/memory"),
    ({"taskKillGracePeriodSeconds": 1e300}, "/stop_grace"),
    ({"backoffSeconds": 1e300}, "/restart/initial"),
    ({"backoffFactor": 1e300}, "/restart/factor"),
    ({"maxLaunchDelaySeconds": 1e300}, "/restart/max"),
    ({"healthChecks": [{"protocol": "TCP", "intervalSeconds": 1e300}]}, "/health/interval"),
    ({"healthChecks": [{"protocol": "TCP", "timeoutSeconds": 1e300}]}, "/health/timeout"),
    ({"healthChecks": [{"protocol": "TCP", "gracePeriodSeconds": 1e300}]}, "/health/grace"),
    ({"healthChecks": [{"protocol": "TCP", "maxConsecutiveFailures": 1e300}]}, "/health/failures"),
])
def test_marathon_numbers_beyond_range_are_422_and_deploy_nothing(server: ServerProcess, field: dict[str, object],
                                                                   path: str) -> None:
    # Before: some were written to the store and the reply failed (500), others failed in the store's encoder;
    # the node agent then crashed on every pass over the stored job.
    app_id = "/bounds" + path.replace("/", "-").replace("_", "-")
    r = httpx.post(server.url + "/v2/apps", json={"id": app_id, "cmd": "sleep 1000", **field}, timeout=30)
    assert r.status_code == 422, r.text
    assert [d["path"] for d in r.json()["details"]] == [path]
    assert httpx.get(server.url + "/v2/apps" + app_id, timeout=30).status_code == 404
    assert_no_traceback(server)


def test_dns_response_packets_are_dropped_with_one_log_line(server: ServerProcess) -> None:
    question = dns.message.make_query("nosuch.service.consul", "A")
    response = dns.message.make_response(question)
    assert response.flags & dns.flags.QR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        for _ in range(50):
            udp.sendto(response.to_wire(), ("127.0.0.1", server.dns_port))
        # Datagrams are handled in arrival order: the first reply is the question's, so the 50 got none.
        udp.sendto(question.to_wire(), ("127.0.0.1", server.dns_port))
        reply = dns.message.from_wire(udp.recv(4096))
    assert reply.id == question.id and reply.flags & dns.flags.QR
    with socket.create_connection(("127.0.0.1", server.dns_port), timeout=10) as tcp:
        wire = response.to_wire()
        tcp.sendall(struct.pack("!H", len(wire)) + wire)
        assert tcp.recv(4096) == b""  # dropped: the server closes the stream without a reply
    log = server.log_tail(200_000)
    assert "Traceback" not in log and "DNS query failed" not in log
    assert log.count("DNS: dropped") == 1, log[-3000:]
    assert "a response (QR bit set), not a query" in log
