"""A small synchronous client for the server's HTTP API, used by CLI commands.

Turns every transport or HTTP failure into a ShipyardError with one clear line; never retries writes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from shipyard.errors import ShipyardError
from shipyard.tls.contexts import ClientTls
from shipyard.tokens import token_headers


class ServerUnreachable(ShipyardError):
    status = 503


class NotShipyard(ShipyardError):
    status = 502


def _not_shipyard(base_url: str, method: str, path: str, response: httpx.Response) -> NotShipyard:
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return NotShipyard(
        f"{base_url} is not a Shipyard server: {method} {path} answered {response.status_code} with {kind} "
        "(check --http-addr / SHIPYARD_HTTP_ADDR, or the port: another program may hold it)"
    )


def _looks_foreign(response: httpx.Response) -> bool:
    """A Shipyard server answers JSON, or plain text on Consul paths; never an HTML page."""
    return response.headers.get("content-type", "").startswith("text/html")


class ApiClient:
    def __init__(self, http_addr: str, *, timeout: float = 30.0) -> None:
        # https:// in the address or CONSUL_HTTP_SSL=true; the CA and a client certificate from CONSUL_CACERT,
        # CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY (or their SHIPYARD_ twins), as Consul's CLI reads them.
        tls = ClientTls.from_env()
        self.base_url = tls.base_url(http_addr)
        # The ACL token from SHIPYARD_HTTP_TOKEN or CONSUL_HTTP_TOKEN, as Consul's CLI sends it.
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, verify=tls.httpx_verify(self.base_url),
                                  headers=token_headers())
        self._told_filtered = False

    def _note_filtered(self, response: httpx.Response) -> None:
        """Once per command: an answer the server cut down to what the token may read (else an empty list under
        ACLs looks like an empty platform)."""
        if self._told_filtered or response.headers.get("X-Consul-Results-Filtered-By-ACLs") != "true":
            return
        self._told_filtered = True
        hint = "" if self.has_token else " (no token sent: set SHIPYARD_HTTP_TOKEN or CONSUL_HTTP_TOKEN)"
        print(f"note: the server left out what this ACL token may not read{hint}", file=sys.stderr)

    def use_token(self, token: str) -> None:
        """Send this ACL token from now on (e.g. the management token `up` just bootstrapped)."""
        self._http.headers["X-Consul-Token"] = token

    @property
    def has_token(self) -> bool:
        return "X-Consul-Token" in self._http.headers

    def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, content: bytes | None = None,
        json: Any = None, ok_statuses: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params, content=content, json=json)
        except httpx.ConnectError as exc:
            raise _connect_failure(self.base_url, exc) from None
        except httpx.TimeoutException:
            raise ServerUnreachable(f"the shipyard server at {self.base_url} did not answer in time") from None
        except httpx.RemoteProtocolError as exc:
            if self.base_url.startswith("https://"):  # TLS 1.3 servers refuse a missing client certificate here
                raise ServerUnreachable(f"{self.base_url} closed the connection ({exc}): a server with "
                                        "--verify-incoming wants CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY") from None
            raise NotShipyard(f"{self.base_url} is not a Shipyard server (it does not speak HTTP: {exc})") from None
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"talking to {self.base_url} failed: {exc}") from None
        if _looks_foreign(response):
            raise _not_shipyard(self.base_url, method, path, response)
        if response.status_code not in ok_statuses:
            text = _error_text(response)
            raise ShipyardError(f"{method} {path} failed ({response.status_code}): {text}", status=response.status_code)
        self._note_filtered(response)
        return response

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, params: dict[str, Any] | None = None) -> Iterator[httpx.Response]:
        """A streamed response (for logs -f); same one-line errors as request()."""
        try:
            with self._http.stream(method, path, params=params, timeout=httpx.Timeout(30, read=None)) as response:
                if _looks_foreign(response):
                    raise _not_shipyard(self.base_url, method, path, response)
                if response.status_code != 200:
                    response.read()
                    raise ShipyardError(
                        f"{method} {path} failed ({response.status_code}): {_error_text(response)}",
                        status=response.status_code,
                    )
                yield response
        except httpx.ConnectError:
            raise ServerUnreachable(
                f"cannot reach the shipyard server at {self.base_url} (is `shipyard server` running?)"
            ) from None
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"talking to {self.base_url} failed: {exc}") from None

    def get_json(self, path: str, **params: Any) -> Any:
        response = self.request("GET", path, params=params or None)
        try:
            return response.json()
        except ValueError:
            raise _not_shipyard(self.base_url, "GET", path, response) from None


def _connect_failure(base_url: str, exc: httpx.ConnectError) -> ShipyardError:
    """A refused connection, or a TLS failure said as one (wrong CA, no client certificate, plain HTTP port)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ServerUnreachable(f"the server at {base_url} has a certificate we cannot verify ({text}): "
                                 "set CONSUL_CACERT to the CA that signed it")
    if "SSL" in text or "TLS" in text or "certificate" in text:
        return ServerUnreachable(f"TLS with {base_url} failed: {text} (a server with --verify-incoming wants "
                                 "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY; an http:// port wants http://)")
    return ServerUnreachable(f"cannot reach the shipyard server at {base_url} (is `shipyard server` running?)")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    return " ".join(response.text.split())[:300] or response.reason_phrase
