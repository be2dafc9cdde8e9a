"""The control API's HTTPS port: accepts TCP, looks at the first bytes, and gives a TLS handshake to the aiohttp
server the plain HTTP port uses, or answers plain HTTP with Go's 400 ("Client sent an HTTP request to an HTTPS
server.") and closes.

It owns the listening socket and the handshake only; it never routes a request and never downgrades a connection
to plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.https")

TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello
FIRST_BYTES_TIMEOUT = 10.0  # a client that connects and says nothing is dropped (as the HTTP port's header timeout)
HANDSHAKE_TIMEOUT = 10.0
# Byte for byte what Go's net/http answers on a TLS port, so tools that recognise it (and people) do.
PLAIN_HTTP_ANSWER = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                     b"\r\nClient sent an HTTP request to an HTTPS server.\n")


class HttpsListener:
    """One listening socket whose connections become `protocol_factory()` protocols over TLS with `context`."""

    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
                 context: ssl.SSLContext) -> None:
        self.protocol_factory = protocol_factory
        self.host = host
        self.port = port
        self.context = context
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: wait a little rather than spin
                log.warning("accepting an HTTPS connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = await self._peek(loop, conn)
        except (OSError, TimeoutError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        if first[0] != TLS_HANDSHAKE:
            with contextlib.suppress(OSError):
                conn.recv(65536)  # read what was sent, so that closing sends FIN after the answer, not RST
            await self._refuse_plain(loop, conn)
            return
        try:
            await loop.connect_accepted_socket(self.protocol_factory, conn, ssl=self.context,
                                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            # A client without a certificate under --verify-incoming ends here: the handshake refused it.
            log.debug("TLS handshake failed: %s", exc)
            conn.close()

    @staticmethod
    async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
        """The first bytes the client sent, left in the socket for the TLS layer to read."""
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            await asyncio.wait_for(readable, FIRST_BYTES_TIMEOUT)
        finally:
            loop.remove_reader(conn.fileno())
        return conn.recv(5, socket.MSG_PEEK)

    @staticmethod
    async def _refuse_plain(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await asyncio.wait_for(loop.sock_sendall(conn, PLAIN_HTTP_ANSWER), HANDSHAKE_TIMEOUT)
            conn.shutdown(socket.SHUT_WR)
        except (OSError, TimeoutError):
            pass
        finally:
            conn.close()

    async def stop(self) -> None:
        await cancel_and_wait(self._accepting)
        if self._sock is not None:
            self._sock.close()
        for task in list(self._connections):
            task.cancel()
