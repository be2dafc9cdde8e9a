"""`make demo`'s script runs to "all services healthy" on free ports, and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_reaches_all_healthy_and_stops(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(ROOT / "examples" / "demo.py"), "--exit-when-healthy",
        "--data-dir", str(tmp_path / "data"), "--http-port", str(free_port()), "--dns-port", str(free_port()),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all services healthy" in done.stdout
    assert "dig @127.0.0.1" in done.stdout
