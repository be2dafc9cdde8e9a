"""The server's own listeners (control API, DNS, gateway) as the gateway must see them: never a catalog target.

Decides whether a host:port is one of this server's ports on an address of this host; it never resolves names
over the network and never blocks a route that the admin API names with a literal address (that is explicit).
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _host_name() -> set[str]:
    """This host's name (no look-up: what names resolve to is checked once connected, upstream.py)."""
    try:
        return {socket.gethostname().lower()}
    except OSError:
        return set()


def _interface_addresses() -> set[str]:
    """Every address assigned to an interface of this host (Linux /proc; elsewhere none are found this way)."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text(encoding="ascii").splitlines()
    except OSError:
        lines = []
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            found.add(previous.split("|--")[1].strip())
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for row in f:
                digits = row.split()[0] if row.split() else ""
                if len(digits) == 32:
                    found.add(str(ipaddress.IPv6Address(int(digits, 16))))
    except (OSError, ValueError):
        pass
    return found


@dataclass(frozen=True, slots=True)
class OwnListeners:
    """Ports of this server's listeners and the addresses they are reachable at (besides any loopback or
    unspecified address, which always count)."""

    ports: frozenset[int]
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of_this_host(cls, ports: set[int], bind: str, control_url: str = "") -> OwnListeners:
        all_ports = {p for p in ports if p}
        if control_url:
            parts = urlsplit(control_url)
            if parts.port:
                all_ports.add(parts.port)
        hosts = (_host_name() | _interface_addresses() | {bind.strip("[]").lower()}) - {""}
        return cls(frozenset(all_ports), frozenset(hosts))

    def covers(self, host: str, port: int) -> bool:
        """True when host:port may be one of this server's own listeners."""
        if port not in self.ports:
            return False
        name = host.strip("[]").lower().rstrip(".")
        if name in LOCAL_NAMES or name.endswith(".localhost") or name in self.hosts:
            return True
        try:
            address = ipaddress.ip_address(name.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback or address.is_unspecified or str(address) in self.hosts
