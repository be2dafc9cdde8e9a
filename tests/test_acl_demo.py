"""`make demo` with --acl: the mediahub example comes up healthy under default deny, every service on its own scoped
token (auth also with the project's acl/auth.hcl, for the gateway admin API), and the walk-through still works
through the gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_with_acls_default_deny(tmp_path: Path) -> None:
    project = tmp_path / "mediahub"
    shutil.copytree(ROOT / "examples" / "mediahub", project,
                    ignore=shutil.ignore_patterns(".data", ".shipyard", "__pycache__"))
    http_port = free_port()
    cmd = [
        sys.executable, str(ROOT / "examples" / "demo.py"), "--exit-when-healthy", "--project", str(project), "--acl",
        "--http-port", str(http_port), "--dns-port", str(free_port()), "--gateway-port", str(free_port()),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("SHIPYARD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "ACL management token (shown once" in out
    for service in ("auth", "files", "transcode"):  # the project's acl/<service>.hcl
        assert f"ACL policy service-{service}: created from" in out
    assert "all services healthy (6 jobs)" in out
    assert "without a token -> 401" in out  # the gateway routes: its workers read the store with their token
    assert "export SHIPYARD_HTTP_TOKEN=$(cat" in out
    assert (project / ".shipyard" / "data" / "acl-management-token").stat().st_mode & 0o777 == 0o600
    assert "stopped the shipyard server" in out
