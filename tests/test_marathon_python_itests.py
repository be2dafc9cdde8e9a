"""marathon-python's own integration scenarios (its behave features) against a real `shipyard server`.

The scenarios come from tests/vendor/marathon_python_itests (marathon-python's itests/, unmodified; see
VENDORED.md), or from MARATHON_PYTHON_ITESTS when set to a checkout's itests/. Only their itest_utils.py, which
hard-codes a Marathon in Docker, is replaced. Their cleanup force-deletes every app as soon as a scenario ends,
which used to leave orphaned instances (issue 18), so the test also counts the server's instance processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ServerProcess

VENDORED = Path(__file__).parent / "vendor" / "marathon_python_itests"
# Marathon runs this one (a Docker container with uris); Shipyard refuses both fields with a 422 that says why.
REFUSED_BY_DESIGN = {"Complex apps can be deployed"}

ITEST_UTILS = '''"""Stand-in for marathon-python's itests/itest_utils.py: the scenarios use the server under test."""
import collections
import collections.abc
import os
import time

import requests

collections.Iterable = collections.abc.Iterable  # marathon-python 0.13 still uses it (gone in Python 3.10)


def get_marathon_connection_string():
    return os.environ["SHIPYARD_MARATHON_ADDR"]


def wait_for_marathon():
    deadline = time.monotonic() + 30
    while requests.get("http://%s/ping" % get_marathon_connection_string(), timeout=2).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("marathon did not answer /ping")
        time.sleep(0.2)
'''


def scenarios_dir() -> Path:
    chosen = os.environ.get("MARATHON_PYTHON_ITESTS")
    return Path(chosen) if chosen else VENDORED


def instance_pids(addr: str) -> list[int]:
    """Instance processes of the server at `addr`: each gets SHIPYARD_ALLOC_ID and SHIPYARD_HTTP_ADDR=addr."""
    found = []
    marker = f"SHIPYARD_HTTP_ADDR={addr}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        alive = stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")
        if alive and marker in environ and any(v.startswith(b"SHIPYARD_ALLOC_ID=") for v in environ):
            found.append(int(entry))
    return found


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # --dev: the server stops every instance it knows of on SIGTERM, so any left afterwards is an orphan.
    proc = ServerProcess(tmp_path / "data", "--no-gateway", dev=True).start()
    yield proc
    proc.stop()


def test_marathon_python_scenarios_pass(dev_server: ServerProcess, tmp_path: Path) -> None:
    source = scenarios_dir()
    assert (source / "steps" / "marathon_steps.py").is_file(), f"no marathon-python itests at {source}"
    work = tmp_path / "itests"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("itest_utils.py", "docker", "*.sh", "*.md"))
    (work / "itest_utils.py").write_text(ITEST_UTILS)
    results = tmp_path / "results.json"
    env = {**os.environ, "SHIPYARD_MARATHON_ADDR": dev_server.addr, "PYTHONWARNINGS": "ignore"}
    try:
        run = subprocess.run([sys.executable, "-m", "behave", "--no-capture", "--format", "json", "--outfile",
                              str(results), "--format", "plain"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=900)
        outcome = {s["name"]: s for f in json.loads(results.read_text()) for s in f.get("elements", [])
                   if s.get("type") == "scenario"}
        assert len(outcome) == 8, run.stdout[-3000:] + run.stderr[-3000:]
        failed = {name for name, s in outcome.items() if s["status"] != "passed"}
        assert failed == REFUSED_BY_DESIGN, run.stdout[-6000:]
        # The plain formatter prints the step's exception: marathon-python's MarathonHttpError for our 422.
        refusal = run.stdout + run.stderr
        assert "HTTP 422" in refusal and "not supported by Shipyard: container, uris" in refusal, refusal[-3000:]
        # Their after_scenario hook force-deleted every app at once: once the stops it caused have run (drain,
        # stop grace), nothing of them may still run.
        deadline = time.monotonic() + 60
        while instance_pids(dev_server.addr) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert instance_pids(dev_server.addr) == []
        dev_server.stop()
        assert instance_pids(dev_server.addr) == []
    finally:
        for pid in instance_pids(dev_server.addr):
            os.kill(pid, 9)
