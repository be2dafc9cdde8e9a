"""`make demo` with --tls: the mediahub example comes up healthy with HTTPS on the control API and TLS on the
gateway (a CA made for the run), the gateway's jwt plugin answers over TLS, and the walk-through names https."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("acl", [False, True], ids=["tls", "tls-and-acl"])
def test_demo_with_tls_on_the_control_api_and_the_gateway(tmp_path: Path, acl: bool) -> None:
    """With acl: the issue's whole demo, ACLs on with default deny and every service on its scoped token."""
    project = tmp_path / "mediahub"
    shutil.copytree(ROOT / "examples" / "mediahub", project,
                    ignore=shutil.ignore_patterns(".data", ".shipyard", "__pycache__"))
    https_port, tls_port = free_port(), free_port()
    cmd = [
        sys.executable, str(ROOT / "examples" / "demo.py"), "--exit-when-healthy", "--project", str(project), "--tls",
        "--http-port", str(free_port()), "--dns-port", str(free_port()), "--gateway-port", str(free_port()),
        "--https-port", str(https_port), "--gateway-tls-port", str(tls_port), *(["--acl"] if acl else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "all services healthy (6 jobs)" in out
    assert f"GET https://127.0.0.1:{https_port}/v1/status/leader with the demo CA -> 200" in out
    gateway = f"https://localhost:{tls_port}"
    assert f"GET {gateway}/assets without a token -> 401" in out
    assert f"GW={gateway}" in out and "export CURL_CA_BUNDLE=" in out
    assert "stopped the shipyard server" in out
    assert (project / ".shipyard" / "tls" / "consul-agent-ca.pem").is_file()
