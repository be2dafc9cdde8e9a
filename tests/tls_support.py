"""Helpers for the TLS tests: a CA and certificates made by the real `shipyard tls` commands, and a server started
with them (its plain HTTP port stays on loopback, which is what ServerProcess waits on).

Nothing here reaches inside a server: certificates are files, servers are processes.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support import ServerProcess, free_port


def shipyard(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "shipyard.cli.main", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@dataclass
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "consul-agent-ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "dc1-server-consul-0.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "dc1-server-consul-0-key.pem"

    @property
    def cli_cert(self) -> Path:
        return self.folder / "dc1-cli-consul-0.pem"

    @property
    def cli_key(self) -> Path:
        return self.folder / "dc1-cli-consul-0-key.pem"


def make_pki(folder: Path) -> Pki:
    """consul-agent-ca.pem, a server certificate (also for app.example.test) and a CLI one, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    shipyard("tls", "ca", "create", cwd=folder)
    shipyard("tls", "cert", "create", "--server", "--dns", "app.example.test", cwd=folder)
    shipyard("tls", "cert", "create", "--cli", cwd=folder)
    return Pki(folder)


def tls_server(data_dir: Path, pki: Pki, *extra: str) -> ServerProcess:
    https_port = free_port()
    server = ServerProcess(data_dir, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                           "--tls-ca", str(pki.ca), "--https-port", str(https_port), *extra)
    server.https_port = https_port  # type: ignore[attr-defined]
    return server
