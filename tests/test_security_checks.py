"""Health checks as an attacker uses them against a real server: to run a command (script and COMMAND checks without
--enable-script-checks) or to read an internal URL back (HTTP check output, redirects to another host).

Every path that runs a command asks one switch; an HTTP check records a status line, not the body, and stays on
its host.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support import ServerProcess, free_port

SECRET = b"TOPSECRET-internal-metadata"


def wait_until(what: str, probe: Callable[[], Any], deadline: float = 60.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if value := probe():
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


class Internal:
    """An internal HTTP service: /secret answers SECRET, /hop redirects to `redirect_to`, /old to /secret."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits: list[str] = []
        self.redirect_to = ""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits.append(self.path)
                if self.path in ("/hop", "/old"):
                    self.send_response(302)
                    self.send_header("Location", owner.redirect_to if self.path == "/hop" else "/secret")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(SECRET)))
                self.end_headers()
                self.wfile.write(SECRET)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("checks") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


@pytest.fixture
def internal() -> Iterator[Internal]:
    svc = Internal()
    yield svc
    svc.stop()


def register_http_check(srv: ServerProcess, name: str, url: str) -> None:
    r = requests.put(f"{srv.url}/v1/agent/check/register", json={"Name": name, "HTTP": url, "Interval": "1s"},
                     timeout=10)
    assert r.status_code == 200, r.text


def check_output(srv: ServerProcess, check_id: str, containing: str) -> str:
    def probe() -> str | None:
        check = requests.get(f"{srv.url}/v1/agent/checks", timeout=10).json().get(check_id)
        return check["Output"] if check and containing in check["Output"] else None

    return wait_until(f"{check_id} output with {containing!r}", probe)


# ---- commands: one switch -------------------------------------------------------------------------------


def test_marathon_command_health_check_is_refused_without_the_switch(srv: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    app = {"id": "/cmdcheck", "cmd": "sleep 60", "instances": 1, "cpus": 0.01, "mem": 16,
           "healthChecks": [{"protocol": "COMMAND", "command": {"value": f"touch {marker}"}}]}
    r = requests.post(f"{srv.url}/v2/apps", json=app, timeout=10)
    assert r.status_code == 403, r.text
    assert "--enable-script-checks" in r.json()["message"]
    assert requests.get(f"{srv.url}/v2/apps/cmdcheck", timeout=10).status_code == 404


def test_native_job_command_health_check_is_refused_without_the_switch(srv: ServerProcess, tmp_path: Path) -> None:
    spec = {"name": "cmdjob", "cmd": "sleep 60", "health": {"command": f"touch {tmp_path / 'ran'}"}}
    r = requests.post(f"{srv.url}/api/v1/jobs", json=spec, timeout=10)
    assert r.status_code == 403, r.text
    assert requests.get(f"{srv.url}/api/v1/jobs/cmdjob", timeout=10).status_code == 404


def test_consul_script_check_is_refused_without_the_switch(srv: ServerProcess, tmp_path: Path) -> None:
    r = requests.put(f"{srv.url}/v1/agent/check/register",
                     json={"Name": "s", "Args": ["touch", str(tmp_path / "ran")], "Interval": "1s"}, timeout=10)
    assert r.status_code == 500 and "enable_script_checks" in r.text
    assert "s" not in requests.get(f"{srv.url}/v1/agent/checks", timeout=10).json()


def test_a_stored_command_check_does_not_run_once_the_switch_is_off(tmp_path: Path) -> None:
    """A spec accepted while the switch was on (or written by any other path) is asked again before it runs."""
    data_dir, marker = tmp_path / "data", tmp_path / "marker"
    first = ServerProcess(data_dir, "--no-gateway", "--enable-script-checks").start()
    try:
        spec = {"name": "probe", "cmd": "sleep 600", "resources": {"cpu": 10, "memory": 16},
                "health": {"command": f"rm -f {marker}", "interval": "1s"}}
        assert requests.post(f"{first.url}/api/v1/jobs", json=spec, timeout=10).status_code == 201
        wait_until("the command check passing", lambda: any(
            c["Status"] == "passing" for c in requests.get(f"{first.url}/v1/health/checks/probe", timeout=10).json()))
    finally:
        first.stop(keep_instances=True)
    marker.touch()
    second = ServerProcess(data_dir, "--no-gateway").start()
    try:
        wait_until("the adopted instance's check saying command checks are off", lambda: any(
            "--enable-script-checks" in c["Output"]
            for c in requests.get(f"{second.url}/v1/health/checks/probe", timeout=10).json()))
        assert marker.exists(), "the health command ran although the server was started without the switch"
    finally:
        second.stop()


# ---- HTTP checks: no read-back, no redirect to another host -------------------------------------------


def test_http_check_output_does_not_read_back_the_body(srv: ServerProcess, internal: Internal) -> None:
    register_http_check(srv, "ssrf", internal.url + "/secret")
    output = check_output(srv, "ssrf", "200")
    assert output.startswith(f"HTTP GET {internal.url}/secret: 200 OK")
    assert SECRET.decode() not in output
    assert f"{len(SECRET)} bytes" in output


def test_http_check_does_not_follow_a_redirect_to_another_host(srv: ServerProcess, internal: Internal) -> None:
    other = Internal("127.0.0.2")
    try:
        internal.redirect_to = other.url + "/secret"
        register_http_check(srv, "hop", internal.url + "/hop")
        output = check_output(srv, "hop", "not followed")
        assert ": 302 Found" in output and "127.0.0.2" in output
        assert other.hits == []
        state = requests.get(f"{srv.url}/v1/agent/checks", timeout=10).json()["hop"]["Status"]
        assert state == "critical"
    finally:
        other.stop()


def test_http_check_follows_a_redirect_on_its_own_host(srv: ServerProcess, internal: Internal) -> None:
    register_http_check(srv, "samehost", internal.url + "/old")
    output = check_output(srv, "samehost", "200 OK")
    assert "/secret" in internal.hits and SECRET.decode() not in output


def test_http_check_output_records_the_body_with_the_flag(tmp_path: Path, internal: Internal) -> None:
    proc = ServerProcess(tmp_path / "data", "--no-gateway", "--http-check-output").start()
    try:
        register_http_check(proc, "consul-style", internal.url + "/secret")
        output = check_output(proc, "consul-style", "200")
        assert output == f"HTTP GET {internal.url}/secret: 200 OK Output: {SECRET.decode()}"
    finally:
        proc.stop()


def test_up_starts_its_server_with_the_switch_for_a_project_with_command_checks(tmp_path: Path) -> None:
    """The operator's own project asks for command checks: the server `shipyard up` starts for it allows them."""
    marker = tmp_path / "checked"
    (tmp_path / "shipyard.yaml").write_text(
        "services:\n  db:\n    cmd: sleep 600\n"
        f"    health: {{command: touch {marker}, interval: 1s}}\n"
        "    resources: {cpu: 10, memory: 16}\n")
    port = free_port()
    cli = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", f"127.0.0.1:{port}"]
    try:
        up = subprocess.run([*cli, "up", str(tmp_path), "--gateway-port", "0", "--dns-port", "0", "--timeout", "60"],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        assert marker.exists()
    finally:
        subprocess.run([*cli, "down", str(tmp_path)], capture_output=True, text=True, timeout=120)
