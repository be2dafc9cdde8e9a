"""The DNS listener on UDP and TCP: turns query bytes into reply bytes, sized for the transport they go back on.

Owns freshness (answers come from a catalog view that is current at the store revision this server has seen),
the UDP/TCP size rules, and what reaches the log about bad input (one rate-limited line, never a traceback); it
never writes to the store and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from typing import Protocol

from shipyard.api.context import DnsConfig
from shipyard.api.dns import wire
from shipyard.api.dns.answers import Answer, Answerer
from shipyard.api.dns.names import zone_of
from shipyard.api.dns.ratelimit import RateLimitedLog
from shipyard.api.dns.recursor import Recursors
from shipyard.api.dns.view import CatalogView, build_view
from shipyard.api.dns.wire import PackedUnit, Query, Rejection
from shipyard.registry.catalog import Catalog
from shipyard.registry.prepared_queries import execute_prepared_query

log = logging.getLogger("shipyard.dns")

MAX_PENDING_UDP = 1024  # questions waiting on the store or a recursor; beyond this, new ones are dropped
TCP_IDLE_TIMEOUT = 10.0
MAX_UDP_ANSWER_LIMIT = 8  # Consul's ceiling for udp_answer_limit
# Replies remembered per catalog view, as every ordering the shuffle can give (hence at most 24 of them): a
# repeated question then costs one dict lookup. Bounded so that a flood of distinct questions costs memory once.
REPLY_CACHE_ENTRIES = 512
REPLY_CACHE_ORDERINGS = 24


class Restriction(Protocol):
    """What ACLs let DNS name: a cut of a catalog view, and a version that changes whenever the token DNS answers
    as may have changed (set through the API without any write to the store)."""

    async def __call__(self, view: CatalogView) -> CatalogView: ...

    def version(self) -> int: ...


class DnsResponder:
    """Answers one DNS message: at once when the catalog view is current, else after refreshing it or asking a
    recursor (respond_now then hands back the parsed Query for `respond`)."""

    def __init__(self, catalog: Catalog, datacenter: str, config: DnsConfig) -> None:
        self.catalog = catalog
        self.config = config
        self.answerer = Answerer(config, datacenter)
        self.recursors = Recursors(config.recursors, timeout=config.recursor_timeout,
                                   strategy=config.recursor_strategy)
        self.recursion_available = bool(self.recursors)
        self._view: CatalogView | None = None
        self._read_at = 0.0  # monotonic time the view was last read from the store
        self._refreshing: asyncio.Future[CatalogView] | None = None
        self._log = RateLimitedLog(log)
        self._replies: dict[bytes, tuple[bytes, ...]] = {}  # question bytes after the id -> replies after it
        self._replies_view: CatalogView | None = None
        # With --acl: what the default (else anonymous) token may read of a view; None: everything.
        self.restrict: Restriction | None = None
        self._restricted_as = -1  # the restriction's version the current view was cut with
        self._whole: CatalogView | None = None  # the unrestricted view the current one was cut from

    # ---- entry points ---------------------------------------------------------------------------

    def respond_now(self, data: bytes, *, tcp: bool, peer: object = None) -> bytes | Query | None:
        """Reply bytes, None (send nothing), or the Query when the answer needs I/O first."""
        try:
            view = self._current_view()
            if view is not None and not tcp and view is self._replies_view:
                replies = self._replies.get(data[2:])
                if replies is not None:
                    return data[:2] + (replies[0] if len(replies) == 1 else random.choice(replies))
            parsed = wire.parse_query(data)
            if isinstance(parsed, Rejection):
                self._note_rejection(parsed, peer)
                return wire.encode_rejection(parsed)
            zone = zone_of(parsed.name, self.answerer.domains)
            if zone is None and not _is_reverse(parsed.name):
                if self.recursors:
                    return parsed
                return wire.encode_error(parsed, wire.REFUSED, recursion_available=False)
            if view is None:
                return parsed
            if zone is None:
                return self._reverse(parsed, view, tcp) or parsed  # not ours: a recursor may know it
            return self._local(parsed, zone, view, tcp) or parsed  # None: a prepared query, run in respond
        except Exception as exc:  # a bug must cost one answer, not the listener
            self._log.warning("bug", "DNS: answering failed: %r", exc)
            return None

    async def respond(self, query: Query, *, tcp: bool, peer: object = None) -> bytes | None:
        try:
            zone = zone_of(query.name, self.answerer.domains)
            if zone is None and not _is_reverse(query.name):
                return await self._forward(query, tcp)
            view = await self._fresh_view()
            if zone is None:
                return self._reverse(query, view, tcp) or await self._forward(query, tcp)
            return self._local(query, zone, view, tcp) or await self._prepared(query, zone, tcp, peer)
        except Exception as exc:
            self._log.warning("bug", "DNS: answering failed: %r", exc)
            return wire.encode_error(query, wire.SERVFAIL, recursion_available=self.recursion_available)

    def _note_rejection(self, rejection: Rejection, peer: object) -> None:
        if rejection.rcode is None:
            # Answering a response would let two servers (or one, spoofed) bounce packets forever.
            self._log.warning("dropped", "DNS: dropped a packet unanswered (%s, from %s)", rejection.reason, peer)
        else:
            self._log.warning(f"rejected-{rejection.rcode}", "DNS: answered %s to a malformed query (%s, from %s)",
                              "NOTIMP" if rejection.rcode == wire.NOTIMP else "FORMERR", rejection.reason, peer)

    # ---- freshness ------------------------------------------------------------------------------

    def _current_view(self) -> CatalogView | None:
        view = self._view
        # "<", not "!=": on etcd a read can be ahead of the revision this server's follow stream has reached.
        if view is None or not self.config.allow_stale or view.revision < self.catalog.store.revision:
            return None
        if self.restrict is not None and self.restrict.version() != self._restricted_as:
            return None
        if time.monotonic() - self._read_at > self.config.max_stale:
            return None
        return view

    async def _fresh_view(self) -> CatalogView:
        view = self._current_view()
        if view is not None:
            return view
        if self._refreshing is None:
            # One read of the store serves every question that arrives while it runs.
            self._refreshing = asyncio.ensure_future(self._read_view())
            self._refreshing.add_done_callback(self._refreshed)
        return await asyncio.shield(self._refreshing)

    def _refreshed(self, _: object) -> None:
        self._refreshing = None

    async def _read_view(self) -> CatalogView:
        snapshot = await self.catalog.snapshot()
        view = self._whole if self.restrict is not None else self._view
        if view is None or view.snapshot is not snapshot:
            view = build_view(snapshot, snapshot.revision, self.catalog.node.name)
        else:
            view.revision = snapshot.revision  # other prefixes changed: the same catalog, current at a later revision
        if self.restrict is not None:
            self._restricted_as = self.restrict.version()
            self._whole, view = view, await self.restrict(view)
        self._view, self._read_at = view, time.monotonic()
        return view

    # ---- answers --------------------------------------------------------------------------------

    def _local(self, query: Query, zone: str, view: CatalogView, tcp: bool) -> bytes | None:
        """The reply from the catalog view; None for a prepared query's name (its answer needs the store)."""
        answer = self.answerer.answer(query, zone, view)
        if answer.prepared:
            return None
        if tcp or answer.soa_zone:  # an SOA's serial is the current second: not for keeping
            return self._sized(query, answer, zone, tcp)
        orderings = answer.orderings(REPLY_CACHE_ORDERINGS)
        if orderings is None:
            return self._sized(query, answer, zone, tcp)
        replies = tuple(self._sized(query, answer, zone, tcp, order)[2:] for order in orderings)
        if self._replies_view is not view or len(self._replies) >= REPLY_CACHE_ENTRIES:
            self._replies, self._replies_view = {}, view
        self._replies[query.raw[2:]] = replies
        return query.raw[:2] + random.choice(replies)

    async def _prepared(self, query: Query, zone: str, tcp: bool, peer: object) -> bytes:
        """`<query>.query.consul`: the query is run for every question, never cached, as Consul runs it: its
        definition may change without the catalog changing, and each run shuffles and Near-sorts afresh. As in
        Consul's preparedQueryLookup the source is the client's subnet (EDNS) or address, for `Near: "_ip"`;
        the query's own Near (`_agent` is this server's node) orders the answers."""
        name = self.answerer.answer(query, zone, await self._fresh_view()).prepared
        catalog = self.catalog
        execution = await execute_prepared_query(catalog.store, catalog, catalog.node, name,
                                                 source_ip=_source_ip(query, peer))
        return self._sized(query, self.answerer.prepared_answer(execution, query.qtype, zone), zone, tcp)

    def _reverse(self, query: Query, view: CatalogView, tcp: bool) -> bytes | None:
        answer = self.answerer.reverse(query, view) if query.qtype in (wire.PTR, wire.ANY) else None
        if answer is None:
            if self.recursors:
                return None
            answer = Answer(rcode=wire.NXDOMAIN, soa_zone=self.answerer.domain)
        return self._sized(query, answer, self.answerer.domain, tcp)

    async def _forward(self, query: Query, tcp: bool) -> bytes:
        data = await self.recursors.forward(query, tcp=tcp)
        if data is None:
            self._log.warning("recursors-failed", "DNS: every recursor failed for %s", query.name)
            return wire.encode_error(query, wire.SERVFAIL, recursion_available=True)
        return data

    def _sized(self, query: Query, answer: Answer, zone: str, tcp: bool, units: list[PackedUnit] | None = None
               ) -> bytes:
        """Consul's trimDNSResponse: at most udp_answer_limit answers to a plain (non-EDNS) UDP question, then
        as many as fit the transport's size; TC set when something was left out and enable_truncate is on."""
        units = answer.pick() if units is None else units
        authority = answer.authority
        if answer.soa_zone:
            soa = self.answerer.soa(zone)
            if answer.soa_in_answer:
                units = [wire.pack_unit((soa,)), *units]
            else:
                authority = (*authority, soa.blob)
        total = len(units)
        if tcp:
            max_size = wire.TCP_MAX_SIZE
        else:
            max_size = min(query.edns_size or wire.UDP_PLAIN_SIZE, wire.UDP_MAX_SIZE) - 8  # room for the UDP header
            limit = min(MAX_UDP_ANSWER_LIMIT, max(self.config.udp_answer_limit, 1))
            if max_size + 8 == wire.UDP_PLAIN_SIZE and len(units) > limit:
                units = units[:limit]
        data = self._encode(query, answer, units, authority)
        if len(data) > max_size and len(units) > 1:
            units, data = self._fit(query, answer, units, max_size)
        if len(data) > max_size and not tcp:
            # Even one answer is too big for this client: an empty, truncated reply sends it to TCP.
            return wire.encode(query, answer.rcode, [], truncated=True, recursion_available=self.recursion_available)
        if len(units) < total and self.config.enable_truncate:
            return self._encode(query, answer, units, (), truncated=True)
        return data

    def _fit(self, query: Query, answer: Answer, units: list[PackedUnit], max_size: int
             ) -> tuple[list[PackedUnit], bytes]:
        """The most units whose reply fits max_size (binary search; the authority section goes first)."""
        low, high = 1, len(units)
        best = self._encode(query, answer, units[:1], ())
        while low < high:
            middle = (low + high + 1) // 2
            data = self._encode(query, answer, units[:middle], ())
            if len(data) <= max_size:
                low, best = middle, data
            else:
                high = middle - 1
        return units[:low], best

    def _encode(self, query: Query, answer: Answer, units: list[PackedUnit], authority: tuple[bytes, ...],
                *, truncated: bool = False) -> bytes:
        return wire.encode(query, answer.rcode, units, authority=authority, additional=answer.additional,
                           truncated=truncated, recursion_available=self.recursion_available)


