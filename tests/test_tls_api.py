"""The control API over HTTPS: the CLI and py-consul with the CA, --verify-incoming refusing a client without a
certificate at the handshake, plain HTTP to the HTTPS port answered as Go answers it, plain HTTP kept on loopback,
the gateway workers following the store over HTTPS when plain HTTP is off, and the bind rule."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest
import requests

from support import ServerProcess, free_port, log_tail, need_binary
from tls_support import Pki, make_pki, shipyard, tls_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def verifying(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = tls_server(tmp_path_factory.mktemp("verifying") / "data", pki, "--verify-incoming", "--no-gateway")
    server.start()
    yield server
    server.stop()


def _env(pki: Pki, *, client_cert: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "SHIPYARD_"))}
    env["CONSUL_CACERT"] = str(pki.ca)
    if client_cert:
        env["CONSUL_CLIENT_CERT"], env["CONSUL_CLIENT_KEY"] = str(pki.cli_cert), str(pki.cli_key)
    return env


def _https_addr(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.https_port}"  # type: ignore[attr-defined]


def test_cli_speaks_https_with_the_ca_and_its_certificate(verifying: ServerProcess, pki: Pki) -> None:
    env = _env(pki)
    shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "put", "tls/cli", "over-https", env=env)
    env["CONSUL_HTTP_SSL"] = "true"  # host:port plus CONSUL_HTTP_SSL means https, as for Consul's CLI
    got = shipyard("--http-addr", _https_addr(verifying), "kv", "get", "tls/cli", env=env)
    assert got.stdout.strip() == "over-https"


def test_cli_without_the_ca_or_certificate_is_one_line(verifying: ServerProcess, pki: Pki) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "SHIPYARD_"))}
    no_ca = shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "get", "x", env=env, check=False)
    assert no_ca.returncode == 1 and "CONSUL_CACERT" in no_ca.stderr and "Traceback" not in no_ca.stderr
    no_cert = shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "get", "x",
                       env=_env(pki, client_cert=False), check=False)
    assert no_cert.returncode == 1 and "CONSUL_CLIENT_CERT" in no_cert.stderr
    assert len(no_cert.stderr.strip().splitlines()) == 1


def test_py_consul_over_https(verifying: ServerProcess, pki: Pki) -> None:
    client = consul.Consul(host="127.0.0.1", port=verifying.https_port, scheme="https",  # type: ignore[attr-defined]
                           verify=str(pki.ca), cert=(str(pki.cli_cert), str(pki.cli_key)))
    assert client.kv.put("tls/pyconsul", "yes")
    _, item = client.kv.get("tls/pyconsul")
    assert item is not None and item["Value"] == b"yes"
    client.agent.service.register("tls-web", service_id="tls-web-1", address="127.0.0.1", port=9999)
    _, services = client.catalog.services()
    assert "tls-web" in services


def test_client_without_certificate_is_refused_at_the_handshake(verifying: ServerProcess, pki: Pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.minimum_version = context.maximum_version = version
        port = verifying.https_port  # type: ignore[attr-defined]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)), \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            # TLS 1.2 fails in do_handshake; TLS 1.3 clients learn of the refusal on their first read.
            tls.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert tls.recv(100) == b""  # never an HTTP answer
            raise ConnectionResetError("closed without an answer")
    with_cert = requests.get(f"https://{_https_addr(verifying)}/v1/status/leader", verify=str(pki.ca),
                             cert=(str(pki.cli_cert), str(pki.cli_key)), timeout=10)
    assert with_cert.status_code == 200


def test_certificate_from_another_ca_is_refused(verifying: ServerProcess, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    # Refused during the handshake (TLS 1.3: the client reads the refusal as a closed connection), never answered.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"https://{_https_addr(verifying)}/v1/status/leader", timeout=10,
                     verify=False, cert=(str(other.cli_cert), str(other.cli_key)))


def test_plain_http_to_the_https_port_gets_gos_400(verifying: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", verifying.https_port), timeout=10) as sock:  # type: ignore[attr-defined]
        sock.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")


def test_https_only_with_tls_1_2_or_later(verifying: ServerProcess, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.cli_cert), str(pki.cli_key))
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    port = verifying.https_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises((ssl.SSLError, ConnectionResetError)):
        context.wrap_socket(raw, server_hostname="localhost")


def _wait_https(server: ServerProcess, pki: Pki, path: str, ok: object, timeout: float = 30.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert server.proc is not None and server.proc.poll() is None, server.log_tail()
        try:
            last = requests.get(f"https://{_https_addr(server)}{path}", verify=str(pki.ca), timeout=5)
            if ok(last):  # type: ignore[operator]
                return last  # type: ignore[return-value]
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{path}: {last}: {server.log_tail()}")


def test_http_off_and_gateway_workers_follow_the_store_over_https(pki: Pki, tmp_path: Path) -> None:
    """--http-port 0: only HTTPS; the gateway workers (their own processes) still get every route change."""
    https_port, gateway_port = free_port(), free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(tmp_path / "data"),
           "--http-port", "0", "--https-port", str(https_port), "--dns-port", "0", "--gateway-port",
           str(gateway_port), "--gateway-workers", "1", "--tls-cert", str(pki.server_cert), "--tls-key",
           str(pki.server_key), "--tls-ca", str(pki.ca), "--verify-incoming"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    cert = (str(pki.cli_cert), str(pki.cli_key))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log, 3000)
            try:
                if requests.get(f"https://127.0.0.1:{https_port}/v1/status/leader", verify=str(pki.ca),
                                cert=cert, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        while "shipyard server ready" not in log_tail(log, 50000):  # after the workers listen
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log, 3000)
            time.sleep(0.1)
        assert "plain HTTP off" in log_tail(log, 50000)
        upstream = free_port()
        body = {"name": "tls-svc", "url": f"http://127.0.0.1:{upstream}"}
        r = requests.post(f"https://127.0.0.1:{https_port}/api/gateway/services", json=body, verify=str(pki.ca),
                          cert=cert, timeout=10)
        assert r.status_code == 201, r.text
        r = requests.post(f"https://127.0.0.1:{https_port}/api/gateway/services/tls-svc/routes",
                          json={"paths": ["/over-https"]}, verify=str(pki.ca), cert=cert, timeout=10)
        assert r.status_code == 201, r.text
        # The route reached the workers through their HTTPS watch: no longer a 404 (nothing listens upstream: 502).
        deadline = time.monotonic() + 20
        while requests.get(f"http://127.0.0.1:{gateway_port}/over-https", timeout=5).status_code == 404:
            assert time.monotonic() < deadline, log_tail(log, 3000)
            time.sleep(0.1)
        assert requests.get(f"http://127.0.0.1:{gateway_port}/over-https", timeout=5).status_code in (502, 503)
    finally:
        proc.terminate()
        proc.wait(20)


def test_non_loopback_bind_needs_acl_deny_and_tls(pki: Pki, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--bind", "0.0.0.0", "--dns-port", "0",
            "--no-gateway", "--http-port", str(free_port())]
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca),
           "--https-port", str(free_port())]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1 and "--acl" in plain.stderr and "--tls-cert" in plain.stderr
    tls_only = subprocess.run(base + tls, capture_output=True, text=True, timeout=30)
    assert tls_only.returncode == 1 and "refusing to bind" in tls_only.stderr
    acl_allow = subprocess.run(base + tls + ["--acl", "--acl-default-policy", "allow"], capture_output=True,
                               text=True, timeout=30)
    assert acl_allow.returncode == 1 and "refusing to bind" in acl_allow.stderr
    http_port = free_port()
    https_port = free_port()
    cmd = [*base[:-1], str(http_port), *tls[:-1], str(https_port), "--acl"]
    log = tmp_path / "bound.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "shipyard server ready" not in log_tail(log, 20000):
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log, 3000)
            time.sleep(0.1)
        # HTTPS faces the network; plain HTTP is on loopback only.
        with socket.create_connection(("127.0.0.1", https_port), timeout=5):
            pass
        listening = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{http_port:04X}" in listening and f"00000000:{http_port:04X}" not in listening
        assert f"00000000:{https_port:04X}" in listening
    finally:
        proc.terminate()
        proc.wait(20)


SDK_SCRIPT = """
import asyncio
from shipyard.sdk import config
from shipyard.sdk.server_api import control_client, server_url

