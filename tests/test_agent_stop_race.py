"""No process outlives its record: Marathon apps created and force-deleted at once leave nothing running.

A stop that raced a start used to cancel the start after the shim was forked but before its instance was known,
leaving instances the API no longer showed and that survived the server's SIGTERM (issue 18).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import ServerProcess

ROUNDS = 50
INSTANCES = 3
SETTLE = 60.0  # the stops the deletes caused run their drain and stop_grace; 50 apps' worth on 2 cores


def marked_pids(marker: str) -> list[int]:
    """Processes whose command line carries `marker`: each instance's shell (its $0), which stays (the `; exit`
    keeps it from exec'ing sleep) and whose group the instance's stop ends."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # --dev: on SIGTERM the server stops every instance it knows of, so whatever is left is an orphan.
    proc = ServerProcess(tmp_path / "data", "--no-gateway", dev=True).start()
    yield proc
    proc.stop()


def test_create_and_force_delete_at_once_leaves_no_process(dev_server: ServerProcess) -> None:
    marker = f"orphan-marker-{uuid.uuid4().hex[:12]}"
    http = requests.Session()
    try:
        for i in range(ROUNDS):
            app = {"id": f"/race{i}", "args": ["/bin/sh", "-c", "sleep 3600; exit 0", marker],
                   "instances": INSTANCES, "cpus": 0.01, "mem": 16, "taskKillGracePeriodSeconds": 1}
            created = http.post(dev_server.url + "/v2/apps", json=app, timeout=30)
            assert created.status_code == 201, created.text
            # The delete lands at a different point of the start each round: before the scheduler placed the
            # instances, while the agent forks their shims, or once they run.
            time.sleep((i % 10) * 0.1)
            deleted = http.delete(dev_server.url + f"/v2/apps/race{i}?force=true", timeout=30)
            assert deleted.status_code == 200, deleted.text
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            tasks = http.get(dev_server.url + "/v2/tasks", timeout=30).json()["tasks"]
            if not tasks and not marked_pids(marker):
                break
            time.sleep(0.5)
        assert http.get(dev_server.url + "/v2/apps", timeout=30).json()["apps"] == []
        assert http.get(dev_server.url + "/v2/tasks", timeout=30).json()["tasks"] == []
        assert marked_pids(marker) == [], "instances outlived the records of their apps"
        dev_server.stop()
        assert dev_server.proc is not None and dev_server.proc.returncode is not None
        assert marked_pids(marker) == [], "instances survived the server's SIGTERM"
    finally:
        for pid in marked_pids(marker):  # a failed run must not leave its sleeps behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
