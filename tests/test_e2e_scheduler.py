"""The scheduler, the node agent and the registry together, as a team would use them.

Real server, real instances, real clients that find instances through the Consul API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import consul
import requests

from support import ServerProcess, free_port

APP = Path(__file__).parent / "apps" / "versioned_http.py"


def project(tmp: Path, *, version: str, instances: int = 3, unhealthy: bool = False,
            auto_revert: bool = False, deadline: str = "60s") -> Path:
    env = f"      VERSION: '{version}'\n" + ("      UNHEALTHY: '1'\n" if unhealthy else "")
    revert = str(auto_revert).lower()
    (tmp / "shipyard.yaml").write_text(f"""\
services:
  web:
    cmd: {sys.executable} {APP}
    instances: {instances}
    ports: [http]
    env:
{env}    health: {{http: /health, interval: 1s, timeout: 1s, grace: 30s}}
    resources: {{cpu: 10, memory: 64}}
    update: {{max_parallel: 1, min_healthy_time: 1s, healthy_deadline: {deadline}, auto_revert: {revert}}}
    stop_grace: 3s
""")
    return tmp


def shipyard(addr: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_DNS_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def wait_for(predicate, timeout: float = 90, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s")


class RegistryClient:
    """Sends GETs round-robin to the passing instances of a service, kept current by blocking queries."""

    def __init__(self, port: int, service: str) -> None:
        self.consul = consul.Consul(host="127.0.0.1", port=port)
        self.service = service
        self.targets: list[str] = []
        self.ok = 0
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, daemon=True),
                         threading.Thread(target=self._load, daemon=True)]

    def _watch(self) -> None:
        index = None
        while not self._stop.is_set():
            index, entries = self.consul.health.service(self.service, passing=True, index=index, wait="1s")
            self.targets = [f"http://{e['Service']['Address']}:{e['Service']['Port']}/" for e in entries]

    def _load(self) -> None:
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            targets = self.targets
            if not targets:
                time.sleep(0.01)
                continue
            url = targets[n % len(targets)]
            n += 1
            try:
                r = session.get(url, timeout=5)
                if r.status_code == 200:
                    self.ok += 1
                    version = r.text.split()[0]
                    self.versions[version] = self.versions.get(version, 0) + 1
                else:
                    self.failures.append(f"{url}: {r.status_code}")
            except requests.RequestException as exc:
                self.failures.append(f"{url}: {exc}")
            time.sleep(0.005)

    def __enter__(self) -> RegistryClient:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def job(server: ServerProcess, name: str = "web") -> dict:
    return requests.get(f"{server.url}/api/v1/jobs/{name}", timeout=10).json()


def serving(server: ServerProcess, version: str) -> bool:
    detail = job(server)
    deployment = detail.get("deployment") or {}
    healthy = detail["instances"]["healthy"] == detail["instances"]["desired"]
    return healthy and not deployment.get("active") and detail["job"]["spec"]["env"].get("VERSION") == version


def test_up_ps_logs_scale_and_down(tmp_path: Path) -> None:
    proj = project(tmp_path, version="1", instances=2)
    addr = f"127.0.0.1:{free_port()}"
    done = shipyard(addr, "up", str(proj))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started shipyard server" in done.stdout and "all services healthy" in done.stdout
    try:
        ps = shipyard(addr, "ps")
        assert ps.stdout.count("healthy") == 2, ps.stdout
        requests.get(f"http://{addr}/v1/status/leader", timeout=5)
        entries = requests.get(f"http://{addr}/v1/health/service/web?passing", timeout=5).json()
        for e in entries:
            assert requests.get(f"http://127.0.0.1:{e['Service']['Port']}/", timeout=5).text.startswith("1 ")
        logs = shipyard(addr, "logs", "web", "--instance", "0", "--stderr")
        assert "GET /health" in logs.stdout
        out = shipyard(addr, "logs", "web", "--instance", "0")
        assert "version 1 listening" in out.stdout
        assert shipyard(addr, "scale", "web", "3").returncode == 0
        wait_for(lambda: len(requests.get(f"http://{addr}/v1/health/service/web?passing").json()) == 3,
                 what="3 passing instances")
        bad = shipyard(addr, "scale", "nope", "1")
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    finally:
        down = shipyard(addr, "down", str(proj))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the shipyard server" in down.stdout
    pid = int((proj / ".shipyard" / "server.pid").read_text()) if (proj / ".shipyard" / "server.pid").exists() else 0
    assert pid == 0


def test_up_reports_spec_errors_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "shipyard.yaml").write_text("services:\n  web:\n    cmd: x\n    instances: three\n")
    done = shipyard(f"127.0.0.1:{free_port()}", "up", str(tmp_path))
    assert done.returncode == 1
    assert "shipyard.yaml:4: services.web.instances" in done.stderr
    assert "Traceback" not in done.stderr


def test_rolling_update_under_load_fails_no_request(fresh_server: ServerProcess, tmp_path: Path) -> None:
    addr = fresh_server.addr
    assert shipyard(addr, "deploy", str(project(tmp_path, version="1"))).returncode == 0
    with RegistryClient(fresh_server.http_port, "web") as client:
        wait_for(lambda: client.ok > 50, what="traffic flowing")
        update = shipyard(addr, "deploy", str(project(tmp_path, version="2")))
        assert update.returncode == 0, update.stdout + update.stderr
        wait_for(lambda: serving(fresh_server, "2"), what="version 2 everywhere")
        seen_v2 = client.versions.get("2", 0)
        wait_for(lambda: client.versions.get("2", 0) > seen_v2 + 50, what="traffic on version 2")
    assert client.failures == [], client.failures[:5]
    assert client.versions.get("1", 0) > 0 and client.versions.get("2", 0) > 0


def test_failing_version_is_reverted_while_the_old_one_serves(fresh_server: ServerProcess, tmp_path: Path) -> None:
    addr = fresh_server.addr
    assert shipyard(addr, "deploy", str(project(tmp_path, version="1", instances=2))).returncode == 0
    with RegistryClient(fresh_server.http_port, "web") as client:
        wait_for(lambda: client.ok > 50, what="traffic flowing")
        bad = project(tmp_path, version="2", instances=2, unhealthy=True, auto_revert=True, deadline="6s")
        shipyard(addr, "deploy", "--detach", str(bad))
        wait_for(lambda: job(fresh_server)["job"]["version"] >= 3, what="the automatic revert")
        wait_for(lambda: serving(fresh_server, "1"), what="version 1 restored")
        ok_after_revert = client.ok
        wait_for(lambda: client.ok > ok_after_revert + 50, what="traffic after the revert")
    assert client.failures == [], client.failures[:5]
    assert set(client.versions) == {"1"}  # the failing version never received traffic
    versions = requests.get(f"{fresh_server.url}/api/v1/jobs/web/versions").json()["versions"]
    assert [v["spec"]["env"]["VERSION"] for v in versions] == ["1", "2", "1"]
