"""Forwarding questions outside the Consul domain to upstream resolvers (Consul's `recursors`).

Owns the exchange with upstreams: the query is sent unchanged, each upstream gets `timeout` seconds, and the next
one is tried on a timeout, a network error or an answer other than NOERROR/NXDOMAIN; it never answers by itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct

from shipyard.api.dns import wire
from shipyard.api.dns.ratelimit import RateLimitedLog

log = logging.getLogger("shipyard.dns")


def parse_recursor(text: str) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:5353', '::1', '[::1]:5353' or 'host[:port]' -> (ip, port); ValueError otherwise."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid recursor address {text!r}")
        port = int(rest[1:]) if rest else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"invalid recursor address {text!r}")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ValueError(f"recursor {text!r} does not resolve: {exc}") from exc
    return str(infos[0][4][0]), port


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # The socket is connected to the upstream; the id check drops stale or stray answers.
        if len(data) >= 12 and struct.unpack_from("!H", data)[0] == self.query_id and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class Recursors:
    """The configured upstream resolvers, tried in order (or in random order) for each question."""

    def __init__(self, addresses: list[str], *, timeout: float, strategy: str = "sequential") -> None:
        self.upstreams = [parse_recursor(a) for a in addresses]
        self.timeout = timeout if timeout > 0 else 2.0
        self.strategy = strategy
        self._log = RateLimitedLog(log)

    def __bool__(self) -> bool:
        return bool(self.upstreams)

    async def forward(self, query: wire.Query, *, tcp: bool) -> bytes | None:
        """The first acceptable upstream answer as it came, or None when every upstream failed."""
        order = list(self.upstreams)
        if self.strategy == "random":
            random.shuffle(order)
        for host, port in order:
            try:
                exchange = self._tcp(host, port, query.raw) if tcp else self._udp(host, port, query)
                data = await asyncio.wait_for(exchange, self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._log.warning("recursor", "recursor %s:%d failed: %s", host, port, exc or type(exc).__name__)
                continue
            if len(data) < 12:
                continue
            flags = struct.unpack_from("!H", data, 2)[0]
            if flags & 0xF in (wire.NOERROR, wire.NXDOMAIN) or flags & wire.TC:
                return data
            self._log.warning("recursor", "recursor %s:%d answered rcode %d", host, port, flags & 0xF)
        return None

    @staticmethod
    async def _udp(host: str, port: int, query: wire.Query) -> bytes:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Reply(query.id), remote_addr=(host, port))
        try:
            transport.sendto(query.raw)
            return await protocol.done
        finally:
            transport.close()

    @staticmethod
    async def _tcp(host: str, port: int, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(raw)) + raw)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()
