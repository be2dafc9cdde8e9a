"""Consul's DNS interface (UDP and TCP) for the catalog: services, nodes, addresses, recursion to upstreams.

wire: bytes; names: the name grammar; view: the catalog as DNS reads it; answers: what Consul answers;
recursor: forwarding; server: listeners and transport sizing. Nothing here writes to the store.
"""

from shipyard.api.dns.server import DnsResponder, DnsServer

__all__ = ["DnsResponder", "DnsServer"]