class Settings(config.Settings):
    greeting: str = "default"

print(config.load(Settings, "tlsapp").greeting)

async def main() -> None:
    async with control_client(server_url()) as http:
        print(server_url(), (await http.get("/v1/kv/tlsapp/greeting", params={"raw": ""})).text)

asyncio.run(main())
"""


def test_sdk_reads_config_over_https_with_a_client_certificate(verifying: ServerProcess, pki: Pki) -> None:
    env = _env(pki)
    shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "put", "tlsapp/greeting", "hello-tls",
             env=env)
    env.update({"SHIPYARD_HTTP_ADDR": _https_addr(verifying), "SHIPYARD_HTTP_SSL": "true",
                "SHIPYARD_CACERT": env.pop("CONSUL_CACERT"), "SHIPYARD_CLIENT_CERT": env.pop("CONSUL_CLIENT_CERT"),
                "SHIPYARD_CLIENT_KEY": env.pop("CONSUL_CLIENT_KEY")})
    out = subprocess.run([sys.executable, "-c", SDK_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hello-tls", f"https://{_https_addr(verifying)} hello-tls"]


def test_bad_tls_settings_are_one_line_at_start(pki: Pki, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--dns-port", "0",
            "--http-port", str(free_port()), "--https-port", str(free_port())]
    no_gateway = [*base, "--no-gateway"]
    cases = [
        ([*no_gateway, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key)], "not found"),
        ([*no_gateway, "--tls-cert", str(pki.server_cert)], "--tls-key"),
        ([*no_gateway, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.cli_key)], "cannot load"),
        ([*no_gateway, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--verify-incoming"],
         "--tls-ca"),
        ([*base, "--gateway-port", str(free_port()), "--gateway-tls-port", str(free_port()), "--gateway-tls-cert",
          str(pki.server_cert), "--gateway-tls-key", str(pki.cli_key)], "--gateway-tls-cert: cannot load"),
    ]
    for cmd, text in cases:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and text in done.stderr, (cmd, done.stderr)
        assert "Traceback" not in done.stderr
        assert len([line for line in done.stderr.splitlines() if "error" in line.lower()]) == 1, done.stderr


def test_consul_config_file_tls_block_turns_https_on(pki: Pki, tmp_path: Path) -> None:
    """Consul's own agent configuration: tls { defaults { ... } } and ports { https } give the same HTTPS port the
    flags give, client certificates required."""
    http_port, https_port = free_port(), free_port()
    config = tmp_path / "consul.hcl"
    config.write_text(f"""
