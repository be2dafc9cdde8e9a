"""SSL contexts for Shipyard's listeners and for its HTTP clients, and the client side's settings from the
environment (Consul's CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY and SHIPYARD_ twins).

Pure configuration: it never opens a socket and never weakens verification unless told to by name
(CONSUL_HTTP_SSL_VERIFY=false); every context refuses anything older than TLS 1.2.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from shipyard.errors import ShipyardError


class TlsConfigError(ShipyardError):
    status = 400


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str, what: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise TlsConfigError(f"{what}: {exc.filename} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{what}: cannot load {cert_file} with {key_file}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca_file: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise TlsConfigError(f"{what}: CA file {ca_file} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{what}: cannot load CA file {ca_file}: {exc}") from None


def server_context(cert_file: str, key_file: str, ca_file: str = "", *, verify_incoming: bool = False,
                   alpn: tuple[str, ...] = ("http/1.1",), what: str = "--tls-cert") -> ssl.SSLContext:
    """A listener's context: TLS 1.2+, HTTP/1.1 by ALPN, and with `verify_incoming` a client certificate signed
    by `ca_file` required during the handshake (a client without one never reaches HTTP)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file, what)
    if ca_file:
        _load_ca(context, ca_file, what)
    if verify_incoming:
        if not ca_file:
            raise TlsConfigError("--verify-incoming needs --tls-ca: the CA that signs the clients' certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def client_context(ca_file: str = "", cert_file: str = "", key_file: str = "", *,
                   verify: bool = True, ca_path: str = "") -> ssl.SSLContext:
    """A client's context: the server is checked against `ca_file` or the CAs in directory `ca_path` (the system's
    CAs without either); with `cert_file` the client proves itself (for servers that verify incoming connections)."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None, capath=ca_path or None) if verify else \
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    except (FileNotFoundError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load the CA {ca_file or ca_path}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        _load_chain(context, cert_file, key_file or cert_file, "client certificate")
    return context


def _env(environ: Mapping[str, str], name: str) -> str:
    """SHIPYARD_<name> first, then CONSUL_<name>: a Shipyard setting wins over one left for Consul's tools."""
    return environ.get(f"SHIPYARD_{name}") or environ.get(f"CONSUL_{name}") or ""


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on", "t")


@dataclass(frozen=True)
class ClientTls:
    """How an HTTP client of the control API speaks TLS, as Consul's CLI reads it from the environment."""

    https: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True
    ca_path: str = ""  # CONSUL_CAPATH: a directory of CA certificates

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientTls:
        env = os.environ if environ is None else environ
        verify_text = _env(env, "HTTP_SSL_VERIFY")
        return cls(https=_truthy(_env(env, "HTTP_SSL")), ca_file=_env(env, "CACERT"),
                   cert_file=_env(env, "CLIENT_CERT"), key_file=_env(env, "CLIENT_KEY"),
                   verify=not verify_text or _truthy(verify_text), ca_path=_env(env, "CAPATH"))

    def base_url(self, addr: str) -> str:
        """host:port -> http(s)://host:port (https with CONSUL_HTTP_SSL); a URL is kept as given."""
        if "://" in addr:
            return addr.rstrip("/")
        return f"{'https' if self.https else 'http'}://{addr}".rstrip("/")

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca_file, self.cert_file, self.key_file, verify=self.verify, ca_path=self.ca_path)

    def httpx_verify(self, base_url: str) -> ssl.SSLContext | bool:
        """What httpx's `verify=` gets: the context for https URLs, True (unused) for plain HTTP."""
        return self.context() if base_url.startswith("https://") else True
