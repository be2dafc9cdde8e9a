"""The gateway terminating TLS on --gateway-tls-port: Kong's certificates and snis entities on the admin API (keys
never shown), SNI picking the certificate (exact, *.wildcard, the "*" default, else the server's default one),
ALPN http/1.1, TLS 1.2+, keep-alive over TLS, X-Forwarded-Proto https, and routes with protocols [https] answering
plain HTTP with Kong's 426 or a redirect to the TLS port."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shipyard.tls.authority import CertRequest, build_ca, build_cert
from support import ServerProcess, free_port

UPSTREAM = str(Path(__file__).with_name("gateway_upstream.py"))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: object) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                             serialization.NoEncryption()).decode()


class Authority:
    """A CA made in-process (shipyard.tls, as `shipyard tls` makes them) and certificates for given names."""

    def __init__(self, folder: Path) -> None:
        self.cert, self.key = build_ca()
        self.ca_file = folder / "gateway-ca.pem"
        self.ca_file.write_text(_pem(self.cert))

    def issue(self, *names: str) -> tuple[str, str, bytes]:
        cert, key = build_cert(CertRequest(kind="server", dns_names=list(names)), self.cert, self.key)
        return _pem(cert), _key_pem(key), cert.public_bytes(serialization.Encoding.DER)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, requests.RequestException):
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("gateway-ca"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tls-gateway")
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, UPSTREAM, str(upstream_port), "tls-up"],
                                stdout=open(tmp / "upstream.log", "wb"), stderr=subprocess.STDOUT)
    tls_port = free_port()
    server = ServerProcess(tmp / "data", "--gateway-tls-port", str(tls_port))
    server.tls_port = tls_port  # type: ignore[attr-defined]
    server.start()
    admin = server.url + "/api/gateway"
    assert requests.post(admin + "/services", json={"name": "tls-echo", "url": f"http://127.0.0.1:{upstream_port}"},
                         timeout=10).status_code == 201
    assert requests.post(admin + "/services/tls-echo/routes", json={"name": "echo", "paths": ["/echo"]},
                         timeout=10).status_code == 201
    assert requests.post(admin + "/services/tls-echo/routes", json={
        "name": "secure", "paths": ["/secure"], "protocols": ["https"], "https_redirect_status_code": 301,
    }, timeout=10).status_code == 201
    assert requests.post(admin + "/services/tls-echo/routes", json={
        "name": "upgrade", "paths": ["/upgrade"], "protocols": ["https"]}, timeout=10).status_code == 201
    wait_until(lambda: requests.get(server.gateway_url + "/echo/ping", timeout=5).status_code == 200, "the route")
    yield server
    server.stop()
    upstream.terminate()
    upstream.wait(10)


def _port(server: ServerProcess) -> int:
    return server.tls_port  # type: ignore[attr-defined, no-any-return]


def handshake(server: ServerProcess, name: str | None, alpn: list[str] | None = None,
              version: ssl.TLSVersion | None = None) -> tuple[bytes, str | None]:
    """The certificate the gateway served for SNI `name` (DER), and the ALPN protocol it chose."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    if version is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der, tls.selected_alpn_protocol()


@pytest.fixture(scope="module")
def certificates(gateway: ServerProcess, authority: Authority) -> dict[str, bytes]:
    admin = gateway.url + "/api/gateway"
    out = {}
    for label, names in (("a", ["a.example.test"]), ("wild", ["*.wild.test"])):
        cert, key, der = authority.issue(*[n.replace("*", "x") for n in names])
        r = requests.post(admin + "/certificates", json={"cert": cert, "key": key, "snis": names}, timeout=10)
        assert r.status_code == 201, r.text
        out[label] = der
    wait_until(lambda: handshake(gateway, "a.example.test")[0] == out["a"], "the gateway to load the certificates")
    return out


def test_sni_picks_the_certificate(gateway: ServerProcess, certificates: dict[str, bytes]) -> None:
    assert handshake(gateway, "a.example.test")[0] == certificates["a"]
    assert handshake(gateway, "A.Example.Test")[0] == certificates["a"]
    assert handshake(gateway, "x.wild.test")[0] == certificates["wild"]
    default, _ = handshake(gateway, "unknown.test")
    assert default not in certificates.values()
    assert handshake(gateway, None)[0] == default  # no SNI at all: the default certificate