ports {{
  http = {http_port}
  https = {https_port}
  dns = -1
}}
tls {{
  defaults {{
    ca_file = "{pki.ca}"
    cert_file = "{pki.server_cert}"
    key_file = "{pki.server_key}"
    verify_incoming = true
  }}
}}
""")
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--no-gateway",
                             "--config-file", str(config)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "shipyard server ready" not in log_tail(log, 20000):
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log, 3000)
            time.sleep(0.1)
        url = f"https://127.0.0.1:{https_port}/v1/status/leader"
        assert requests.get(url, verify=str(pki.ca), cert=(str(pki.cli_cert), str(pki.cli_key)),
                            timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, verify=str(pki.ca), timeout=10)  # no client certificate: refused at the handshake
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_trusts_a_ca_directory_and_names_a_missing_ca(verifying: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    """CONSUL_CAPATH: a directory of CA certificates under OpenSSL's hashed names (c_rehash), as Consul reads it."""
    openssl = need_binary("openssl")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", str(pki.ca)], capture_output=True,
                                  text=True, check=True).stdout.strip()
    cas = tmp_path / "cas"
    cas.mkdir()
    (cas / f"{subject_hash}.0").write_bytes(pki.ca.read_bytes())
    env = _env(pki)
    del env["CONSUL_CACERT"]
    env["CONSUL_CAPATH"] = str(cas)
    shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "put", "tls/capath", "ok", env=env)
    env["CONSUL_CACERT"] = str(tmp_path / "missing-ca.pem")
    missing = shipyard("--http-addr", "https://" + _https_addr(verifying), "kv", "get", "tls/capath", env=env,
                       check=False)
    assert missing.returncode == 1 and "cannot load the CA" in missing.stderr and "Traceback" not in missing.stderr
