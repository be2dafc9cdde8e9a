"""Host ports for this node's instances: a dynamic range, bind-tested free, never handed out twice.

It must never decide which instance runs where; it only answers "which ports may this instance use".
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable

from shipyard.errors import Conflict, ShipyardError

DEFAULT_RANGE = (20000, 32000)


class PortsExhausted(ShipyardError):
    status = 503


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """A bind test on TCP and UDP: what an instance will try to do with the port."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True


class PortAllocator:
    """Allocates ports from [low, high] (inclusive) and remembers what it handed out until released."""

    def __init__(self, port_range: tuple[int, int] = DEFAULT_RANGE, host: str = "127.0.0.1") -> None:
        low, high = port_range
        if not 0 < low <= high < 65536:
            raise ValueError(f"bad port range {port_range}")
        self.low, self.high, self.host = low, high, host
        self._allocated: set[int] = set()
        # A random start and a moving cursor keep two agents on one host (tests) from racing for the same
        # port, and avoid reusing a port its last instance has just released.
        self._cursor = random.randint(low, high)

    @property
    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)

    def allocate(self, names: Iterable[str], static: dict[str, int] | None = None) -> dict[str, int]:
        """Ports for `names` (in order) plus static ones; all or nothing."""
        static = dict(static or {})
        result: dict[str, int] = {}
        taken: list[int] = []
        ordered = list(names) + [n for n in static if n not in names]
        for name in ordered:
            if name in result:
                continue
            if name in static:
                port = static[name]
                if port in self._allocated or port in taken or not port_is_free(port, self.host):
                    raise Conflict(f"static port {port} ({name}) is already in use")
            else:
                port = self._next_free(exclude=taken)
            result[name] = port
            taken.append(port)
        self._allocated.update(taken)
        return result

    def reserve(self, ports: Iterable[int]) -> None:
        """Mark ports held by adopted instances as handed out (no bind test: their instance holds them)."""
        self._allocated.update(ports)

    def release(self, ports: Iterable[int]) -> None:
        for port in ports:
            self._allocated.discard(port)

    def _next_free(self, exclude: list[int]) -> int:
        span = self.high - self.low + 1
        for _ in range(span):
            port = self._cursor
            self._cursor = self.low if port >= self.high else port + 1
            if port in self._allocated or port in exclude:
                continue
            if port_is_free(port, self.host):
                return port
        raise PortsExhausted(f"no free port in {self.low}-{self.high}")
