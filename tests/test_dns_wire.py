"""In-process checks of the DNS interface's pure parts: the query parser, the name grammar, the answer orderings
the reply cache keeps, and the server flags' defaults."""

from __future__ import annotations

import struct

import dns.message
import pytest

from shipyard.api.context import DnsConfig
from shipyard.api.dns import wire
from shipyard.api.dns.answers import Answer, _rfc1464
from shipyard.api.dns.names import Lookup, parse_lookup
from shipyard.cli import dns_options


def test_parse_query_reads_what_dnspython_sends() -> None:
    query = dns.message.make_query("Web.Service.Consul", "SRV", use_edns=True, payload=1232)
    parsed = wire.parse_query(query.to_wire())
    assert isinstance(parsed, wire.Query)
    assert (parsed.id, parsed.name, parsed.qtype, parsed.edns_size) == (query.id, "web.service.consul", 33, 1232)
    assert parsed.question == query.to_wire()[12:12 + len(parsed.question)] and b"Web" in parsed.question
    plain = wire.parse_query(dns.message.make_query("consul", "A").to_wire())
    assert isinstance(plain, wire.Query) and plain.edns_size is None and plain.name == "consul"


def test_names_follow_backward_pointers_and_refuse_loops() -> None:
    data = b"\x03foo\x00" + b"\x03bar\xc0\x00"
    assert wire.read_name(data, 5) == ("bar.foo", 11)
    with pytest.raises(wire.MalformedQuery, match="forward"):
        wire.read_name(b"\x03bar\xc0\x04", 0)
    with pytest.raises(wire.MalformedQuery, match="255"):
        wire.read_name((b"\x3f" + b"a" * 63) * 4 + b"\x00", 0)


def test_rejections_mirror_miekg_dns() -> None:
    header = struct.pack("!HHHHHH", 7, 0x8000, 1, 0, 0, 0)
    rejection = wire.parse_query(header)
    assert isinstance(rejection, wire.Rejection) and rejection.rcode is None  # a response: never answered
    assert wire.encode_rejection(rejection) is None
    notimp = wire.parse_query(struct.pack("!HHHHHH", 8, 5 << 11, 1, 0, 0, 0))
    assert isinstance(notimp, wire.Rejection) and notimp.rcode == wire.NOTIMP
    encoded = wire.encode_rejection(notimp)
    assert encoded is not None and struct.unpack("!HH", encoded[:4]) == (8, 0x8000 | 5 << 11 | wire.NOTIMP)


@pytest.mark.parametrize(("labels", "srv", "expected"), [
    (["web", "service"], False, Lookup("service", "dc1", service="web")),
    (["v1", "blue", "web", "service", "dc2"], False, Lookup("service", "dc2", service="web", tag="v1.blue")),
    (["_web", "_tcp", "service"], True, Lookup("service", "dc1", service="web")),
    (["_web", "_v1", "service", "dc1", "dc"], True, Lookup("service", "dc1", service="web", tag="v1")),
    (["_web", "_tcp"], True, Lookup("service", "dc1", service="web")),
    (["_web", "_tcp"], False, Lookup("")),
    (["a", "b", "node"], False, Lookup("node", "dc1", node="a.b")),
    (["_q", "_tcp", "query"], False, Lookup("query", "dc1", service="q")),
    (["7f000001", "addr", "dc1"], False, Lookup("addr", "dc1", addr="7f000001")),
    (["web", "service", "a", "b", "c"], False, Lookup("")),
    ([], False, Lookup("")),
])
def test_name_grammar(labels: list[str], srv: bool, expected: Lookup) -> None:
    assert parse_lookup(labels, srv=srv, datacenter="dc1") == expected


def test_orderings_are_every_distinct_shuffle_outcome() -> None:
    units = tuple(wire.PackedUnit(bytes([i]), 1) for i in range(4))
    assert len(Answer(units=units, shuffle=True).orderings(24) or []) == 24
    assert len(Answer(units=units, shuffle=True, limit=1).orderings(24) or []) == 4
    assert Answer(units=units * 2, shuffle=True).orderings(24) is None  # 8! orderings: shuffled per query instead
    assert Answer().orderings(24) == [[]]


def test_rfc1464_escapes() -> None:
    assert _rfc1464("a=b", "c`d") == "a`=b=c``d"
    assert _rfc1464(" key ", "v") == "` key` =v"


def test_flag_defaults_are_the_config_defaults() -> None:
    defaults = DnsConfig()
    duration = dns_options.Duration()
    assert duration.convert(dns_options.RECURSOR_TIMEOUT, None, None) == defaults.recursor_timeout
    assert duration.convert(dns_options.NODE_TTL, None, None) == defaults.node_ttl
    assert duration.convert(dns_options.MAX_STALE, None, None) == defaults.max_stale
    assert defaults.udp_answer_limit == dns_options.UDP_ANSWER_LIMIT


def test_client_subnet_is_echoed_with_scope_zero() -> None:
    import dns.edns

    ecs = dns.edns.ECSOption("192.0.2.0", 24)
    query = dns.message.make_query("web.service.consul", "A", use_edns=True, payload=1232, options=[ecs])
    parsed = wire.parse_query(query.to_wire())
    assert isinstance(parsed, wire.Query)
    reply = dns.message.from_wire(wire.encode(parsed, wire.NOERROR, []))
    (option,) = reply.options
    assert isinstance(option, dns.edns.ECSOption) and (option.address, option.srclen, option.scopelen) == (
        "192.0.2.0", 24, 0)
    assert reply.payload == 1232
