"""Connections to upstream instances: one asyncio Protocol each, kept alive in per-instance idle pools.

It parses responses and hands them to the client connection that owns the exchange; it never decides routing,
never retries on its own and never buffers a response body (flow control pauses the side that is ahead).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from shipyard.gateway.own_listeners import OwnListeners
    from shipyard.gateway.proxy import ClientConnection
    from shipyard.gateway.routes import Target

MAX_IDLE_PER_TARGET = 1024
IDLE_TIMEOUT = 4.0  # below the common 5 s keep-alive of upstream servers, so we rarely reuse a closing connection
# What an idle connection must not show: any of these means the peer closed it (or broke protocol) already.
NOT_IDLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)


class UpstreamConnection:
    """One TCP connection to an instance. `client` is the exchange owner while a request is in flight.

    An asyncio protocol by its methods (compiled by mypyc, like ClientConnection: no asyncio.Protocol base)."""

    __slots__ = (
        "address", "body_started", "client", "closed", "fd", "headers", "idle_since",
        "keep_alive", "parser", "pool", "pool_key", "reset_parser", "reused", "transport", "tunnel",
    )

    def __init__(self, pool: UpstreamPool, address: str, pool_key: str = "") -> None:
        self.pool = pool
        self.address = address
        self.pool_key = pool_key or address  # idle connections are kept by it: TLS ones apart from plain ones
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.closed = False
        self.tunnel = False
        self.reused = False
        self.reset_parser = False
        self.body_started = False
        self.idle_since = 0.0
        self.fd = -1

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes on an idle connection: the upstream broke protocol; never hand this connection out again.
            self.close()
            return
        if self.tunnel:
            client.tunnel_from_upstream(data)
            return
        self.body_started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            if self.client is not None:
                self.client.upstream_upgraded(data[offset:])
        except httptools.HttpParserError as exc:
            if self.client is not None:
                self.client.upstream_failed(self, f"invalid response from upstream: {exc}", timeout=False)
            self.close()
            return
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)
        client.flush_down()  # the exchange may have finished (and let go of us) inside feed_data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        client = self.client
        if client is not None:
            self.client = None
            client.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(False)

    # ---- httptools callbacks ----
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        if self.client is not None:
            # (not the HTTP version: httptools formats it as a str on every call, and llhttp already framed the body)
            self.client.upstream_head(self, parser.get_status_code(), self.headers)

    def on_body(self, body: bytes) -> None:
        if self.client is not None:
            self.client.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.client is not None:
            self.client.upstream_done(self)

    # ---- use ----
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def tls_pool_key(address: str, verify: bool) -> str:
    """Where idle TLS connections to `address` are kept: never handed to a plain HTTP backend or to one that
    verifies certificates when they were made without verifying."""
    return f"{address}#tls-verified" if verify else f"{address}#tls"


class UpstreamPool:
    """Idle keep-alive connections per instance address; LIFO so warm connections are reused first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, own: OwnListeners | None = None) -> None:
        self.loop = loop
        self.idle: dict[str, list[UpstreamConnection]] = {}
        self.own = own  # the server's own listeners: a guarded target must not turn out to be one once resolved
        self._tls: dict[bool, ssl.SSLContext] = {}  # upstream TLS contexts, by whether they verify the instance

    def tls_context(self, verify: bool) -> ssl.SSLContext:
        """TLS to instances (a service with protocol https). Kong does not verify upstream certificates unless the
        service says tls_verify; when it does, the system's CAs and the instance's host name are checked."""
        context = self._tls.get(verify)
        if context is None:
            context = ssl.create_default_context()
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls[verify] = context
        return context

    def take(self, address: str) -> UpstreamConnection | None:
        conns = self.idle.get(address)
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def take_live(self, address: str) -> UpstreamConnection | None:
        """Like take, but each candidate is first polled (one syscall): a FIN or RST the loop has not handled yet
        (an instance killed a moment ago) makes it unusable, before anything is written to it. For requests that
        cannot simply be sent again if the connection turns out to be closed."""
        conns = self.idle.get(address)
        while conns:
            conn = conns.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if conn.fd >= 0:
                poller = select.poll()
                poller.register(conn.fd, NOT_IDLE)
                try:
                    dead = bool(poller.poll(0))
                except OSError:
                    dead = True
                if dead:
                    conn.abort()
                    continue
            conn.reused = True
            return conn
        return None

    def drop(self, address: str) -> None:
        """Closes every idle connection to an instance (found dead: they are too), plain and TLS."""
        for key in (address, tls_pool_key(address, False), tls_pool_key(address, True)):
            for conn in self.idle.pop(key, ()):
                conn.abort()

    async def connect(self, target: Target, timeout: float, tls: bool = False,
                      verify: bool = False) -> UpstreamConnection:
        address = target.address
        async with asyncio.timeout(timeout):
            if tls:
                key = tls_pool_key(address, verify)
                transport, protocol = await self.loop.create_connection(  # type: ignore[type-var]
                    lambda: UpstreamConnection(self, address, key), target.host, target.port,
                    ssl=self.tls_context(verify), server_hostname=target.host)
            else:
                transport, protocol = await self.loop.create_connection(  # type: ignore[type-var]
                    lambda: UpstreamConnection(self, address), target.host, target.port
                )
        if target.guarded and self.own is not None:
            # A catalog instance's host name may resolve to this host (the table could only judge addresses).
            peer = transport.get_extra_info("peername")
            if peer and self.own.covers(str(peer[0]), int(peer[1])):
                transport.abort()
                raise ConnectionRefusedError(f"{address} is one of this server's own listeners: not routed to")
        return protocol

    def give_back(self, conn: UpstreamConnection, now: float) -> None:
        if conn.closed or conn.tunnel or conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        conn.client = None
        conn.idle_since = now
        conns = self.idle.setdefault(conn.pool_key, [])
        if len(conns) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conns.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.pool_key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_idle(self, now: float, max_idle: float = IDLE_TIMEOUT) -> None:
        """Closes connections idle longer than max_idle (all of them when max_idle is 0)."""
        for address, conns in list(self.idle.items()):
            keep = []
            for conn in conns:
                if max_idle and now - conn.idle_since < max_idle and not conn.closed:
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self.idle[address] = keep
            else:
                del self.idle[address]

    def stats(self) -> dict[str, Any]:
        return {address: len(conns) for address, conns in self.idle.items()}
