"""`shipyard tls ca create` and `shipyard tls cert create`: Consul's file names, keys 0600, certificates that
Debian's openssl verifies against the CA, with the names and usages asked for; bad input is one line."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from support import need_binary
from tls_support import make_pki, shipyard


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _text(openssl: str, cert: Path) -> str:
    return subprocess.run([openssl, "x509", "-in", str(cert), "-noout", "-text"], capture_output=True, text=True,
                          check=True).stdout


def test_ca_and_certificates_verify_with_openssl(tmp_path: Path) -> None:
    openssl = need_binary("openssl")
    pki = make_pki(tmp_path)
    shipyard("tls", "cert", "create", "--client", "--ip", "10.1.2.3", "--days", "30", cwd=tmp_path)
    client = tmp_path / "dc1-client-consul-0.pem"
    for cert in (pki.server_cert, pki.cli_cert, client):
        out = subprocess.run([openssl, "verify", "-CAfile", str(pki.ca), str(cert)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stdout + out.stderr
    server_text = _text(openssl, pki.server_cert)
    assert "DNS:server.dc1.consul" in server_text and "DNS:localhost" in server_text
    assert "DNS:app.example.test" in server_text and "IP Address:127.0.0.1" in server_text
    assert "TLS Web Server Authentication" in server_text and "TLS Web Client Authentication" in server_text
    assert "IP Address:10.1.2.3" in _text(openssl, client)
    cli_text = _text(openssl, pki.cli_cert)
    assert "TLS Web Client Authentication" in cli_text and "TLS Web Server Authentication" not in cli_text
    assert "CA:TRUE" in _text(openssl, pki.ca)


def test_keys_are_0600_and_certificates_are_numbered_not_overwritten(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    for key in (tmp_path / "consul-agent-ca-key.pem", pki.server_key, pki.cli_key):
        assert _mode(key) == 0o600, key
    assert _mode(pki.ca) == 0o644
    first = pki.server_cert.read_bytes()
    out = shipyard("tls", "cert", "create", "--server", cwd=tmp_path)
    assert "dc1-server-consul-1.pem" in out.stdout
    assert pki.server_cert.read_bytes() == first
    assert _mode(tmp_path / "dc1-server-consul-1-key.pem") == 0o600


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    make_pki(tmp_path)
    again = shipyard("tls", "ca", "create", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ca = shipyard("tls", "cert", "create", "--server", cwd=empty, check=False)
    assert no_ca.returncode == 1 and "tls ca create" in no_ca.stderr
    no_kind = shipyard("tls", "cert", "create", cwd=tmp_path, check=False)
    assert no_kind.returncode == 1 and "--server, --client or --cli" in no_kind.stderr
    bad_ip = shipyard("tls", "cert", "create", "--server", "--ip", "not-an-ip", cwd=tmp_path, check=False)
    assert bad_ip.returncode == 1 and "not an IP address" in bad_ip.stderr
    assert len(bad_ip.stderr.strip().splitlines()) == 1
