"""The etcd store's client for unary calls to one member's HTTP/JSON gateway: keep-alive HTTP/1.1 connections, one
request in flight on each, parsed by httptools (Content-Length or chunked bodies), each request one write.

It owns connections and framing only; it never sends a request twice: a request that may have reached the member
fails with MaybeSent (the caller reports it), only one that could not even connect fails with Unreachable.
Watches (long-lived streams) are not its business.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httptools

IDLE_MAX = 128  # idle connections kept per member; more concurrent calls than this open (then close) their own


class Unreachable(OSError):
    """No connection could be made: the request was never sent."""


class MaybeSent(OSError):
    """The connection failed or timed out after the request was written: it may have been applied."""


class _Connection(asyncio.Protocol):
    __slots__ = ("body", "closed", "parser", "reusable", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(MaybeSent(f"connection lost: {exc or 'closed by the member'}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(MaybeSent(f"unreadable answer: {exc}"))
            self.close()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        body, self.body = b"".join(self.body), []
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class EtcdHttp:
    """POSTs JSON bodies to one etcd member (`url`: http://host:port)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"etcd member URL must be http://host:port, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 2379
        self.timeout = timeout
        self._head = f"HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\nContent-Length: "
        self._idle: list[_Connection] = []

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, self.host, self.port), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise Unreachable(str(exc) or type(exc).__name__) from None
        return conn

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; Unreachable if it could not be sent, MaybeSent if it failed after."""
        conn = await self._connection()
        answer = conn.send(f"POST {path} {self._head}{len(body)}\r\n\r\n".encode() + body)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, conn._fail, MaybeSent(f"no answer within {self.timeout:g}s"))
        try:
            result = await answer
        except BaseException:
            conn.close()  # a late answer must never be read as the next request's
            raise
        finally:
            timer.cancel()
        if conn.reusable and not conn.closed and len(self._idle) < IDLE_MAX:
            self._idle.append(conn)
        else:
            conn.close()
        return result

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
