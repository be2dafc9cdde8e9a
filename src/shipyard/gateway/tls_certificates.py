"""The gateway's TLS listener certificates: Kong's `certificates` and `snis` entities (under gateway/) turned into
one SSL context per certificate, picked by SNI (exact name, then a `*.` wildcard, then the `*` SNI or the default).

Built in the worker from the store contents it already follows; it never writes the store and never keeps key
material in a file longer than the load takes (a private temporary directory, removed at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import orjson

log = logging.getLogger("shipyard.gateway.tls")

CERTIFICATES = "gateway/certificates/"
SNIS = "gateway/snis/"
ALPN = ["http/1.1"]  # the gateway speaks HTTP/1.1; a client offering h2 only gets no ALPN match and HTTP/1.1


def listener_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+, HTTP/1.1 by ALPN, the given certificate: what every SNI's context is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    # ssl loads chains from files only: write them where only we can read, load, and remove them at once.
    with tempfile.TemporaryDirectory(prefix="shipyard-tls-") as folder:
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(cert_path, key_path)
    return context


def _records(contents: Mapping[str, bytes], prefix: str) -> list[dict[str, Any]]:
    out = []
    for key, raw in contents.items():
        if key.startswith(prefix):
            with contextlib.suppress(orjson.JSONDecodeError):
                value = orjson.loads(raw)
                if isinstance(value, dict):
                    out.append(value)
    return out


def fingerprint(contents: Mapping[str, bytes]) -> str:
    """Changes when a certificate or an SNI does: the contexts are rebuilt only then."""
    digest = hashlib.sha256()
    for key in sorted(k for k in contents if k.startswith((CERTIFICATES, SNIS))):
        digest.update(key.encode() + b"\0" + contents[key] + b"\0")
    return digest.hexdigest()


class CertificateSet:
    """SNI name -> SSL context, and the default context (for clients without SNI or with an unknown name)."""

    def __init__(self, default: ssl.SSLContext) -> None:
        self.fallback = default  # --gateway-tls-cert, or the self-signed one
        self.default = default  # the `*` SNI's certificate when there is one
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        self.version = ""
        # The listening context: the default certificate, and the callback that swaps in the SNI's one.
        self.listening = default
        default.sni_callback = self._pick

    def context_for(self, name: str | None) -> ssl.SSLContext:
        if not name:
            return self.default
        name = name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None and "." in name:
            found = self.wildcard.get(name.split(".", 1)[1])
        return found if found is not None else self.default

    def _pick(self, connection: Any, name: str | None, _context: ssl.SSLContext) -> None:
        chosen = self.context_for(name)
        if chosen is not self.listening:
            connection.context = chosen
        return None

    def update(self, contents: Mapping[str, bytes]) -> None:
        """Rebuilds the contexts from the store contents when certificates or SNIs changed; a certificate that does
        not load is logged and left out (its names get the default), never fatal."""
        version = fingerprint(contents)
        if version == self.version:
            return
        self.version = version
        by_id: dict[str, ssl.SSLContext] = {}
        for cert in _records(contents, CERTIFICATES):
            try:
                by_id[str(cert["id"])] = listener_context(str(cert["cert"]).encode(), str(cert["key"]).encode())
            except (KeyError, ssl.SSLError, OSError, ValueError) as exc:
                log.error("gateway certificate %s cannot be loaded: %s", cert.get("id"), exc)
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        default = self.fallback
        for sni in _records(contents, SNIS):
            context = by_id.get(str((sni.get("certificate") or {}).get("id")))
            name = str(sni.get("name") or "").lower()
            if context is None or not name:
                continue
            if name == "*":
                default = context
            elif name.startswith("*."):
                wildcard[name[2:]] = context
            else:
                exact[name] = context
        self.exact, self.wildcard, self.default = exact, wildcard, default
        log.info("gateway TLS: %d certificates, %d SNIs", len(by_id), len(exact) + len(wildcard))
