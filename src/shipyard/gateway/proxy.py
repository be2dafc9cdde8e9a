"""The client side of the data plane: one asyncio Protocol per client connection, HTTP/1.1 proxying to upstreams.

Owns parsing, limits, keep-alive and pipelining, streaming with flow control both ways, WebSocket tunnels, the
plugin phases and retries; it never blocks, never buffers a whole body, and never reads the store (the worker
hands it the current route table).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
import orjson

from shipyard.gateway.builtin import is_builtin_path
from shipyard.gateway.paths import InvalidPath, canonical_path, strict_view
from shipyard.gateway.plugins.base import FastRequest, Reject, RequestContext
from shipyard.gateway.upstream import tls_pool_key

if TYPE_CHECKING:
    from shipyard.gateway.routes import Target
    from shipyard.gateway.table import Match
    from shipyard.gateway.upstream import UpstreamConnection
    from shipyard.gateway.worker import GatewayWorker

log = logging.getLogger("shipyard.gateway.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
MAX_PENDING = 256 * 1024  # request body bytes held while the upstream connection is being set up
# A response head that came without any body byte is held this long before it goes to the client: if the instance
# dies before its body (kill -9 between two writes), the client has seen nothing and the request can be retried.
HEAD_HOLD = 0.05

# Request headers we never forward as they came: hop-by-hop ones (RFC 9110 7.6.1) and the ones we rewrite.
(H_DROP, H_HOST, H_CL, H_TE, H_CONNECTION, H_UPGRADE, H_XFF, H_VIA) = range(8)
REQUEST_SPECIAL = {
    b"host": H_HOST, b"content-length": H_CL, b"transfer-encoding": H_TE, b"connection": H_CONNECTION,
    b"upgrade": H_UPGRADE, b"x-forwarded-for": H_XFF, b"via": H_VIA,
    b"keep-alive": H_DROP, b"proxy-connection": H_DROP, b"te": H_DROP, b"trailer": H_DROP,
    b"proxy-authorization": H_DROP, b"x-forwarded-proto": H_DROP, b"x-forwarded-host": H_DROP,
    b"x-forwarded-port": H_DROP,
}
RESPONSE_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"trailer", b"te",
    b"proxy-authenticate", b"via",
})

# Header names as received -> what they are, so the common ones cost a dict lookup, not a lower() each time.
# Bounded: past KIND_CACHE_SIZE distinct spellings, new ones are classified without being remembered.
KIND_CACHE_SIZE = 4096
REQUEST_KIND: dict[bytes, int | None] = {}  # None: forwarded as is; else one of H_*
RESPONSE_KIND: dict[bytes, int] = {}  # 0: forwarded as is, 1: Content-Length, 2: hop-by-hop (judged one by one)


def request_kind(name: bytes) -> int | None:
    kind = REQUEST_SPECIAL.get(name.lower())
    if len(REQUEST_KIND) < KIND_CACHE_SIZE:
        REQUEST_KIND[name] = kind
    return kind


def response_kind(name: bytes) -> int:
    lname = name.lower()
    kind = 2 if lname in RESPONSE_HOP else 1 if lname == b"content-length" else 0
    if len(RESPONSE_KIND) < KIND_CACHE_SIZE:
        RESPONSE_KIND[name] = kind
    return kind


REWRITTEN_STR = frozenset(("host", "content-length", "transfer-encoding", "connection"))
RESPONSE_HOP_STR = frozenset(name.decode() for name in RESPONSE_HOP)
# The plugin path works on str headers: names as received -> str, and str names -> what they are, remembered per
# spelling (bounded like the bytes caches above) so a request pays a dict lookup per header, not a decode or lower().
HEADER_NAME_STR: dict[bytes, str] = {}
REWRITTEN_NAME: dict[str, bool] = {}  # str name -> rewritten by us (never forwarded from ctx.request_headers)
PLUGIN_RESPONSE_KIND: dict[str, int] = {}  # str name -> 0: as is, 1: Content-Length, 2: hop-by-hop


def header_name_str(name: bytes) -> str:
    text = name.decode("latin-1")
    if len(HEADER_NAME_STR) < KIND_CACHE_SIZE:
        HEADER_NAME_STR[name] = text
    return text


def rewritten_name(name: str) -> bool:
    rewritten = name.lower() in REWRITTEN_STR
    if len(REWRITTEN_NAME) < KIND_CACHE_SIZE:
        REWRITTEN_NAME[name] = rewritten
    return rewritten


def plugin_response_kind(name: str) -> int:
    lname = name.lower()
    kind = 2 if lname in RESPONSE_HOP_STR else 1 if lname == "content-length" else 0
    if len(PLUGIN_RESPONSE_KIND) < KIND_CACHE_SIZE:
        PLUGIN_RESPONSE_KIND[name] = kind
    return kind

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def json_body(message: str, **extra: Any) -> bytes:
    return orjson.dumps({"message": message, **extra})


NO_ROUTE = json_body("no Route matched with those values")
AMBIGUOUS_PATH = json_body("Bad request: the path names another route when %2F is decoded or ;parameters removed")
_REJECT_BODIES: dict[tuple[int, str | None], bytes] = {}


def reject_body(reject: Reject) -> bytes:
    """The JSON body of a plugin's rejection, made once per status and message (rejections can come by the
    thousand under attack: 401s, 429s)."""
    body = _REJECT_BODIES.get((reject.status, reject.message))
    if body is None:
        body = json_body(reject.message or (HTTPStatus(reject.status).phrase if reject.status in STATUS_LINES
                                            else str(reject.status)))
        if len(_REJECT_BODIES) >= 1000:
            _REJECT_BODIES.clear()
        _REJECT_BODIES[(reject.status, reject.message)] = body
    return body


@dataclass
class GatewaySettings:
    """Limits and timeouts of one worker (seconds, bytes)."""

    max_header_size: int = 32 * 1024
    max_headers: int = 100
    max_body_size: int = 0  # 0: no gateway-wide limit (the request-size-limiting plugin sets per-route ones)
    header_timeout: float = 10.0  # from the first byte of a request (or connection open) to the end of its head
    keepalive_timeout: float = 60.0  # an idle client connection between requests
    body_timeout: float = 60.0  # between two reads of a request body
    write_timeout: float = 60.0  # a client that stops reading the response
    port: int = 8080
    via: bytes = b"1.1 shipyard"


class _Refuse(Exception):
    """Raised from parser callbacks: answer with this status and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One request on a client connection, from its first byte to the end of its response.

    Defaults are class attributes (no __slots__): a new request sets only what differs, which is most of the
    per-request allocation cost on the hot path."""

    url = b""
    nheaders = 0
    hsize = 0
    host: bytes | None = None
    content_length: bytes | None = None
    te: bytes | None = None
    connection: bytes | None = None
    upgrade_value: bytes | None = None
    xff: bytes | None = None
    via: bytes | None = None
    method = b""
    path = b"/"  # canonical (paths.py): what routes are matched on and the upstream is sent
    strict_path: bytes | None = None  # the path as a server decoding %2F and stripping ;params reads it, if it differs
    query = b""
    version = "1.1"
    keep_alive = True
    chunked = False
    has_body = False
    upgrade = False
    complete = False
    body_received = 0
    match: Match | None = None
    upstream: UpstreamConnection | None = None
    target: Target | None = None
    attempts = 0
    excluded: set[str] | None = None
    replay: list[bytes] | None = None  # the whole body as sent upstream (held for a retry); None if streamed
    fresh_retry = False  # retrying after a pooled connection was found closed: a new connection if need be
    connecting: Target | None = None  # the target of the connect in progress (None: none, or it was abandoned)
    connect_started = 0.0
    head_sent = False
    response_done = False
    down_chunked = False
    close_after = False
    discard = False
    interim = False
    ctx: RequestContext | None = None
    fast: FastRequest | None = None  # admitted by the plugins' fast_access (no ctx)
    counted = False

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.pending: list[bytes] | None = []  # body held until an upstream is attached; None once streaming


class ClientConnection:
    """One client TCP connection (uvicorn's httptools protocol shape): callbacks drive everything, a task is made
    only to connect an upstream or to run async plugin phases.

    An asyncio protocol by its methods, not by subclassing asyncio.Protocol: mypyc compiles this module (setup.py)
    and a compiled class cannot extend a Python one; the event loop only ever calls the methods."""

    def __init__(self, worker: GatewayWorker) -> None:
        self.gw = worker
        self.settings = worker.settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = "0.0.0.0"
        self.client_ip_b = b"0.0.0.0"
        self.current: Request | None = None
        self.parsing: Request | None = None
        self.queue: deque[Request] = deque()
        self.down_buf: list[bytes] = []
        self.in_head = True
        self.head_bytes = 0
        self.head_started = worker.clock
        self.last_activity = worker.clock
        self.up_activity = worker.clock
        self.reading_paused = False
        self.up_paused = False
        self.up_paused_at = 0.0
        self.down_paused = False
        self.down_paused_at = 0.0
        self.pending_size = 0
        self.closing = False  # answer the current request with Connection: close, then close
        self.closed = False
        self.upgraded = False  # the parser is done: the connection became (or is becoming) a tunnel
        self.tunnel: UpstreamConnection | None = None
        self.error_pending: _Refuse | None = None
        self.head_held_at = -1  # index in down_buf of a response head held back (HEAD_HOLD); -1: none
        self.head_timer: asyncio.TimerHandle | None = None
        self.tls = False  # accepted on the TLS port (the SSL transport decrypts below this protocol)
        self.proto_b = b"http"

    # ---- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
            self.client_ip_b = peer[0].encode()
        if transport.get_extra_info("sslcontext") is not None:
            self.tls = True
            self.proto_b = b"https"
        self.xff_line = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: " % (
            self.client_ip_b, self.proto_b)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gw.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.connections.discard(self)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        req = self.current
        if self.tunnel is not None:
            self.tunnel.client = None
            self.tunnel.close()
            self.tunnel = None
        if req is not None:
            if req.upstream is not None:
                self._release(req, reusable=False)
            self._log_phase(req)
        self.current = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.gw.clock
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.transport.write(data)  # type: ignore[union-attr]
            return
        if self.upgraded:
            req = self.current
            if req is not None and req.pending is not None:
                req.pending.append(data)
                self.pending_size += len(data)
                self._update_reading()
            return
        was_in_head = self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._client_upgraded(data[exc.args[0] if exc.args else len(data) :])
        except _Refuse as exc:
            self._refuse(exc)
            return
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause)
            else:
                self._refuse(_Refuse(400, "Bad request"))
            return
        if self.in_head:
            self.head_bytes = (self.head_bytes if was_in_head else 0) + len(data)
            if self.head_bytes > self.settings.max_header_size:
                self._refuse(_Refuse(431, "Request header fields too large"))
                return
        if self.down_buf:
            self.flush_down()

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish the response in flight, then close (no more requests can come).
        if self.current is None:
            return None
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self.down_paused = True
        self.down_paused_at = self.gw.clock
        up = self.tunnel or (self.current.upstream if self.current is not None else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.down_paused = False
        up = self.tunnel or (self.current.upstream if self.current is not None else None)
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    # ---- httptools request callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Request()
        if not self.in_head:
            self.in_head = True
            self.head_bytes = 0
            self.head_started = self.gw.clock

    def on_url(self, url: bytes) -> None:
        self.parsing.url += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.nheaders += 1
        req.hsize += len(name) + len(value) + 4
        if req.nheaders > self.settings.max_headers or req.hsize > self.settings.max_header_size:
            raise _Refuse(431, "Request header fields too large")
        if not self.in_head:
            # A chunked body's trailer (the head was complete): dropped, as nginx does. Merged into the head it
            # would let a client set what we set (X-Forwarded-For) or what plugins judged (credentials) after they
            # judged it; sent on as trailers, upstreams that merge trailers into headers would do the same.
            return
        special = REQUEST_KIND.get(name, -1)
        if special == -1:
            special = request_kind(name)
        if special is None:
            req.headers.append((name, value))
        elif special == H_HOST:
            if req.host is not None:
                raise _Refuse(400, "Bad request: more than one Host header")
            req.host = value
        elif special == H_CL:
            req.content_length = value
        elif special == H_TE:
            req.te = value if req.te is None else req.te + b", " + value
        elif special == H_CONNECTION:
            req.connection = value if req.connection is None else req.connection + b", " + value
        elif special == H_UPGRADE:
            req.upgrade_value = value
        elif special == H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif special == H_VIA:
            req.via = value if req.via is None else req.via + b", " + value

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        parser = self.parser
        self.in_head = False
        req.method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        if not req.keep_alive or req.connection is not None:
            req.version = parser.get_http_version()
        # else: only HTTP/1.1 is persistent without a Connection header; the class default "1.1" holds, and
        # httptools' get_http_version() (a new formatted str per call) is skipped on the common path.
        if req.te is not None:
            if req.te.strip().lower() != b"chunked":
                raise _Refuse(400, "Bad request: unsupported Transfer-Encoding")
            req.chunked = True
        length = 0
        if req.content_length is not None:
            length = int(req.content_length)  # llhttp accepted only digits
        limit = self.settings.max_body_size
        if limit and length > limit:
            raise _Refuse(413, "Request size limit exceeded")
        req.has_body = req.chunked or length > 0
        if req.method == b"CONNECT":
            raise _Refuse(400, "Bad request: CONNECT is not supported")
        if req.upgrade_value is not None and parser.should_upgrade():
            req.upgrade = True
            req.keep_alive = False  # no HTTP after an upgrade attempt on this connection
        if req.connection is not None and req.connection.lower() not in (b"keep-alive", b"close", b"upgrade"):
            tokens = {t.strip().lower() for t in req.connection.split(b",")} - {b"keep-alive", b"close", b"upgrade"}
            if tokens:  # headers the client declared hop-by-hop
                req.headers = [(n, v) for n, v in req.headers if n.lower() not in tokens]
        url = req.url
        if url[:1] == b"/":
            q = url.find(b"?")
            if q >= 0:
                req.path, req.query = url[:q], url[q + 1 :]
            else:
                req.path = url
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Refuse(400, "Bad request: invalid request target") from None
            req.path = parsed.path or b"/"
            req.query = parsed.query or b""
            if parsed.host:
                req.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        else:
            raise _Refuse(400, "Bad request: invalid request target")
        path = req.path
        if b"%" in path or b"//" in path or b"/." in path or b";" in path:  # paths.needs_canonical, inlined
            try:
                req.path = canonical_path(path)
            except InvalidPath as exc:
                raise _Refuse(400, f"Bad request: {exc}") from None
            req.strict_path = strict_view(req.path)
        if req.host is None:
            if req.version != "1.0":
                raise _Refuse(400, "Bad request: missing Host header")
            req.host = b""
        if self.current is None:
            self.current = req
            self._dispatch(req)
        else:
            self.queue.append(req)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.body_received += len(body)
        limit = self.settings.max_body_size
        if limit and req.body_received > limit:
            raise _Refuse(413, "Request size limit exceeded")
        if req.discard:
            return
        up = req.upstream
        if up is not None and req.pending is None:
            if req.chunked:
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))  # type: ignore[union-attr]
            else:
                up.transport.write(body)  # type: ignore[union-attr]
            return
        if req.pending is not None:
            req.pending.append(body)
            self.pending_size += len(body)
            if self.pending_size > MAX_PENDING:
                self._update_reading()

    def on_message_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self.parsing = None
        req.complete = True
        if req.upgrade:
            return  # HttpParserUpgrade follows; the tunnel decides what happens next
        if req.upstream is not None and req.pending is None and req.chunked and not req.discard:
            req.upstream.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        if req.response_done and req is self.current:
            self._finish(req)

    # ---- dispatch ------------------------------------------------------------------------------------------
    def _dispatch(self, req: Request) -> None:
        gw = self.gw
        table = gw.table
        raw_host = req.host or b""
        host = gw.host_names.get(raw_host)
        if host is None:
            host = raw_host
            colon = host.rfind(b":")
            if colon > 0 and host[colon + 1 :].isdigit() and not host.endswith(b"]"):
                host = host[:colon]
            host = host.lower()
            if len(gw.host_names) > 10000:
                gw.host_names.clear()
            gw.host_names[raw_host] = host
        if req.path[:5] == b"/docs" and is_builtin_path(req.path):
            gw.spawn(self._builtin(req, table))
            return
        match = table.match(req.method, host, req.path,
                            (lambda: self._header_map(req)) if table.uses_headers else None)
        if req.strict_path is not None and self._ambiguous(req, host, match, table):
            self._respond(req, 400, AMBIGUOUS_PATH)
            return
        if match is None:
            self._respond(req, 404, NO_ROUTE)
            return
        req.match = match
        if match.route.spec.https_redirect and not self.tls:
            self._https_redirect(req, match.route.spec.https_redirect, host)
            return
        chain = match.route.plugins
        if chain is not None:
            route = match.route
            if route.fast_plugins is not None and self._fast_access(req, route, table):
                self._forward(req)
                return
            req.ctx = ctx = self._context(req, match, table)
            self._drive(req, chain.run_access(ctx))
            return
        self._forward(req)

    def _https_redirect(self, req: Request, status: int, host: bytes) -> None:
        """A route with protocols: [https] met on plain HTTP: Kong's 426, or a redirect to the TLS port."""
        if status == 426:
            self._respond(req, 426, json_body("Please use HTTPS protocol"),
                          [(b"Connection", b"Upgrade"), (b"Upgrade", b"TLS/1.2, HTTP/1.1")])
            return
        port = self.gw.tls_port_b
        authority = host if port == b"443" or not port else host + b":" + port
        target = req.url if req.url.startswith(b"/") else req.path
        self._respond(req, status, b"", [(b"Location", b"https://" + authority + target)], json=False)

    def _ambiguous(self, req: Request, host: bytes, match: Match | None, table: Any) -> bool:
        """True when the path read as a server that decodes %2F and strips ;parameters would read it picks another
        route than its canonical form (paths.py): forwarding it could reach what that route's plugins guard."""
        strict = table.match(req.method, host, req.strict_path,
                             (lambda: self._header_map(req)) if table.uses_headers else None)
        return (strict.route if strict is not None else None) is not (match.route if match is not None else None)

    def _fast_access(self, req: Request, route: Any, table: Any) -> bool:
        """The plugins' fast_access, in order: True when all admitted the request (then it goes upstream with what
        they added and no RequestContext); False to run the chain the usual way."""
        fast = FastRequest(req.headers, req.query, self.client_ip, route.spec.id, route.backend.spec.name,
                           table.consumers, self.gw.counters)
        try:
            for plugin in route.fast_plugins:
                if not plugin.fast_access(fast):
                    return False
        except Exception:
            log.exception("plugin fast access failed on route %s", route.spec.id)
            return False  # the usual way answers what the plugin's access() makes of it
        req.fast = fast
        return True

    async def _builtin(self, req: Request, table: Any) -> None:
        """/docs: answered by the worker itself (gateway/builtin.py), whatever the routes say."""
        try:
            status, headers, body = await self.gw.builtins.answer(req.method, req.path.decode("latin-1"), table)
        except Exception:
            log.exception("answering %r failed", req.path)
            status, headers, body = 500, [], json_body("An unexpected error occurred")
        if not self.closed and req is self.current:
            extra = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
            self._respond(req, status, body, extra, json=not extra)

    def _header_map(self, req: Request) -> dict[str, str]:
        out = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in req.headers}
        out["host"] = (req.host or b"").decode("latin-1")
        return out

    def _drive(self, req: Request, coro: Any) -> None:
        """Runs the access phase (chain.run_access) without a Task: plugins almost always finish without suspending,
        and a Task per request costs more than the plugins. When one does await a future, we resume it when the
        future is done (what Task.__step does), so awaiting futures, tasks and sleeps works as usual."""
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            self._accessed(req, done.value)
            return
        except Exception:
            log.exception("plugin access phase failed on route %s", req.match.route.spec.id)  # type: ignore[union-attr]
            self._accessed(req, Reject(500, "An unexpected error occurred"))
            return
        if yielded is None:  # a bare yield: asyncio.sleep(0)
            self.gw.loop.call_soon(self._drive, req, coro)
        elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(lambda _: self._drive(req, coro))
        else:
            coro.close()
            log.error("a plugin awaited %r, which is not an asyncio future", yielded)
            self._accessed(req, Reject(500, "An unexpected error occurred"))

    def _context(self, req: Request, match: Match, table: Any) -> RequestContext:
        names = HEADER_NAME_STR
        headers = [(names.get(n) or header_name_str(n), v.decode("latin-1")) for n, v in req.headers]
        ctx = RequestContext(
            method=req.method.decode("latin-1"), path=req.path.decode("latin-1"),
            query=req.query.decode("latin-1"), host=(req.host or b"").decode("latin-1"), client_ip=self.client_ip,
            scheme="http", request_headers=headers, route_id=match.route.spec.id,
            service_name=match.route.backend.name, started_at=time.time(),
            body_size=int(req.content_length) if req.content_length is not None else None,
            shared={"consumers": table.consumers, "match": match, "counters": self.gw.counters},
        )
        return ctx

    def _accessed(self, req: Request, reject: Reject | None) -> None:
        """The access phase is over: answer the rejection, or forward."""
        if self.closed or req is not self.current:
            return
        if reject is not None:
            ctx = req.ctx
            assert ctx is not None
            body = reject.body if reject.body is not None else reject_body(reject)
            extra = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in [*ctx.response_headers, *reject.headers]]
            has_type = any(n.lower() == b"content-type" for n, _ in extra)
            ctx.upstream_status = reject.status
            self._respond(req, reject.status, body, extra, json=not has_type)
            return
        self._forward(req)

    def _forward(self, req: Request) -> None:
        match = req.match
        assert match is not None
        backend = match.route.backend
        balancer = backend.balancer
        if not req.attempts:
            budget = self.gw.budget
            budget.tokens = min(budget.cap, budget.tokens + budget.ratio)
        key = self._hash_key(req, balancer.spec) if balancer.needs_key else None
        target = balancer.pick(self.gw.board, key, req.excluded or ())
        if target is None and req.fresh_retry and req.target is not None:
            # No other instance: the one whose pooled connection was closed under us, on a new connection.
            req.fresh_retry = False
            self._spawn_connect(req, req.target)
            return
        if target is None:
            if req.attempts:
                self._respond(req, 502, json_body("An invalid response was received from the upstream server"))
            else:
                self._respond(req, 503, json_body(f"no healthy instance of service '{backend.name}'"))
            return
        req.target = target
        spec = backend.spec
        pool_key = tls_pool_key(target.address, spec.tls_verify) if spec.tls else target.address
        if req.method in IDEMPOTENT and not req.has_body:
            conn = self.gw.pool.take(pool_key)  # closed under us: found out after the write, and retried
        else:
            # Written once only: a pooled connection whose close the loop has not handled yet is skipped now.
            conn = self.gw.pool.take_live(pool_key)
        if conn is not None:
            self._attach(req, conn)
        else:
            self._spawn_connect(req, target)

    def _spawn_connect(self, req: Request, target: Target) -> None:
        req.connecting = target
        req.connect_started = self.gw.clock
        self.gw.spawn(self._connect(req, target))

    def _hash_key(self, req: Request, spec: Any) -> bytes | None:
        if spec.hash_on == "ip":
            return self.client_ip_b
        if spec.hash_on == "header":
            wanted = spec.hash_on_header.encode()
            for name, value in req.headers:
                if name.lower() == wanted:
                    return value
            return None
        if spec.hash_on == "cookie":
            wanted = spec.hash_on_cookie.encode() + b"="
            for name, value in req.headers:
                if name.lower() == b"cookie":
                    for part in value.split(b";"):
                        part = part.strip()
                        if part.startswith(wanted):
                            return part[len(wanted) :]
        return None

    async def _connect(self, req: Request, target: Target) -> None:
        backend = req.match.route.backend  # type: ignore[union-attr]
        try:
            conn = await self.gw.pool.connect(target, backend.spec.connect_timeout, backend.spec.tls,
                                              backend.spec.tls_verify)
        except (OSError, TimeoutError) as exc:
            if self.closed or req is not self.current or req.connecting is not target:
                return  # the request is over, or went elsewhere when this connect was abandoned
            req.connecting = None
            self._upstream_failure(req, target, timeout=isinstance(exc, TimeoutError), connect=True,
                                   refused=isinstance(exc, ConnectionError))
            self.flush_down()
            return
        if self.closed or req is not self.current or req.response_done or req.connecting is not target:
            self.gw.pool.give_back(conn, self.gw.clock)
            return
        req.connecting = None
        self._attach(req, conn)

    def _attach(self, req: Request, conn: UpstreamConnection) -> None:
        req.upstream = conn
        conn.client = self
        conn.body_started = False
        req.attempts += 1
        self.up_activity = self.gw.clock
        if req.match.route.backend.balancer.tracks_active:  # type: ignore[union-attr]
            self.gw.board.state(conn.address).active += 1
            req.counted = True
        head = self._request_head(req, conn)
        pending = req.pending
        if req.upgrade:
            conn.transport.write(head)  # type: ignore[union-attr]
            return  # what the client sent after its upgrade request waits for the 101
        if pending:
            parts = [head]
            if req.chunked:
                for chunk in pending:
                    parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            else:
                parts += pending
            if req.complete and req.chunked:
                parts.append(b"0\r\n\r\n")
            if req.complete:
                req.replay = pending  # the whole body: it can be sent again if this attempt fails before an answer
            self.pending_size = 0
            req.pending = None
            conn.transport.writelines(parts)  # type: ignore[union-attr]
            self._update_reading()
            return
        req.pending = None
        if req.complete and req.chunked:
            head += b"0\r\n\r\n"
        conn.transport.write(head)  # type: ignore[union-attr]

    def _request_head(self, req: Request, conn: UpstreamConnection) -> bytes:
        match = req.match
        assert match is not None and req.target is not None
        path = match.upstream_path
        parts = [req.method, b" ", path]
        if req.query:
            parts += (b"?", req.query)
        host = req.host if match.route.spec.preserve_host and req.host else req.target.host_header
        parts += (b" HTTP/1.1\r\nHost: ", host, b"\r\n")
        ctx = req.ctx
        if ctx is None:
            fast = req.fast
            if fast is None:
                for name, value in req.headers:
                    parts += (name, b": ", value, b"\r\n")
            else:
                drop = fast.drop
                for name, value in req.headers:
                    if drop is None or name.lower() not in drop:
                        parts += (name, b": ", value, b"\r\n")
                parts.append(fast.upstream_block)
        else:
            rewritten = REWRITTEN_NAME
            lines = []
            for text_name, text_value in ctx.request_headers:
                dropped = rewritten.get(text_name)
                if dropped is None:
                    dropped = rewritten_name(text_name)
                if not dropped:
                    lines.append(f"{text_name}: {text_value}\r\n")
            if lines:
                parts.append("".join(lines).encode("latin-1"))  # one encode for all of them
        if req.xff is None:
            parts += (self.xff_line, req.host or b"")
        else:
            parts += (b"X-Forwarded-For: ", req.xff, b", ", self.client_ip_b,
                      b"\r\nX-Forwarded-Proto: ", self.proto_b, b"\r\nX-Forwarded-Host: ", req.host or b"")
        if req.via is None:
            parts.append(self.gw.tls_forwarded_tail if self.tls else self.gw.forwarded_tail)
        else:
            parts += (b"\r\nX-Forwarded-Port: ", self.gw.tls_port_b if self.tls else self.gw.port_b, b"\r\nVia: ",
                      req.via, b", ", self.settings.via, b"\r\n")
        if req.upgrade:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", req.upgrade_value or b"", b"\r\n")
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts += (b"Content-Length: ", req.content_length, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # ---- upstream callbacks --------------------------------------------------------------------------------
    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.current
        if req is None or req.upstream is not conn:
            return
        self.up_activity = self.gw.clock
        if 100 <= status < 200 and status != 101:
            req.interim = True
            if status == 100 and not req.head_sent:
                self.down_buf.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        if status == 101 and not req.upgrade:
            self._upstream_failure(req, req.target, timeout=False, connect=False, invalid=True)  # type: ignore[arg-type]
            return
        ctx = req.ctx
        if ctx is not None:
            ctx.upstream_status = status
            ctx.upstream_latency = time.time() - ctx.started_at
            route = req.match.route  # type: ignore[union-attr]
            if route.response_phase:
                ctx.upstream_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
                try:
                    route.plugins.run_response(ctx)  # type: ignore[union-attr]
                except Exception:
                    log.exception("plugin response phase failed on route %s", ctx.route_id)
                status = ctx.upstream_status
                headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ctx.upstream_headers]
        parts = [status_line(status)]
        chunked_up = False
        has_length = False
        via = None
        if ctx is not None and ctx.response_headers:
            # Headers added by plugins, made into one str and encoded once (not two encodes per header).
            lines = []
            plugin_kinds = PLUGIN_RESPONSE_KIND
            for text_name, text_value in ctx.response_headers:
                kind = plugin_kinds.get(text_name)
                if kind is None:
                    kind = plugin_response_kind(text_name)
                if kind == 2:
                    headers = [*headers, (text_name.encode("latin-1"), text_value.encode("latin-1"))]  # judged below
                    continue
                if kind == 1:
                    has_length = True
                lines.append(f"{text_name}: {text_value}\r\n")
            plugin_block = "".join(lines).encode("latin-1")
        elif req.fast is not None:
            plugin_block = req.fast.response_block
        else:
            plugin_block = b""
        kinds = RESPONSE_KIND
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                kind = response_kind(name)
            if kind == 0:
                parts += (name, b": ", value, b"\r\n")
                continue
            lname = name.lower()
            if kind == 2:
                if lname == b"transfer-encoding":
                    chunked_up = True
                elif lname == b"via":
                    via = value
                elif status == 101 and lname in (b"upgrade", b"connection"):
                    parts += (name, b": ", value, b"\r\n")
                continue
            if lname == b"content-length":
                has_length = True
            parts += (name, b": ", value, b"\r\n")
        if plugin_block:
            parts.append(plugin_block)  # after the upstream's own, as a plugin's headers always came
        no_body = req.method == b"HEAD" or status in (204, 304) or status == 101
        if no_body:
            if chunked_up and status != 101:
                parts.append(b"Transfer-Encoding: chunked\r\n")
        elif chunked_up or not has_length:
            if req.version == "1.1":
                req.down_chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                req.close_after = True  # an HTTP/1.0 client reads to the close
        parts += (b"Via: ", self.settings.via if via is None else via + b", " + self.settings.via, b"\r\n")
        if status != 101:
            if self.closing or not req.keep_alive or req.close_after or not req.complete or self.gw.stopping:
                req.close_after = True
                parts.append(b"Connection: close\r\n")
            elif req.version == "1.0":
                parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not no_body and (chunked_up or has_length):
            # Held until a body byte comes (flush_down, HEAD_HOLD). Not a close-delimited body: there, a close
            # right after the head is a whole (empty) response, not a failure.
            self.head_held_at = len(self.down_buf)
        self.down_buf += parts
        req.head_sent = True
        if status == 101:
            conn.tunnel = True
            self.tunnel = conn
            return
        if req.method == b"HEAD":
            # The response parser does not know the request was HEAD and would wait for Content-Length bytes.
            conn.reset_parser = True
            self.upstream_done(conn)

    def upstream_body(self, body: bytes) -> None:
        req = self.current
        if req is None:
            return
        self.up_activity = self.gw.clock
        if self.head_held_at >= 0:
            self._head_hold_over()
        if req.down_chunked:
            self.down_buf += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.down_buf.append(body)

    def upstream_done(self, conn: UpstreamConnection) -> None:
        req = self.current
        if req is None or req.upstream is not conn or conn.tunnel:
            return
        if req.interim:
            req.interim = False
            return
        if req.response_done:
            return
        if self.head_held_at >= 0:
            self._head_hold_over()
        if req.down_chunked:
            self.down_buf.append(b"0\r\n\r\n")
        req.response_done = True
        self.gw.board.report_success(conn.address)
        self._release(req, reusable=conn.keep_alive and req.complete and not req.upgrade)
        self._log_phase(req)
        if req.complete or req.close_after:
            self._finish(req)

    def upstream_upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols: from now on bytes flow unparsed both ways."""
        conn = self.tunnel
        req = self.current
        if conn is None or req is None:
            return
        if rest:
            self.down_buf.append(rest)
        self.flush_down()
        if req.pending:
            conn.transport.writelines(req.pending)  # type: ignore[union-attr]
        req.pending = None
        self.pending_size = 0
        self._update_reading()

    def tunnel_from_upstream(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed while this client owned it."""
        if conn is self.tunnel:
            self.tunnel = None
            if self.transport is not None:
                self.transport.close()
            return
        req = self.current
        if req is None or req.upstream is not conn or req.response_done:
            return
        if self.head_held_at >= 0:
            self._unsend_head(req)  # the client saw nothing yet: this can still be retried or answered 502
        if req.head_sent and not req.down_chunked and not req.close_after:
            # Content-Length body cut short: closing is the only way to tell the client.
            self._release(req, reusable=False)
            self._abort()
            return
        if req.head_sent:
            # Close-delimited (or chunked) body ended by the close: end it properly for the client.
            if req.down_chunked and not conn.keep_alive:
                self.down_buf.append(b"0\r\n\r\n")
                req.response_done = True
                self._release(req, reusable=False)
                self._finish(req)
                return
            if req.close_after and not req.down_chunked:
                req.response_done = True
                self._release(req, reusable=False)
                self._finish(req)
                return
            self._release(req, reusable=False)
            self._abort()
            return
        stale = conn.reused and not conn.body_started  # a kept-alive connection the upstream had just closed
        self._upstream_failure(req, req.target, timeout=False, connect=False, stale=stale)  # type: ignore[arg-type]
        self.flush_down()

    def upstream_failed(self, conn: UpstreamConnection, message: str, *, timeout: bool) -> None:
        req = self.current
        if req is None or req.upstream is not conn:
            return
        if self.head_held_at >= 0:
            self._unsend_head(req)
        if req.head_sent:
            self._release(req, reusable=False)
            self._abort()
            return
        self._upstream_failure(req, req.target, timeout=timeout, connect=False, invalid=True)  # type: ignore[arg-type]

    def upstream_write_paused(self, paused: bool) -> None:
        self.up_paused = paused
        self.up_paused_at = self.gw.clock
        self._update_reading()

    def _upstream_failure(self, req: Request, target: Target, *, timeout: bool, connect: bool,
                          stale: bool = False, invalid: bool = False, refused: bool = False) -> None:
        """A failed attempt before any response byte reached the client: retry it elsewhere or answer 502/504.

        Retried (nginx's and Go's rules): a failed connect, for any method (nothing was sent, the body is still
        held); a pooled connection closed under us before any answer (`stale`), for idempotent methods; any other
        failure before an answer, for idempotent methods within the retry budget. A body is sent again only when
        it was held whole; a streamed one cannot be."""
        if req.upstream is not None:
            self._release(req, reusable=False)
        backend = req.match.route.backend  # type: ignore[union-attr]
        if refused:
            # Refused (or reset while connecting): nothing listens there now. Eject it at once so the requests after
            # this one do not try it, and drop its pooled connections: they are as dead as it is.
            self.gw.board.eject(target.address, backend.spec.balancing)
            self.gw.pool.drop(target.address)
        elif not stale:
            self.gw.board.report_failure(target.address, backend.spec.balancing)
        body_held = not req.has_body or req.pending is not None or req.replay is not None
        retryable = (
            not req.upgrade and not invalid and body_held and (connect or req.method in IDEMPOTENT)
            and req.attempts <= backend.spec.retries and (stale or self.gw.budget.withdraw())
        )
        if retryable:
            if req.excluded is None:
                req.excluded = set()
            req.excluded.add(target.address)
            req.fresh_retry = stale
            if req.pending is None:
                req.pending = list(req.replay) if req.replay is not None else []
            self._forward(req)
            return
        if timeout:
            self._respond(req, 504, json_body("The upstream server is timing out"))
        else:
            self._respond(req, 502, json_body("An invalid response was received from the upstream server"))

    def _release(self, req: Request, *, reusable: bool) -> None:
        conn = req.upstream
        if conn is None:
            return
        req.upstream = None
        if req.counted:
            req.counted = False
            self.gw.board.state(conn.address).active -= 1
        if conn.client is self:
            conn.client = None
        if reusable:
            conn.reused = False
            self.gw.pool.give_back(conn, self.gw.clock)
        else:
            conn.abort() if not conn.keep_alive or conn.transport is None else conn.close()

    # ---- answering ------------------------------------------------------------------------------------------
    def _respond(self, req: Request, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None,
                 json: bool = True) -> None:
        """A response made by the gateway itself (no route, no instance, plugin rejection, upstream failure)."""
        close = self.closing or not req.keep_alive or (req.has_body and not req.complete) or self.gw.stopping
        parts = [status_line(status)]
        if json:
            parts.append(b"Content-Type: application/json; charset=utf-8\r\n")
        if extra:
            for name, value in extra:
                parts += (name, b": ", value, b"\r\n")
        if status == 204 or status == 304:
            body = b""  # no body and no Content-Length (RFC 9110 8.6)
            parts.append(b"Server: shipyard\r\n")
        else:
            parts.append(b"Content-Length: %d\r\nServer: shipyard\r\n" % len(body))
        parts += (b"Connection: close\r\n\r\n" if close else b"\r\n", body)
        self.down_buf += parts
        req.head_sent = True
        req.response_done = True
        req.discard = True
        if close:
            req.close_after = True
        if req.upstream is not None:
            self._release(req, reusable=False)
        if req.ctx is not None:
            req.ctx.upstream_status = req.ctx.upstream_status or status
        self._log_phase(req)
        if req.complete or close:
            self._finish(req)
        self.flush_down()  # also when called outside data_received (after a plugin or a connect awaited)

    def _log_phase(self, req: Request) -> None:
        ctx = req.ctx
        if ctx is not None and req.match is not None and req.match.route.log_phase:
            req.ctx = None
            req.match.route.plugins.run_log(ctx)  # type: ignore[union-attr]

    def _finish(self, req: Request) -> None:
        """The exchange is over: next pipelined request, wait for one, or close."""
        if req is not self.current:
            return
        self.current = None
        if self.closing or req.close_after or not req.keep_alive or not req.complete or self.gw.stopping:
            self.flush_down()
            self._close()
            return
        if self.error_pending is not None:
            self._refuse(self.error_pending)
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            self._dispatch(nxt)
        else:
            self.last_activity = self.gw.clock
        self._update_reading()

    def _refuse(self, exc: _Refuse) -> None:
        """A protocol error (400/408/413/431): answer it once the exchange in flight is done, then close."""
        if self.closed:
            return
        if self.current is not None and self.current.head_sent and not self.current.response_done:
            self.error_pending = exc
            self.upgraded = True  # the parser is in an error state: read no more requests
            self._update_reading()
            return
        req = self.current
        if req is not None and req.upstream is not None:
            self._release(req, reusable=False)
        self.current = None
        self.queue.clear()
        body = json_body(exc.message)
        self.down_buf += (status_line(exc.status),
                          b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
                          b"Server: shipyard\r\nConnection: close\r\n\r\n", body)
        self.flush_down()
        self._close()

    def _client_upgraded(self, rest: bytes) -> None:
        self.upgraded = True
        req = self.current
        if req is None or not req.upgrade:
            self._refuse(_Refuse(400, "Bad request"))
            return
        if rest and req.pending is not None:
            req.pending.append(rest)
            self.pending_size += len(rest)

    def flush_down(self) -> None:
        buf = self.down_buf
        if not buf or self.transport is None:
            return
        held = self.head_held_at
        if held >= 0:
            if self.head_timer is None:
                self.head_timer = self.gw.loop.call_later(HEAD_HOLD, self._head_hold_expired)
            if held == 0:
                return
            self.down_buf = buf[held:]
            self.head_held_at = 0
            buf = buf[:held]
        else:
            self.down_buf = []
        # One contiguous buffer: uvloop's writev over many small pieces costs more than copying them once.
        self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def _head_hold_over(self) -> None:
        """A body byte came or the response ended: the held head goes out with them (the caller flushes)."""
        self.head_held_at = -1
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_hold_expired(self) -> None:
        """HEAD_HOLD passed with no body byte (a slow stream): the client gets the head now."""
        self.head_timer = None
        if self.head_held_at >= 0:
            self.head_held_at = -1
            if not self.closed:
                self.flush_down()

    def _unsend_head(self, req: Request) -> None:
        """The instance failed after its response head and before any body byte: the client never saw that head."""
        del self.down_buf[self.head_held_at :]
        self.head_held_at = -1
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        req.head_sent = req.down_chunked = req.close_after = False
        if req.ctx is not None:
            req.ctx.upstream_status = 0

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        pause = self.up_paused or bool(self.queue) or self.pending_size > MAX_PENDING or (
            self.error_pending is not None) or (self.upgraded and self.tunnel is None and self.pending_size > 0)
        if pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def _abort(self) -> None:
        self.down_buf = []
        self.head_held_at = -1
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # ---- timeouts (called by the worker's ticker, about twice a second) ----------------------------------------
    def abandon_unrouted(self, routed: frozenset[str], now: float, silence: float) -> None:
        """The request in flight waits on an instance no longer in the route table (its checks went critical: its
        node's link cut, its agent gone) and has heard nothing from it for `silence` seconds: it goes to another
        instance now instead of waiting for the connect or read timeout, by the usual retry rules (a connect: any
        method, nothing was sent; a request sent: idempotent methods, within the retry budget; else 504). Nothing
        of an answer may have reached the client yet."""
        req = self.current
        if req is None or self.closed or self.tunnel is not None or req.head_sent or req.response_done:
            return
        target = req.connecting
        if target is not None:
            if target.address not in routed and now - req.connect_started >= silence:
                req.connecting = None  # its connect, when it ends, finds the request gone elsewhere
                self._upstream_failure(req, target, timeout=True, connect=True)
                self.flush_down()
            return
        target = req.target
        if req.upstream is None or target is None or target.address in routed or not req.complete or req.upgrade:
            return
        if self.up_paused or now - self.up_activity < silence:
            return
        self._upstream_failure(req, target, timeout=True, connect=False)
        self.flush_down()

    def check_timeouts(self, now: float) -> None:
        s = self.settings
        if self.down_paused and now - self.down_paused_at > s.write_timeout:
            self._abort()  # the client stopped reading
            return
        if self.tunnel is not None or self.closed:
            return
        req = self.current
        if req is None:
            if self.parsing is not None or self.in_head:
                # A request head in progress, or a new connection that has not sent one: slowloris gets 408.
                if now - self.head_started > s.header_timeout:
                    self._refuse(_Refuse(408, "Request timeout"))
            elif now - self.last_activity > s.keepalive_timeout:
                self._close()
            return
        conn = req.upstream
        if self.up_paused and conn is not None:
            # The upstream stopped reading the request (Kong's write_timeout): drop it, buffered bytes and all, so a
            # slow reader holds nothing of ours; the client was paused for its sake, so this is not the client's 408.
            if now - self.up_paused_at > req.match.route.backend.spec.write_timeout:  # type: ignore[union-attr]
                self._release(req, reusable=False)
                conn.abort()
                self.up_paused = False
                if req.head_sent:
                    self._abort()
                else:
                    self._respond(req, 504, json_body("The upstream server is timing out"))
            return
        if not req.complete and not req.upgrade:
            if now - self.last_activity > s.body_timeout:
                if req.head_sent:
                    self._release(req, reusable=False)
                    self._abort()
                else:
                    self._refuse(_Refuse(408, "Request timeout"))
            return
        if req.upstream is not None and not req.response_done and not self.down_paused:
            read_timeout = req.match.route.backend.spec.read_timeout  # type: ignore[union-attr]
            if now - self.up_activity > read_timeout:
                if req.head_sent:
                    self._release(req, reusable=False)
                    self._abort()
                else:
                    self._upstream_failure(req, req.target, timeout=True, connect=False,  # type: ignore[arg-type]
                                           invalid=True)
                    self.flush_down()

