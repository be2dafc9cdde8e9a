"""Consul's answers to questions under its domain: records for services, nodes, addresses, SOA and NS.

Owns what goes in the answer, authority and additional sections, as Consul's agent/dns.go decides it, from one
CatalogView; it never does I/O, never sizes a response for its transport and never forwards a question.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shipyard.api.context import DnsConfig
from shipyard.api.dns import wire
from shipyard.api.dns.names import Lookup, parse_lookup
from shipyard.api.dns.view import CatalogView, Instance, NodeRecord, instance_from_entry
from shipyard.api.dns.wire import PackedUnit, Query, Record, make_record, pack_unit
from shipyard.registry.sessions import _parse_go_duration  # the parser that vetted DNS.TTL when it was written

if TYPE_CHECKING:
    from shipyard.registry.prepared_queries import QueryExecution

CACHE_LIMIT = 4096  # distinct questions remembered per catalog view; a flood of random names only clears it
MAX_NAMESERVERS = 3


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer before the per-query steps: shuffle, a_record_limit, one CNAME choice, the SOA's serial."""

    rcode: int = wire.NOERROR
    units: tuple[PackedUnit, ...] = ()
    additional: tuple[tuple[tuple[object, ...], bytes], ...] = ()  # beyond the units' own (an SOA answer's glue)
    cname_units: tuple[PackedUnit, ...] = ()  # used only when no unit has an address: one of them, at random
    authority: tuple[bytes, ...] = ()
    shuffle: bool = False
    limit: int = 0  # at most this many units after the shuffle (0: all)
    soa_zone: str = ""  # the zone whose SOA goes in the authority section ("" for none)
    soa_in_answer: bool = False
    # A prepared query's ID or name: the records come from executing it, which reads the store, so the caller
    # (DnsResponder) runs it and asks prepared_answer for them; nothing else in this answer is used then.
    prepared: str = ""

    def pick(self) -> list[PackedUnit]:
        units = list(self.units)
        if self.shuffle and len(units) > 1:
            random.shuffle(units)
        if not units and self.cname_units:
            units = [random.choice(self.cname_units)]
        if self.limit:
            units = units[: self.limit]
        return units

    def orderings(self, most: int) -> list[list[PackedUnit]] | None:
        """Every list pick() can return, each once, if there are at most `most` of them (else None)."""
        if self.units:
            if not self.shuffle or len(self.units) == 1:
                return [self.pick()]
            if math.factorial(len(self.units)) > most:
                return None
            limit = self.limit or len(self.units)
            distinct = {tuple(order[:limit]): None for order in itertools.permutations(self.units)}
            return [list(order) for order in distinct]
        if self.cname_units:
            return [[unit] for unit in self.cname_units] if len(self.cname_units) <= most else None
        return [[]]


@dataclass(slots=True)
class _Cache:
    view: CatalogView | None = None
    entries: dict[tuple[str, int], Answer] = field(default_factory=dict)


