"""What a hostile web page can make a browser send to this server is refused here, for every route of the control
API (Consul /v1, Marathon /v2, native /api, gateway admin, bus, store): a foreign Origin, an unknown Host (DNS
rebinding) and write bodies in a content type other than the endpoint's own (the types a form or a no-cors fetch
sends without a preflight).

It decides from the request head alone, before any handler runs; it never reads a body and never grants CORS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from shipyard.api.machine import is_loopback
from shipyard.errors import ShipyardError

JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
# Methods whose body changes state; a browser sends GET/HEAD bodies never, and the guard does not read them.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODY_TYPES_ATTR = "shipyard_body_types"
_ANY = frozenset({"*"})

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


class ForeignOrigin(ShipyardError):
    status = 403


class MisdirectedRequest(ShipyardError):
    """421 (RFC 9110 §15.5.20): this server is not authoritative for the name the client asked for; that is what a
    DNS-rebound name is, and unlike 403 it tells an honest client behind a new name what to fix (--allowed-host)."""

    status = 421


class UnsupportedMediaType(ShipyardError):
    status = 415


def accepts_body(*types: str) -> Callable[[Handler], Handler]:
    """Marks a handler's body types; unmarked handlers take JSON only."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, _BODY_TYPES_ATTR, frozenset(types))
        return handler

    return mark


def accepts_any_body(handler: Handler) -> Handler:
    """A raw-value endpoint (Consul KV PUT, the store's put): any bytes with any type, as Consul takes them. Such
    endpoints are PUT only, which no browser sends cross-origin without a preflight, and the Origin/Host checks
    still apply."""
    setattr(handler, _BODY_TYPES_ATTR, _ANY)
    return handler


_VERDICTS_MAX = 1024


def _is_loopback_name(host: str) -> bool:
    # RFC 6761: browsers resolve localhost and *.localhost to loopback themselves, so DNS cannot rebind them.
    return host.endswith(".localhost") or is_loopback(host)


def _normal(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _split_authority(authority: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header value, or None when it is not one."""
    try:
        parts = urlsplit("//" + authority)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return _normal(parts.hostname), port


class RequestGuard:
    """The allowed Host names of one server, and the checks that use them."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(_normal(n) for n in names if n and _normal(n) not in ("", "0.0.0.0", "::"))
        # (Host header, local address) -> allowed: clients send the same few Host values on every request, and
        # parsing one (urlsplit, ipaddress) cost about 5% of the server's CPU per Consul KV request. Bounded: a
        # client sending ever new values only empties it.
        self._verdicts: dict[tuple[str, str | None], bool] = {}

    def host_allowed(self, host: str, local_address: str | None) -> bool:
        # The address the connection arrived on is the server's own (a wildcard bind answers on several).
        return _is_loopback_name(host) or host in self.names or (local_address is not None
                                                                 and host == _normal(local_address))

    def check_host(self, request: web.Request) -> None:
        raw = request.headers.get(hdrs.HOST)
        if raw is None:
            return  # HTTP/1.0 without Host: no browser sends that
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        local = sockname[0] if isinstance(sockname, tuple) and sockname else None
        allowed = self._verdicts.get((raw, local))
        if allowed is None:
            parsed = _split_authority(raw)
            allowed = parsed is not None and self.host_allowed(parsed[0], local)
            if len(self._verdicts) >= _VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[raw, local] = allowed
        if not allowed:
            raise MisdirectedRequest(
                f"Host {raw!r} is not a name of this server: use a loopback address, one of its configured "
                "names or addresses, or start the server with --allowed-host NAME",
                {"host": raw},
            )

    @staticmethod
    def check_origin(request: web.Request) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return
        if not _same_origin(origin, request.scheme, request.headers.get(hdrs.HOST, "")):
            raise ForeignOrigin(f"cross-origin request refused (Origin {origin!r} is not this server's own)",
                                {"origin": origin})

    @staticmethod
    def check_body_type(request: web.Request) -> None:
        if request.method not in WRITE_METHODS or not request.body_exists or request.match_info.http_exception:
            return
        raw = request.headers.get(hdrs.CONTENT_TYPE)
        if raw is None:
            # Non-browser clients (py-consul, Go's net/http) send none; a browser that sends a body without a type
            # also sends Origin on every cross-origin write, checked above.
            return
        allowed = getattr(request.match_info.handler, _BODY_TYPES_ATTR, JSON_TYPES)
        if allowed is _ANY:
            return
        mime = request.content_type
        if mime in allowed or ("application/json" in allowed and mime.startswith("application/")
                               and mime.endswith("+json")):
            return
        if _consul_client_text_body(request, mime, allowed):
            return
        raise UnsupportedMediaType(
            f"unsupported Content-Type {mime!r} for {request.method} {request.path}: send "
            + " or ".join(sorted(allowed)),
            {"content_type": mime, "accepted": sorted(allowed)},
        )

    def middleware(self) -> Any:
        @web.middleware
        async def request_guard(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.check_host(request)
            self.check_origin(request)
            self.check_body_type(request)
            return await handler(request)

        return request_guard


def _consul_client_text_body(request: web.Request, mime: str, allowed: frozenset[str]) -> bool:
    """py-consul's asyncio client sends its JSON bodies as text/plain (aiohttp's type for a str body), so a Consul
    endpoint takes text/plain from a client that is no browser: no Origin (every browser sends one on a cross-origin
    write) and a User-Agent that is not a browser's (all of theirs, and their plugins', start "Mozilla/"; a request
    with none is refused too)."""
    agent = request.headers.get(hdrs.USER_AGENT, "")
    return (mime == "text/plain" and "application/json" in allowed and request.path.startswith("/v1/")
            and hdrs.ORIGIN not in request.headers and bool(agent) and not agent.startswith("Mozilla/"))


def _same_origin(origin: str, scheme: str, host_header: str) -> bool:
    """Origin equals scheme://Host of this request (ports normalised); "null" (sandboxed pages, file:) never does."""
    default = {"http": 80, "https": 443}
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    own = _split_authority(host_header)
    if own is None or parts.scheme.lower() != scheme or not parts.hostname or parts.path not in ("", "/"):
        return False
    return (_normal(parts.hostname), origin_port or default.get(scheme)) == (own[0], own[1] or default.get(scheme))