def test_star_sni_becomes_the_default_certificate(gateway: ServerProcess, authority: Authority,
                                                  certificates: dict[str, bytes]) -> None:
    admin = gateway.url + "/api/gateway"
    cert, key, der = authority.issue("fallback.test")
    r = requests.post(admin + "/certificates", json={"cert": cert, "key": key, "snis": ["*"]}, timeout=10)
    assert r.status_code == 201, r.text
    try:
        wait_until(lambda: handshake(gateway, "unknown.test")[0] == der, "the * certificate to be the default")
        assert handshake(gateway, "a.example.test")[0] == certificates["a"]  # an exact SNI still wins
    finally:
        assert requests.delete(admin + f"/certificates/{r.json()['id']}", timeout=10).status_code == 204
    wait_until(lambda: handshake(gateway, "unknown.test")[0] != der, "the server default to come back")


def test_admin_api_never_shows_keys_and_checks_pairs(gateway: ServerProcess, authority: Authority,
                                                     certificates: dict[str, bytes]) -> None:
    admin = gateway.url + "/api/gateway"
    listed = requests.get(admin + "/certificates", timeout=10).json()["data"]
    assert listed and all(c["key"] == "<redacted>" and "PRIVATE KEY" not in str(c) for c in listed)
    by_sni = requests.get(admin + "/certificates/a.example.test", timeout=10).json()
    assert by_sni["snis"] == ["a.example.test"] and by_sni["key"] == "<redacted>"
    snis = requests.get(admin + f"/certificates/{by_sni['id']}/snis", timeout=10).json()["data"]
    assert [s["name"] for s in snis] == ["a.example.test"]
    # A PATCH that sends the redacted record back keeps the key.
    assert requests.patch(admin + f"/certificates/{by_sni['id']}", json={"tags": ["t"]},
                          timeout=10).status_code == 200
    assert handshake(gateway, "a.example.test")[0] == certificates["a"]
    cert, _, _ = authority.issue("one.test")
    _, other_key, _ = authority.issue("two.test")
    mismatch = requests.post(admin + "/certificates", json={"cert": cert, "key": other_key}, timeout=10)
    assert mismatch.status_code == 400 and "does not match" in mismatch.text
    garbage = requests.post(admin + "/certificates", json={"cert": "nope", "key": other_key}, timeout=10)
    assert garbage.status_code == 400 and "cert" in garbage.json()["fields"]
    cert, key, _ = authority.issue("dup.test")
    taken = requests.post(admin + "/certificates", json={"cert": cert, "key": key, "snis": ["a.example.test"]},
                          timeout=10)
    assert taken.status_code == 409
    bad_name = requests.post(admin + "/snis", json={"name": "bad name", "certificate": {"id": by_sni["id"]}},
                             timeout=10)
    assert bad_name.status_code == 400


def test_alpn_http11_and_tls_1_2_minimum(gateway: ServerProcess, certificates: dict[str, bytes]) -> None:
    assert handshake(gateway, "a.example.test", ["h2", "http/1.1"])[1] == "http/1.1"
    assert handshake(gateway, "a.example.test", ["http/1.1"])[1] == "http/1.1"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(gateway, "a.example.test", version=ssl.TLSVersion.TLSv1_1)


