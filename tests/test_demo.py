"""`make demo`'s script: `shipyard up` of the example reaches all healthy, works, and `down` cleans up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_example_and_stops_it() -> None:
    cmd = [
        sys.executable, str(ROOT / "examples" / "demo.py"), "--exit-when-healthy",
        "--http-port", str(free_port()), "--dns-port", str(free_port()),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "all services healthy" in out
    assert "GET hello/demo -> {'hello': 'demo'" in out
    assert "stopped the shipyard server" in out
    assert not (ROOT / "examples" / "hello" / ".shipyard" / "server.pid").exists()
