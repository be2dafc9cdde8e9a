"""`make demo`'s script: `shipyard up` of the mediahub example reaches all healthy, its gateway answers, the
walk-through is printed with this run's addresses, and `down` cleans up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_example_and_stops_it(tmp_path: Path) -> None:
    # A copy of the example: a developer's own `make demo` keeps its state in the source tree.
    project = tmp_path / "mediahub"
    shutil.copytree(ROOT / "examples" / "mediahub", project,
                    ignore=shutil.ignore_patterns(".data", ".shipyard", "__pycache__"))
    gateway_port = free_port()
    cmd = [
        sys.executable, str(ROOT / "examples" / "demo.py"), "--exit-when-healthy", "--project", str(project),
        "--http-port", str(free_port()), "--dns-port", str(free_port()), "--gateway-port", str(gateway_port),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "all services healthy (6 jobs)" in out
    gateway = f"http://127.0.0.1:{gateway_port}"
    assert f"GET {gateway}/assets without a token -> 401" in out
    assert f"{gateway}/docs" in out
    assert f"GW={gateway}" in out and "curl -s -X POST $GW/auth/signup" in out
    assert "stopped 6 service(s)" in out and "stopped the shipyard server" in out
    assert not (project / ".shipyard" / "server.pid").exists()