def test_proxying_over_tls_with_keep_alive(gateway: ServerProcess, authority: Authority,
                                           certificates: dict[str, bytes]) -> None:
    context = ssl.create_default_context(cafile=str(authority.ca_file))
    with socket.create_connection(("127.0.0.1", _port(gateway)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="a.example.test") as tls:
        reader = tls.makefile("rb")
        for i in range(3):  # three requests on one TLS connection
            tls.sendall(f"GET /echo/{i} HTTP/1.1\r\nHost: a.example.test\r\n\r\n".encode())
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                assert not (name.lower() == "connection" and "close" in value.lower())
            body = reader.read(length)
            assert b'"x-forwarded-proto": "https"' in body.lower().replace(b'":"', b'": "')
            assert f"/{i}".encode() in body
    with requests.Session() as session:
        for _ in range(2):
            r = session.get(f"https://127.0.0.1:{_port(gateway)}/echo/x", verify=False, timeout=10)
            assert r.status_code == 200 and r.json()["headers"]["X-Forwarded-Port"] == str(_port(gateway))


def test_https_only_routes_redirect_or_426(gateway: ServerProcess) -> None:
    plain = requests.get(gateway.gateway_url + "/secure/path?q=1", allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == f"https://127.0.0.1:{_port(gateway)}/secure/path?q=1"
    upgrade = requests.get(gateway.gateway_url + "/upgrade/x", allow_redirects=False, timeout=10)
    assert upgrade.status_code == 426 and upgrade.json()["message"] == "Please use HTTPS protocol"
    secure = requests.get(f"https://127.0.0.1:{_port(gateway)}/secure/path", verify=False, timeout=10)
    assert secure.status_code == 200 and secure.json()["name"] == "tls-up"
    assert requests.get(gateway.gateway_url + "/echo/plain", timeout=10).status_code == 200  # http+https routes
    bad = requests.post(gateway.url + "/api/gateway/services/tls-echo/routes", json={
        "paths": ["/x"], "protocols": ["https"], "https_redirect_status_code": 200}, timeout=10)
    assert bad.status_code == 400


TLS_UPSTREAM = """
import ssl, sys
from aiohttp import web

async def echo(request: web.Request) -> web.Response:
    return web.json_response({"name": "tls-upstream", "secure": request.secure, "path": request.path})

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(sys.argv[2], sys.argv[3])
app = web.Application()
app.router.add_route("*", "/{tail:.*}", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=context, print=None)
"""


def test_tls_to_an_upstream_service(gateway: ServerProcess, authority: Authority, tmp_path: Path) -> None:
    """A service with protocol https: the gateway speaks TLS to it (unverified as Kong does by default; with
    tls_verify the instance's certificate must chain to a system CA, which this test CA does not: 502)."""
    cert, key, _ = authority.issue("localhost")
    (tmp_path / "up.pem").write_text(cert)
    (tmp_path / "up-key.pem").write_text(key)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", TLS_UPSTREAM, str(port), str(tmp_path / "up.pem"),
                                 str(tmp_path / "up-key.pem")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = gateway.url + "/api/gateway"
    try:
        for name, verify in (("tls-upstream", None), ("tls-upstream-verified", True)):
            body = {"name": name, "url": f"https://127.0.0.1:{port}", **({"tls_verify": verify} if verify else {})}
            assert requests.post(admin + "/services", json=body, timeout=10).status_code == 201
            assert requests.post(admin + f"/services/{name}/routes", json={"paths": [f"/{name}"]},
                                 timeout=10).status_code == 201
        wait_until(lambda: requests.get(gateway.gateway_url + "/tls-upstream/x", timeout=5).status_code == 200,
                   "the route to the TLS upstream")
        answer = requests.get(gateway.gateway_url + "/tls-upstream/x", timeout=10).json()
        assert answer == {"name": "tls-upstream", "secure": True, "path": "/x"}
        # The handshake fails verification: a connect failure (502, or 503 once the only instance is ejected).
        refused = requests.get(gateway.gateway_url + "/tls-upstream-verified/x", timeout=10)
        assert refused.status_code in (502, 503) and "tls-upstream" not in refused.json().get("name", "")
    finally:
        upstream.terminate()
        upstream.wait(10)


def test_gateway_apply_leaves_certificates_alone(gateway: ServerProcess, certificates: dict[str, bytes]) -> None:
    """gateway.yaml is the whole truth for routes, services and consumers; certificates and SNIs are managed by the
    admin API, so an apply (here its dry run, which lists every write) never deletes them."""
    r = requests.post(gateway.url + "/api/gateway/config", json={"config": {}, "dry_run": True}, timeout=10)
    assert r.status_code == 200, r.text
    kinds = {change["kind"] for change in r.json()["changes"]}
    assert "service" in kinds  # the dry run would delete what the empty file does not name...
    assert not kinds & {"certificates", "snis"}, kinds  # ...but not the TLS material