class Answerer:
    """Answers questions in the Consul domain (and alt_domain) for one datacenter."""

    def __init__(self, config: DnsConfig, datacenter: str) -> None:
        self.config = config
        self.datacenter = datacenter
        self.domain = normalize_domain(config.domain) or "consul"
        self.alt_domain = normalize_domain(config.alt_domain)
        self.domains = (self.domain, self.alt_domain) if self.alt_domain else (self.domain,)
        self._ttl_exact: dict[str, float] = {}
        self._ttl_prefix: list[tuple[str, float]] = []
        for key, ttl in config.service_ttl.items():
            if key.endswith("*"):
                self._ttl_prefix.append((key[:-1].lower(), ttl))
            else:
                self._ttl_exact[key.lower()] = ttl
        self._ttl_prefix.sort(key=lambda pair: len(pair[0]), reverse=True)  # the longest prefix wins
        self._cache = _Cache()
        self._soa: tuple[int, str, Record] | None = None

    # ---- entry points ---------------------------------------------------------------------------

    def answer(self, query: Query, zone: str, view: CatalogView) -> Answer:
        """The (cached) answer to a question whose name is in `zone` (one of self.domains)."""
        cache = self._cache
        if cache.view is not view:
            cache.view, cache.entries = view, {}
        key = (query.name, query.qtype)
        found = cache.entries.get(key)
        if found is None:
            if len(cache.entries) >= CACHE_LIMIT:
                cache.entries = {}
            found = cache.entries[key] = self._compute(query, zone, view)
        return found

    def soa(self, zone: str) -> Record:
        """The zone's SOA; its serial is the current second, as Consul's."""
        now = int(time.time())
        cached = self._soa
        if cached is not None and cached[0] == now and cached[1] == zone:
            return cached[2]
        c = self.config
        rdata = wire.soa_rdata(wire.encode_name(f"ns.{zone}"), wire.encode_name(f"hostmaster.{zone}"), now,
                               c.soa_refresh, c.soa_retry, c.soa_expire, c.soa_min_ttl)
        record = make_record(zone, wire.SOA, c.soa_min_ttl, rdata)
        self._soa = (now, zone, record)
        return record

    def reverse(self, query: Query, view: CatalogView) -> Answer | None:
        """A PTR answer for a node's or a service instance's address, or None if no such address is known."""
        ip = _ip_from_arpa(query.name)
        if ip is None:
            return None
        for node in view.nodes.values():
            if _same_ip(node.address, ip):
                return Answer(units=(pack_unit((self._ptr(node.name, "node"),)),))
        for instances in view.services.values():
            for inst in instances:
                if inst.address and _same_ip(inst.address, ip):
                    return Answer(units=(pack_unit((self._ptr(inst.service, "service"),)),))
        return None

    def prepared_answer(self, execution: QueryExecution | None, qtype: int, zone: str) -> Answer:
        """The answer from a prepared query's execution (None: no such query), as Consul's preparedQueryLookup
        builds it with the service form's records. The execution shuffled and Near-sorted its nodes: the order
        is kept, so the nearest instance comes first."""
        if execution is None or not execution.nodes:
            return self._finish(Answer(rcode=wire.NXDOMAIN), zone)
        ignored = frozenset(execution.query.get("Service", {}).get("IgnoreCheckIDs") or ())
        instances = [instance_from_entry(entry, ignored) for entry in execution.nodes]
        answer = self._instances_answer(instances, qtype, self._query_ttl(execution), zone, shuffle=False)
        return self._finish(answer, zone)

    def _query_ttl(self, execution: QueryExecution) -> int:
        """The query's DNS.TTL, else the service's TTL from service_ttl (Consul's order)."""
        if not execution.dns_ttl:
            return self.service_ttl(execution.service.lower())
        try:
            return max(int(_parse_go_duration(execution.dns_ttl)), 0)
        except ValueError:
            return 0  # vetted when the query was written; Consul answers with a zero TTL if it cannot parse it

    # ---- dispatch -------------------------------------------------------------------------------

    def _compute(self, query: Query, zone: str, view: CatalogView) -> Answer:
        qtype = query.qtype
        if qtype == wire.SOA:
            ns, glue = self._nameservers(view, zone)
            return Answer(authority=tuple(r.blob for r in ns), additional=tuple((r.key, r.blob) for r in glue),
                          soa_zone=zone, soa_in_answer=True)
        if qtype == wire.NS:
            ns, glue = self._nameservers(view, zone)
            units = tuple(pack_unit((n,), glue[i : i + 1]) for i, n in enumerate(ns))
            return Answer(units=units) if units else Answer(soa_zone=zone)
        if qtype in (wire.AXFR, wire.IXFR):
            return Answer(rcode=wire.NOTIMP)
        rest = query.name[: -len(zone)].rstrip(".")
        lookup = parse_lookup(rest.split(".") if rest else [], srv=qtype == wire.SRV,
                              datacenter=self.datacenter.lower())
        answer = self._dispatch(lookup, qtype, zone, view)
        return answer if answer.prepared else self._finish(answer, zone)

    @staticmethod
    def _finish(answer: Answer, zone: str) -> Answer:
        if answer.rcode == wire.NXDOMAIN:
            return Answer(rcode=answer.rcode, soa_zone=zone)
        if not answer.units and not answer.cname_units:
            return replace(answer, soa_zone=zone)  # NODATA: the SOA tells resolvers how long to remember it
        return answer

    def _dispatch(self, lookup: Lookup, qtype: int, zone: str, view: CatalogView) -> Answer:
        if lookup.kind in ("service", "connect"):
            return self._service(lookup, qtype, zone, view)
        if lookup.kind == "node":
            return self._node(lookup, qtype, zone, view)
        if lookup.kind == "addr":
            return self._addr(lookup, qtype)
        if lookup.kind == "query":
            # No WAN federation: a query in another datacenter has nowhere to run.
            return Answer(prepared=lookup.service) if self._local(lookup.datacenter) else Answer(rcode=wire.NXDOMAIN)
        # "ingress": there are no ingress gateways; "virtual": no virtual IPs. Anything else is a name Consul does
        # not know.
        return Answer(rcode=wire.NXDOMAIN)

    def _local(self, datacenter: str) -> bool:
        return datacenter == self.datacenter.lower()

    # ---- services -------------------------------------------------------------------------------

    def _service(self, lookup: Lookup, qtype: int, zone: str, view: CatalogView) -> Answer:
        if not self._local(lookup.datacenter):
            return Answer(rcode=wire.NXDOMAIN)  # no WAN federation: every other datacenter is unreachable
        instances = view.instances(lookup.service, lookup.tag, only_passing=self.config.only_passing,
                                   connect=lookup.kind == "connect")
        if not instances:
            return Answer(rcode=wire.NXDOMAIN)
        return self._instances_answer(instances, qtype, self.service_ttl(lookup.service), zone, shuffle=True)

    def _instances_answer(self, instances: list[Instance], qtype: int, ttl: int, zone: str, *, shuffle: bool
                          ) -> Answer:
        """SRV, or A/AAAA (CNAME for host names) under a_record_limit: the service form's and a prepared query's."""
        if qtype == wire.SRV:
            return Answer(units=tuple(self._srv_units(instances, ttl, zone)), shuffle=shuffle)
        if qtype == wire.TXT:
            return Answer()  # NODATA (Consul answers A records to a service TXT question; no client wants that)
        plain: list[PackedUnit] = []
        cnames: list[PackedUnit] = []
        seen: set[tuple[object, ...]] = set()
        for inst in instances:
            record = self._address_record(inst.address or inst.node.address, qtype, ttl)
            if record is None or record.key in seen:
                continue
            seen.add(record.key)
            (cnames if record.rtype == wire.CNAME else plain).append(pack_unit((record,)))
        return Answer(units=tuple(plain), cname_units=tuple(cnames), shuffle=shuffle,
                      limit=max(self.config.a_record_limit, 0))

    def service_ttl(self, service: str) -> int:
        ttl = self._ttl_exact.get(service)
        if ttl is None:
            ttl = next((t for prefix, t in self._ttl_prefix if service.startswith(prefix)), 0.0)
        return int(ttl)

    def _srv_units(self, instances: list[Instance], ttl: int, zone: str) -> list[PackedUnit]:
        units = []
        seen: set[tuple[str, str, int]] = set()
        for inst in instances:
            ident = (inst.node.name, inst.address, inst.port)
            if ident in seen:
                continue
            seen.add(ident)
            try:
                unit = self._srv_unit(inst, ttl, zone)
            except ValueError:
                continue  # a node name or address DNS cannot carry
            if unit is not None:
                units.append(unit)
        return units

    def _srv_unit(self, inst: Instance, ttl: int, zone: str) -> PackedUnit | None:
        node_fqdn = f"{inst.node.name}.node.{self.datacenter}.{zone}"
        address = inst.address or inst.node.address
        if not address:
            return None
        ip = _parse_ip(address)
        extra: list[Record] = []
        if ip is None:
            target = address  # a host name: the client resolves it (Consul would too, through its recursors)
        elif inst.address:
            target = f"{_hex(ip)}.addr.{self.datacenter}.{zone}"
        else:
            target = node_fqdn
        target_wire = wire.encode_name(target)
        if ip is not None:
            extra.append(_ip_record(target, ip, ttl))
        if self.config.enable_additional_node_meta_txt:
            extra.extend(self._meta_txt(node_fqdn, inst.node, ttl))
        srv = make_record(None, wire.SRV, ttl, wire.srv_rdata(1, inst.weight, inst.port, target_wire),
                          target=target_wire, target_at=6)
        return pack_unit((srv,), extra)

    def _address_record(self, address: str, qtype: int, ttl: int) -> Record | None:
        """A/AAAA (or CNAME for a host name) for `address` as Consul's makeARecord picks them for qtype."""
        if not address:
            return None
        ip = _parse_ip(address)
        if ip is None:
            try:
                target = wire.encode_name(address)
            except ValueError:
                return None
            return make_record(None, wire.CNAME, ttl, target, target=target)
        wanted = (wire.A, wire.ANY) if ip.version == 4 else (wire.AAAA, wire.ANY)
        if qtype not in (*wanted, wire.SRV, wire.NS):
            return None
        return _ip_record(None, ip, ttl)

    # ---- nodes, addresses, servers --------------------------------------------------------------

    def _node(self, lookup: Lookup, qtype: int, zone: str, view: CatalogView) -> Answer:
        node = view.nodes.get(lookup.node)
        if node is None or not self._local(lookup.datacenter):
            return Answer(rcode=wire.NXDOMAIN)
        if qtype not in (wire.ANY, wire.A, wire.AAAA, wire.TXT):
            return Answer()
        ttl = int(self.config.node_ttl)
        answer: list[Record] = []
        extra: list[Record] = []
        if qtype != wire.TXT:
            record = self._address_record(node.address, qtype, ttl)
            if record is not None:
                answer.append(record)
        meta = self._meta_txt(None, node, ttl)
        if qtype in (wire.TXT, wire.ANY):
            answer.extend(meta)
        elif self.config.enable_additional_node_meta_txt:
            extra.extend(meta)
        # A node answers as one unit: trimming would otherwise split its meta from its address.
        return Answer(units=(pack_unit(answer, extra),)) if answer else Answer()

    def _addr(self, lookup: Lookup, qtype: int) -> Answer:
        try:
            raw = bytes.fromhex(lookup.addr)
        except ValueError:
            return Answer(rcode=wire.NXDOMAIN)
        if len(raw) not in (4, 16):
            return Answer(rcode=wire.NXDOMAIN)
        ip = ipaddress.ip_address(raw)
        record = _ip_record(None, ip, int(self.config.node_ttl))
        if qtype in (record.rtype, wire.ANY):
            return Answer(units=(pack_unit((record,)),))
        return Answer(additional=((record.key, record.blob),))  # Consul puts it in the additional section then

    def _nameservers(self, view: CatalogView, zone: str) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
        ttl = int(self.config.node_ttl)
        ns: list[Record] = []
        glue: list[Record] = []
        for server in view.servers[:MAX_NAMESERVERS]:
            fqdn = f"{server.name}.node.{self.datacenter}.{zone}".lower()
            ip = _parse_ip(server.address)
            try:
                target = wire.encode_name(fqdn)
            except ValueError:
                continue
            if ip is None:
                continue
            ns.append(make_record(zone, wire.NS, ttl, target, target=target))
            glue.append(_ip_record(fqdn, ip, ttl))
        return tuple(ns), tuple(glue)

    def _meta_txt(self, owner: str | None, node: NodeRecord, ttl: int) -> list[Record]:
        out = []
        for key, value in node.meta:
            text = value if key.lower().startswith("rfc1035-") else _rfc1464(key, value)
            out.append(make_record(owner, wire.TXT, ttl, wire.txt_rdata(text)))
        return out

    def _ptr(self, name: str, kind: str) -> Record:
        target = wire.encode_name(f"{name}.{kind}.{self.datacenter}.{self.domain}")
        return make_record(None, wire.PTR, 0, target, target=target)


