"""`shipyard ps` with a job record the scheduler cannot decode: a row saying so and how out, within 100 columns.

Runs the real CLI against a real server; the broken record is written through the server's store API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import requests

from shipyard.scheduler.records import job_key
from support import ServerProcess
from test_scheduler_unreadable import BROKEN


def _ps(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shipyard.cli.main", "ps", "--http-addr", server.addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})


def _break_job(server: ServerProcess, job_id: str) -> None:
    stored = requests.put(f"{server.url}/api/v1/store/kv/{job_key(job_id)}", data=BROKEN, timeout=10,
                          headers={"Content-Type": "application/octet-stream"})
    assert stored.status_code == 200, stored.text


def test_ps_shows_an_unreadable_job_as_a_row_with_the_way_out(fresh_server: ServerProcess) -> None:
    _break_job(fresh_server, "web")
    out = _ps(fresh_server)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), out.stdout
    [row] = [line for line in lines if "UNREADABLE" in line]
    assert row.split()[0] == "web" and "record cannot be read" in row
    notes = " ".join(" ".join(lines[lines.index(row) + 1:]).split())  # the note, unwrapped
    assert "web: record cannot be read (ValueError" in notes
    assert f"curl -X DELETE {fresh_server.url}/api/v1/jobs/web" in notes and "deploy again" in notes


def test_ps_json_lists_unreadable_jobs(fresh_server: ServerProcess) -> None:
    _break_job(fresh_server, "web")
    out = _ps(fresh_server, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    [entry] = data["unreadable"]
    assert entry["id"] == "web" and entry["key"] == job_key("web") and "ValueError" in entry["error"]
    assert data["allocations"] == []


def test_ps_of_an_unreadable_job_is_the_servers_409_in_one_line(fresh_server: ServerProcess) -> None:
    _break_job(fresh_server, "web")
    out = _ps(fresh_server, "web")
    assert out.returncode == 1
    assert out.stdout == ""
    [line] = out.stderr.splitlines()
    assert "(409)" in line and "job 'web': its record cannot be read (ValueError" in line, line
    assert "Traceback" not in out.stderr


def test_down_stops_the_instances_of_an_unreadable_job(fresh_server: ServerProcess) -> None:
    deployed = requests.post(f"{fresh_server.url}/api/v1/jobs", data="services:\n  web:\n    cmd: sleep 300\n",
                             headers={"Content-Type": "application/yaml"}, timeout=10)
    assert deployed.status_code in (200, 201), deployed.text
    deadline = time.monotonic() + 60
    while not requests.get(f"{fresh_server.url}/api/v1/allocs", timeout=10).json()["allocations"]:
        assert time.monotonic() < deadline, "web never got an instance"
        time.sleep(0.2)
    _break_job(fresh_server, "web")
    cmd = [sys.executable, "-m", "shipyard.cli.main", "down", "--http-addr", fresh_server.addr, "--timeout", "60"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert requests.get(f"{fresh_server.url}/api/v1/allocs", timeout=10).json()["allocations"] == []
