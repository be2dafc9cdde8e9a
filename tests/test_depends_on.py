"""depends_on against a real `shipyard server`: a dependent waits (visibly, with the reason) until its dependency
is healthy, then starts; a dependency going down later neither stops nor blocks the running dependent.

The dependency's health check is a command that passes once the test creates a file, so nothing depends on timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import ServerProcess


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server that runs command checks (the dependency's health check is one)."""
    proc = ServerProcess(tmp_path / "data", "--enable-script-checks").start()
    yield proc
    proc.stop()


def project(tmp: Path, ready: Path) -> Path:
    # The project has a directory of its own: the ready marker and the server's files next to it are not its code
    # (a file changed in a service's directory is a new version).
    tmp = tmp / "project"
    tmp.mkdir(exist_ok=True)
    (tmp / "shipyard.yaml").write_text(f"""\
services:
  db:
    cmd: sleep 600
    health: {{command: test -f {ready}, interval: 200ms, timeout: 1s, grace: 120s}}
    resources: {{cpu: 10, memory: 16}}
    stop_grace: 1s
  api:
    cmd: sleep 600
    instances: 2
    depends_on: {{db: healthy}}
    resources: {{cpu: 10, memory: 16}}
    update: {{min_healthy_time: 200ms}}
    stop_grace: 1s
""")
    return tmp


def shipyard(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    # Wide enough that rich never wraps the NOTE column of `ps`.
    env = {**os.environ, "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def job(server: ServerProcess, name: str) -> dict:
    return requests.get(f"{server.url}/api/v1/jobs/{name}", timeout=10).json()


def healthy_ids(server: ServerProcess, name: str) -> set[str]:
    return {a["id"] for a in job(server, name)["allocations"]
            if a["desired"] == "run" and (a["status"] or {}).get("client") == "healthy"}


def wait_for(what: str, check, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_dependent_waits_for_a_healthy_dependency_and_starts_only_at_start(fresh_server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    ready = tmp_path / "db-ready"
    proj = project(tmp_path, ready)

    # db never turns healthy here: `up` gives up and says what api waits for.
    up = shipyard(fresh_server, "up", str(proj), "--timeout", "3")
    assert up.returncode == 1
    assert "api: 2 instance(s) waiting for db to be healthy" in up.stderr, up.stdout + up.stderr

    detail = job(fresh_server, "api")
    assert detail["allocations"] == [] and detail["waiting"]["indexes"] == [0, 1]
    assert detail["waiting"]["reason"] == "waiting for db to be healthy"
    assert detail["deployment"]["status"] == "running"
    ps = shipyard(fresh_server, "ps")
    # One row per instance (SERVICE.INDEX first); why each waits is said below the table.
    rows = [line.split(maxsplit=1) for line in ps.stdout.splitlines() if line.strip()]
    waiting_rows = [rest for first, rest in rows if first in ("api.0", "api.1")]
    assert len(waiting_rows) == 2, ps.stdout
    assert all(rest.split()[1] == "waiting" for rest in waiting_rows), ps.stdout
    assert ps.stdout.count(": waiting for db to be healthy") == 2, ps.stdout
    assert any(first == "db.0" and "running" in rest for first, rest in rows), ps.stdout

    ready.touch()
    up = shipyard(fresh_server, "up", str(proj))
    assert up.returncode == 0 and "all services healthy" in up.stdout, up.stdout + up.stderr
    assert job(fresh_server, "api")["waiting"] is None
    running = healthy_ids(fresh_server, "api")
    assert len(running) == 2

    # The dependency goes down: the dependent keeps running ...
    assert shipyard(fresh_server, "stop", "db").returncode == 0
    wait_for("db stopped", lambda: not job(fresh_server, "db")["allocations"])
    assert healthy_ids(fresh_server, "api") == running
    # ... and a rolling restart of it completes without db: ordering holds at start only.
    assert shipyard(fresh_server, "restart", "api").returncode == 0
    wait_for("api replaced while db is down",
             lambda: len(ids := healthy_ids(fresh_server, "api")) == 2 and not ids & running
             and not job(fresh_server, "api")["deployment"]["active"])
    assert job(fresh_server, "api")["waiting"] is None and not job(fresh_server, "db")["allocations"]
