"""A gateway worker whose server is gone exits by itself, also when the server died while the worker was still
starting (before it asked the kernel for a death signal, and before it had a route table): it must never stay
behind, waiting forever on a dead control API and holding nothing but a process slot."""

from __future__ import annotations

import subprocess
import sys

from support import free_port


def test_worker_started_for_a_server_already_gone_exits() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is not this worker's parent (and no longer anyone's)
    worker = subprocess.run(
        [sys.executable, "-m", "shipyard.gateway.worker", "--control", f"http://127.0.0.1:{free_port()}",
         "--port", str(free_port()), "--parent-pid", str(gone.pid)],
        capture_output=True, text=True, timeout=30,
    )
    assert worker.returncode == 0, worker.stderr
    assert f"its server (pid {gone.pid}) is gone; exiting" in worker.stderr
