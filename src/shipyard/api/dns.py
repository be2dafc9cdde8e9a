"""Consul's DNS interface (UDP and TCP): `<svc>.service.consul` A/SRV, tags, RFC 2782 names, nodes.

Answers from the catalog only: healthy instances of a service, never ones with a critical check; it
never writes anything and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from shipyard.registry.catalog import Catalog, CatalogSnapshot

log = logging.getLogger("shipyard.dns")

DOMAIN = dns.name.from_text("consul.")
TTL = 0  # Consul's default: no caching, so a failed instance disappears at once
MAX_UDP_ANSWERS = 3  # Consul's default a_record_limit-ish: UDP answers stay small and get shuffled
DROP_LOG_EVERY = 60.0  # seconds: a flood of packets we drop costs one log line a minute, not one line each


@dataclass(frozen=True)
class Instance:
    node: str
    node_address: str
    address: str
    port: int


class DropLog:
    """Counts packets dropped unanswered and says so in one WARNING line at most every DROP_LOG_EVERY seconds."""

    def __init__(self) -> None:
        self.dropped = 0
        self._unreported = 0
        self._next_line = 0.0

    def drop(self, why: str, peer: object) -> None:
        self.dropped += 1
        self._unreported += 1
        now = time.monotonic()
        if now >= self._next_line:
            log.warning("DNS: dropped %d packet(s) unanswered since the last notice (latest: %s, from %s)",
                        self._unreported, why, peer)
            self._unreported, self._next_line = 0, now + DROP_LOG_EVERY


class DnsResolver:
    """Turns a question into resource records using one catalog snapshot."""

    def __init__(self, catalog: Catalog, datacenter: str) -> None:
        self.catalog = catalog
        self.datacenter = datacenter
        self.drops = DropLog()

    async def answer(self, query: dns.message.Message, *, udp: bool) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname: dns.name.Name = question.name
        if not qname.is_subdomain(DOMAIN):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        labels = [label.decode().lower() for label in qname.relativize(DOMAIN).labels]
        if labels and labels[-1] == self.datacenter.lower():
            labels = labels[:-1]  # <svc>.service.<dc>.consul
        snapshot = await self.catalog.snapshot()
        found = False
        if len(labels) >= 2 and labels[-1] == "service":
            found = self._service(response, question, labels[:-1], snapshot, udp)
        elif len(labels) == 2 and labels[-1] == "node":
            found = self._node(response, question, labels[0], snapshot)
        if not found:
            response.set_rcode(dns.rcode.NXDOMAIN)
        if not response.answer:
            self._add_soa(response)
        return response

    def _service(
        self,
        response: dns.message.Message,
        question: dns.rrset.RRset,
        parts: list[str],
        snapshot: CatalogSnapshot,
        udp: bool,
    ) -> bool:
        tag: str | None = None
        if len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
            name = parts[0][1:]  # RFC 2782: _<service>._<tag or tcp>.service.consul
            tag = None if parts[1] == "_tcp" else parts[1][1:]
        elif len(parts) == 2:
            tag, name = parts
        elif len(parts) == 1:
            name = parts[0]
        else:
            return False
        if not any(e.data.get("Service", "").lower() == name for e in snapshot.services.values()):
            return False
        instances = self._healthy(snapshot, name, tag)
        random.shuffle(instances)
        if udp:
            instances = instances[:MAX_UDP_ANSWERS]
        qname = question.name
        if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY, dns.rdatatype.AAAA):
            for inst in instances:
                self._add_address(response.answer, qname, inst.address, question.rdtype)
        if question.rdtype in (dns.rdatatype.SRV, dns.rdatatype.ANY):
            for inst in instances:
                target = dns.name.from_text(f"{inst.node}.node.{self.datacenter}.consul.")
                rdata = dns.rdata.from_text("IN", "SRV", f"1 1 {inst.port} {target}")
                _append(response.answer, qname, dns.rdatatype.SRV, rdata)
                self._add_address(response.additional, target, inst.address, dns.rdatatype.A)
        return True

    def _node(
        self, response: dns.message.Message, question: dns.rrset.RRset, node: str, snapshot: CatalogSnapshot
    ) -> bool:
        for name, entry in snapshot.nodes.items():
            if name.lower() == node:
                self._add_address(response.answer, question.name, entry.data.get("Address", ""), question.rdtype)
                return True
        return False

    def _healthy(self, snapshot: CatalogSnapshot, name: str, tag: str | None) -> list[Instance]:
        out = []
        for (node, sid), entry in snapshot.services.items():
            svc = entry.data
            if svc.get("Service", "").lower() != name:
                continue
            if tag is not None and tag not in [t.lower() for t in svc.get("Tags") or []]:
                continue
            checks = snapshot.node_checks(node) + snapshot.service_checks(node, sid)
            if any(c.data.get("Status") == "critical" for c in checks):
                continue
            node_address = snapshot.node_shape(node).get("Address", "")
            out.append(Instance(node, node_address, svc.get("Address") or node_address, int(svc.get("Port") or 0)))
        return out

    @staticmethod
    def _add_address(section: list[dns.rrset.RRset], qname: dns.name.Name, address: str, rdtype: int) -> None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return  # a hostname address would need a CNAME; Shipyard registers IPs
        if ip.version == 4 and rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            _append(section, qname, dns.rdatatype.A, dns.rdata.from_text("IN", "A", str(ip)))
        elif ip.version == 6 and rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
            _append(section, qname, dns.rdatatype.AAAA, dns.rdata.from_text("IN", "AAAA", str(ip)))

    def _add_soa(self, response: dns.message.Message) -> None:
        soa = dns.rdata.from_text("IN", "SOA", "ns.consul. hostmaster.consul. 1 3600 600 86400 0")
        _append(response.authority, DOMAIN, dns.rdatatype.SOA, soa)


def _append(section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: int, rdata: dns.rdata.Rdata) -> None:
    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype:
            rrset.add(rdata)
            return
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
    rrset.update_ttl(TTL)
    rrset.add(rdata)
    section.append(rrset)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: DnsResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self._in_flight: set[asyncio.Task[None]] = set()  # strong refs, so replies are not collected mid-way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDP transport isn't a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = await _respond(self.resolver, data, udp=True, peer=addr)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


async def _respond(resolver: DnsResolver, data: bytes, *, udp: bool, peer: object = None) -> bytes | None:
    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return None  # garbage: drop it, as resolvers do
    if query.flags & dns.flags.QR:
        # A response is not a question: answering it would let two servers (or one, spoofed) bounce packets
        # forever, and make_response() refuses it anyway. Dropped, with a rate-limited line, never a traceback.
        resolver.drops.drop("a response (QR bit set), not a query", peer)
        return None
    try:
        response = await resolver.answer(query, udp=udp)
    except Exception:
        log.exception("DNS query failed")
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire(max_size=512 if udp else 65535)


async def _serve_tcp_client(resolver: DnsResolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await asyncio.wait_for(reader.readexactly(2), 10)
            (length,) = struct.unpack("!H", header)
            data = await asyncio.wait_for(reader.readexactly(length), 10)
            wire = await _respond(resolver, data, udp=False, peer=writer.get_extra_info("peername"))
            if wire is None:
                break
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


class DnsServer:
    """Serves the resolver on UDP and TCP at the same address and port."""

    def __init__(self, catalog: Catalog, datacenter: str, bind: str, port: int) -> None:
        self.resolver = DnsResolver(catalog, datacenter)
        self.bind = bind
        self.port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.resolver), local_addr=(self.bind, self.port)
        )
        self._tcp = await asyncio.start_server(
            lambda r, w: _serve_tcp_client(self.resolver, r, w), self.bind, self.port
        )

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
