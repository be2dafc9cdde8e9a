"""The health checker run by the server: HTTP, TCP, TTL and script checks against real listeners.

Each test starts the peer it probes (a tiny HTTP server or TCP listener on a free port) and stops it
to see the check go critical; statuses are read back through py-consul.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
import requests

from support import ServerProcess


def wait_until(what: str, probe: Callable[[], Any], deadline: float = 30.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def check_of(client: consul.Consul, check_id: str) -> dict[str, Any] | None:
    return client.agent.checks().get(check_id)


def wait_status(client: consul.Consul, check_id: str, status: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        check = check_of(client, check_id)
        return check if check is not None and check["Status"] == status else None

    return wait_until(f"check {check_id} to be {status}", probe)


class Probed:
    """A tiny HTTP server whose answer the test sets, and which remembers the requests it saw."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"healthy"
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen: dict[str, list[str]] = {}
                for k, v in self.headers.items():
                    seen.setdefault(k.lower(), []).append(v)
                owner.requests.append((self.command, seen))
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def probed() -> Iterator[Probed]:
    p = Probed()
    yield p
    p.stop()


def test_http_check_passing_then_critical_when_server_stops(client: consul.Consul, probed: Probed) -> None:
    client.agent.service.register("http-svc", port=probed.port, check=consul.Check.http(probed.url, "1s"))
    check = wait_status(client, "service:http-svc", "passing")
    # The body is not read back without --http-check-output (test_security_checks covers both).
    assert "200 OK" in check["Output"] and "healthy" not in check["Output"]
    assert check["Type"] == "http" and check["Definition"]["HTTP"] == probed.url
    assert len(client.health.service("http-svc", passing=True)[1]) == 1

    probed.stop()
    wait_status(client, "service:http-svc", "critical")
    assert client.health.service("http-svc", passing=True)[1] == []
    client.agent.service.deregister("http-svc")


def test_http_check_statuses_method_and_headers(client: consul.Consul, probed: Probed) -> None:
    probed.status = 429
    check = {"HTTP": probed.url, "Interval": "1s", "Method": "POST", "Header": {"X-Probe": ["a", "b"]}}
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "http-codes", "Check": check})
    assert r.status_code == 200, r.text
    wait_status(client, "service:http-codes", "warning")
    method, headers = probed.requests[-1]
    assert method == "POST"
    assert headers["x-probe"] == ["a", "b"]
    assert headers["user-agent"] == ["Consul Health Check"]
    probed.status = 503
    wait_status(client, "service:http-codes", "critical")
    probed.status = 204
    probed.body = b""
    wait_status(client, "service:http-codes", "passing")
    client.agent.service.deregister("http-codes")


def test_status_is_written_only_when_it_changes(client: consul.Consul, probed: Probed) -> None:
    client.agent.service.register("quiet", check=consul.Check.http(probed.url, "1s"))
    wait_status(client, "service:quiet", "passing")
    seen = len(probed.requests)
    index, _ = client.health.checks("quiet")
    # Several probes run during this wait; none of them changes the status, so none is written.
    later, checks = client.health.checks("quiet", index=index, wait="3s")
    assert later == index
    assert checks[0]["Status"] == "passing"
    assert len(probed.requests) > seen
    client.agent.service.deregister("quiet")


def test_tcp_check_passing_then_critical(client: consul.Consul) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        client.agent.service.register("tcp-svc", port=port, check=consul.Check.tcp("127.0.0.1", port, "1s"))
        check = wait_status(client, "service:tcp-svc", "passing")
        assert "Success" in check["Output"]
    finally:
        listener.close()
    wait_status(client, "service:tcp-svc", "critical")
    client.agent.service.deregister("tcp-svc")


def test_interval_below_minimum_is_raised_not_refused(client: consul.Consul, probed: Probed) -> None:
    check = {"HTTP": probed.url, "Interval": "10ms"}
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "fast", "Check": check})
    assert r.status_code == 200
    wait_status(client, "service:fast", "passing")
    client.agent.service.deregister("fast")


def test_initial_status_is_honoured(client: consul.Consul) -> None:
    check = {"TTL": "60s", "Status": "passing"}
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "born-ok", "Check": check})
    assert r.status_code == 200
    assert check_of(client, "service:born-ok")["Status"] == "passing"
    client.agent.service.deregister("born-ok")


def test_deregister_critical_service_after(client: consul.Consul) -> None:
    check = {"TTL": "60s", "DeregisterCriticalServiceAfter": "1s"}
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "doomed", "Check": check})
    assert r.status_code == 200
    check = {"TTL": "60s", "DeregisterCriticalServiceAfter": "1s", "Status": "passing"}
    r = requests.put(client.http.base_uri + "/v1/agent/service/register", json={"Name": "spared", "Check": check})
    assert r.status_code == 200
    wait_until("the critical service to be deregistered", lambda: "doomed" not in client.agent.services())
    assert "service:doomed" not in client.agent.checks()
    assert client.catalog.service("doomed")[1] == []
    assert "spared" in client.agent.services()
    client.agent.service.deregister("spared")


def test_ttl_on_non_ttl_check_is_refused(client: consul.Consul, probed: Probed) -> None:
    client.agent.service.register("not-ttl", check=consul.Check.http(probed.url, "10s"))
    r = requests.put(client.http.base_uri + "/v1/agent/check/pass/service:not-ttl")
    assert r.status_code == 500
    assert r.text == 'CheckID "service:not-ttl" does not have associated TTL'
    client.agent.service.deregister("not-ttl")


def test_script_checks_refused_without_flag(client: consul.Consul, server: ServerProcess) -> None:
    with pytest.raises(consul.ConsulException, match="Scripts are disabled on this agent"):
        client.agent.service.register("scripted", check=consul.Check.script(["true"], "1s"))
    assert "scripted" not in client.agent.services()
    r = requests.put(server.url + "/v1/agent/check/register", json={"Name": "s", "Args": ["true"], "Interval": "1s"})
    assert r.status_code == 500 and "Scripts are disabled" in r.text
    assert "s" not in client.agent.checks()


def test_script_checks_run_with_flag(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--enable-script-checks").start()
    try:
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        py = sys.executable
        for name, code in (("ok", 0), ("meh", 1), ("bad", 2)):
            args = [py, "-c", f"print('script says {name}'); raise SystemExit({code})"]
            c.agent.service.register(f"script-{name}", check=consul.Check.script(args, "1s"))
        assert "script says ok" in wait_status(c, "service:script-ok", "passing")["Output"]
        wait_status(c, "service:script-meh", "warning")
        wait_status(c, "service:script-bad", "critical")
        slow = {"Args": [py, "-c", "import time; time.sleep(60)"], "Interval": "1s", "Timeout": "1s",
                "Status": "passing"}
        r = requests.put(proc.url + "/v1/agent/service/register", json={"Name": "script-slow", "Check": slow})
        assert r.status_code == 200
        assert "Timed out" in wait_status(c, "service:script-slow", "critical")["Output"]
    finally:
        proc.stop()


def test_checks_resume_after_restart(tmp_path: Path, probed: Probed) -> None:
    proc = ServerProcess(tmp_path / "data").start()
    try:
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        c.agent.service.register("durable", check=consul.Check.http(probed.url, "1s"))
        wait_status(c, "service:durable", "passing")
        proc.restart()
        c = consul.Consul(host="127.0.0.1", port=proc.http_port)
        assert "durable" in c.agent.services()
        probed.stop()
        wait_status(c, "service:durable", "critical")
    finally:
        proc.stop()