def normalize_domain(domain: str) -> str:
    """'Consul.' -> 'consul': how names are compared here (lower case, no trailing dot)."""
    return domain.strip().strip(".").lower()


def _parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return ip.packed.hex()


def _ip_record(owner: str | None, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ttl: int) -> Record:
    return make_record(owner, wire.A if ip.version == 4 else wire.AAAA, ttl, ip.packed)


def _same_ip(address: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return _parse_ip(address) == ip


def _ip_from_arpa(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        if name.endswith(".in-addr.arpa"):
            octets = name[: -len(".in-addr.arpa")].split(".")
            return ipaddress.IPv4Address(".".join(reversed(octets))) if len(octets) == 4 else None
        if name.endswith(".ip6.arpa"):
            nibbles = name[: -len(".ip6.arpa")].split(".")
            return ipaddress.IPv6Address(bytes.fromhex("".join(reversed(nibbles)))) if len(nibbles) == 32 else None
    except ValueError:
        return None
    return None


def _rfc1464(key: str, value: str) -> str:
    """key=value as RFC 1464 encodes it: backquote-escaped '`', '=' and the key's leading/trailing spaces."""
    key = key.replace("`", "``").replace("=", "`=")
    stripped = key.lstrip(" ")
    key = "` " * (len(key) - len(stripped)) + stripped
    stripped = key.rstrip(" ")
    key = stripped + "` " * (len(key) - len(stripped))
    return key + "=" + value.replace("`", "``")