def _is_reverse(name: str) -> bool:
    return name.endswith((".in-addr.arpa", ".ip6.arpa"))


def _source_ip(query: Query, peer: object) -> str:
    """The EDNS client subnet's address if the question carries one (a resolver asking for a client), else the
    peer's address: what Consul passes a prepared query as its source."""
    options = query.edns_options  # the client subnet option, if any, as the reply echoes it
    if len(options) >= 8:
        family, address = int.from_bytes(options[4:6], "big"), options[8:]
        size = {1: 4, 2: 16}.get(family)
        if size is not None and len(address) <= size:
            return str(ipaddress.ip_address(address.ljust(size, b"\x00")))
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return ""


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()  # strong refs, so replies are not collected mid-way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDP transport isn't a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        outcome = self.responder.respond_now(data, tcp=False, peer=addr)
        if isinstance(outcome, bytes):
            if self.transport is not None:
                self.transport.sendto(outcome, addr)
        elif outcome is not None and len(self._pending) < MAX_PENDING_UDP:
            task = asyncio.ensure_future(self._reply_later(outcome, addr))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a client that went away: nothing to do

    async def _reply_later(self, query: Query, addr: tuple[str, int]) -> None:
        data = await self.responder.respond(query, tcp=False, peer=addr)
        if data is not None and self.transport is not None:
            self.transport.sendto(data, addr)


async def _serve_tcp_client(responder: DnsResponder, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
            (length,) = struct.unpack("!H", header)
            data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
            peer = writer.get_extra_info("peername")
            outcome = responder.respond_now(data, tcp=True, peer=peer)
            if isinstance(outcome, Query):
                outcome = await responder.respond(outcome, tcp=True, peer=peer)
            if outcome is None:
                break
            writer.write(struct.pack("!H", len(outcome)) + outcome)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


class DnsServer:
    """Serves Consul's DNS interface on UDP and TCP at the same address and port."""

    def __init__(self, catalog: Catalog, datacenter: str, bind: str, port: int,
                 config: DnsConfig | None = None) -> None:
        self.responder = DnsResponder(catalog, datacenter, config or DnsConfig())
        self.bind = bind
        self.port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.responder), local_addr=(self.bind, self.port)
        )
        self._tcp = await asyncio.start_server(
            lambda r, w: _serve_tcp_client(self.responder, r, w), self.bind, self.port
        )

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
