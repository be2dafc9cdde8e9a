"""An agent's local HTTP API: 127.0.0.1:--http-port (default 8500, as a Consul client agent's), where the agent's
instances (SHIPYARD_HTTP_ADDR / CONSUL_HTTP_ADDR) and the machine's tools reach the platform. Every request is
forwarded as it came (method, path, query, headers with the caller's own token, body) to a live server and the
answer streamed back as it arrives (blocking queries, `logs -f`, watch streams), so a server failover needs
nothing from the instances.

It owns the choice of server (the next --server when one cannot be connected to) and nothing else: it never adds
the agent's own token to a request, never answers from anything but a server, never sends a request twice once it
may have reached a server (except GET and HEAD, which change nothing), and never logs a token (no headers, no
query strings in its log lines).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aiohttp
from aiohttp import hdrs, web

from shipyard.api.guard import RequestGuard
from shipyard.errors import ShipyardError

log = logging.getLogger("shipyard.agent")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_HTTP_PORT = 8500
MAX_BODY = 32 * 1024 * 1024  # a request body beyond this is refused (413) before anything is sent on
# Connecting is bounded (a dead server is left for the next quickly); reading is not: a blocking query waits up to
# 10 minutes plus jitter and a followed log may stay silent much longer, and the caller decides when to give up.
CONNECT_TIMEOUT = 3.0
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=None)
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp sets itself for the new connection.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
IDEMPOTENT = frozenset({"GET", "HEAD"})


def _forwardable(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every end-to-end header as it came (repeated ones too): the caller's X-Consul-Token or Authorization goes
    to the server, never into a log."""
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


class Forwarder:
    """Forwards requests to one server at a time among `servers`, moving on when one cannot be reached."""

    def __init__(self, servers: Sequence[str], ssl_context: ssl.SSLContext | None) -> None:
        self.servers = [url.rstrip("/") for url in servers]
        self.current = 0
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        # A server checks Host and Origin against its own names, but it sees the Host of the agent's request: the
        # local listener checks them itself (a page whose name was rebound to 127.0.0.1 gets nothing).
        self.guard = RequestGuard(["127.0.0.1", "localhost"])
        self.runner: web.AppRunner | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else True,
                                             limit=0)
            # auto_decompress off: a compressed answer goes back byte for byte with its Content-Encoding.
            self._session = aiohttp.ClientSession(connector=connector, timeout=FORWARD_TIMEOUT,
                                                  auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
            # aiohttp sends a PUT or DELETE again on a new connection when the server dropped the first one
            # (RFC 9110 calls them idempotent; Consul's are not: ?cas, ?acquire, /v1/txn, sessions). This
            # forwarder decides itself what may be sent twice (_send); no public option turns that retry off.
            self._session._retry_connection = False
        return self._session

    @web.middleware
    async def check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self.guard.check_host(request)
            self.guard.check_origin(request)
        except ShipyardError as exc:
            return web.Response(status=exc.status, text=exc.message + "\n")
        return await handler(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None  # bounded by client_max_size (413)
        upstream = await self._send(request, body)
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.release()

    async def _send(self, request: web.Request, body: bytes | None) -> aiohttp.ClientResponse:
        """The server's answer, from the first server that can be connected to; a GET or HEAD is tried on the next
        server after any failure, anything else only when it never left."""
        last = ""
        for _ in range(len(self.servers)):
            server = self.servers[self.current]
            headers = _forwardable(request.headers)
            if hdrs.ORIGIN in request.headers:
                # Same-origin here (checked above), so same-origin there: the server's body checks still see a page.
                headers = [(k, server if k.lower() == "origin" else v) for k, v in headers]
            try:
                return await self.session().request(request.method, server + request.rel_url.raw_path_qs,
                                                    headers=headers, data=body, allow_redirects=False)
            except aiohttp.ClientConnectorError as exc:
                last = f"{server}: {exc.strerror or type(exc).__name__}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{server}: {type(exc).__name__}"  # not str(exc): some name the URL, ?token= and all
                if request.method not in IDEMPOTENT:
                    self._next(server, last)
                    raise web.HTTPBadGateway(text=f"the server may have received this request but did not answer "
                                                  f"({last}); not sent again\n") from None
            self._next(server, last)
        raise web.HTTPServiceUnavailable(text=f"no server can be reached (last: {last})\n")

    def _next(self, failed: str, why: str) -> None:
        if self.servers[self.current] == failed:  # another request may have moved on already
            self.current = (self.current + 1) % len(self.servers)
        log.warning("local API: %s; forwarding to %s from now on", why, self.servers[self.current])

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_forwardable(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # as it arrives: a blocking query's answer, each line of a followed log
        except (TimeoutError, aiohttp.ClientError):
            # The server went away mid-answer: the caller sees a cut stream (its client retries), never a made-up end.
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the server's answer was cut") from None
        await response.write_eof()
        return response

    async def start(self, port: int, local: Callable[[web.Application], None] | None = None) -> int:
        """Listens on 127.0.0.1:port (0: an ephemeral one), forwarding everything but what `local` routes; the port
        bound."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.check])
        if local is not None:
            local(app)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ShipyardError(f"cannot serve the local API on 127.0.0.1:{port} (--http-port): "
                                f"{exc.strerror}", status=2) from None
        sockets = getattr(site._server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("local API on http://127.0.0.1:%d, forwarded to the servers", bound)
        return bound

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self._session is not None:
            await self._session.close()
