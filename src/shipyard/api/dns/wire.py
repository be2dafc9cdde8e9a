"""DNS messages on the wire: parsing a query strictly, and encoding responses from prebuilt records.

Owns every byte the DNS interface reads or writes; it never looks at the catalog and never raises on bad input
(a malformed query becomes a Rejection, never an exception that escapes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Header flag bits and the codes the interface sends.
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
OPCODE_MASK, OPCODE_QUERY = 0x7800, 0
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, AXFR, IXFR, ANY = 1, 2, 5, 6, 12, 16, 28, 33, 41, 252, 251, 255
CLASS_IN = 1
EDNS_CLIENT_SUBNET = 8

MAX_NAME = 255  # octets on the wire, RFC 1035 2.3.4
MAX_LABEL = 63
MAX_POINTERS = 32  # more hops than labels in any legal name: a compression loop
UDP_PLAIN_SIZE = 512
UDP_MAX_SIZE = 65535 - 68  # Consul's ceiling for an EDNS0 buffer size (IP header room)
TCP_MAX_SIZE = 65523

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")


class MalformedQuery(Exception):
    """The bytes are not a DNS query we can answer; the message says why (for the log, never the client)."""


@dataclass(slots=True)
class Query:
    """A parsed question: one name, type and class, and the EDNS0 buffer size if the client sent OPT."""

    id: int
    flags: int
    name: str  # lower case, dot-separated, no trailing dot ("" for the root)
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as received (case kept), echoed in the reply
    edns_size: int | None = None  # None: no OPT record
    edns_options: bytes = b""  # OPT options for the reply: the client subnet echoed, as Consul does
    raw: bytes = b""  # the whole query, for forwarding to a recursor unchanged


@dataclass(frozen=True, slots=True)
class Rejection:
    """A query that gets an error reply with an empty question section (FORMERR, NOTIMP), or none at all."""

    id: int
    flags: int
    rcode: int | None  # None: send nothing
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record with its wire form prebuilt (make_record), so that a reply only joins bytes.

    owner None means the question name (written as a pointer to it). When rdata ends in a domain name that
    additional records are owned by (an SRV target), target/target_at say where, so they can point at it.
    """

    owner: bytes | None
    rtype: int
    rdata: bytes
    blob: bytes  # owner (or the pointer to the question) + type, class, ttl, length + rdata
    target: bytes = b""
    target_at: int = 0  # offset of target inside rdata
    key: tuple[object, ...] = ()  # identity for de-duplication


def encode_name(name: str) -> bytes:
    """`a.b.c` (trailing dot optional) as wire labels; ValueError for names DNS cannot carry."""
    text = name.rstrip(".")
    if not text:
        return b"\x00"
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("utf-8")
        if not raw or len(raw) > MAX_LABEL:
            raise ValueError(f"label {label!r} cannot be encoded")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {name!r} is longer than 255 octets")
    return bytes(out)


def make_record(owner: str | None, rtype: int, ttl: int, rdata: bytes, *, target: bytes = b"",
                target_at: int = 0, key: tuple[object, ...] = ()) -> Record:
    owner_wire = None if owner is None else encode_name(owner)
    fixed = _RR_FIXED.pack(rtype, CLASS_IN, max(0, min(int(ttl), 0x7FFFFFFF)), len(rdata))
    blob = (b"\xc0\x0c" if owner_wire is None else owner_wire) + fixed + rdata
    return Record(owner_wire, rtype, rdata, blob, target, target_at,
                  key or ((owner_wire or b"").lower(), rtype, rdata.lower()))


@dataclass(frozen=True, slots=True)
class PackedUnit:
    """The records one instance (or node) contributes to a reply, as bytes; shuffled and trimmed as a whole.

    Additional records owned by the unit's SRV target are kept without their owner: at encoding time they get a
    pointer to where the target landed in the message (Consul's replies are compressed; this keeps them small).
    """

    answer: bytes
    answer_count: int
    target: bytes = b""  # lower case wire name, b"" for none
    target_at: int = -1  # offset of the target inside `answer`
    target_extras: tuple[bytes, ...] = ()  # additional records owned by target, without the owner
    other_extras: tuple[tuple[tuple[object, ...], bytes], ...] = ()  # (dedup key, whole record)


def pack_unit(answer: list[Record] | tuple[Record, ...], additional: list[Record] | tuple[Record, ...] = ()
              ) -> PackedUnit:
    target, target_at, offset = b"", -1, 0
    for rec in answer:
        if rec.target and target_at < 0:
            target, target_at = rec.target.lower(), offset + len(rec.blob) - len(rec.rdata) + rec.target_at
        offset += len(rec.blob)
    pointed: list[bytes] = []
    other: list[tuple[tuple[object, ...], bytes]] = []
    for rec in additional:
        if target and rec.owner is not None and rec.owner.lower() == target:
            pointed.append(rec.blob[len(rec.owner) :])
        else:
            other.append((rec.key, rec.blob))
    return PackedUnit(b"".join(r.blob for r in answer), len(answer), target, target_at, tuple(pointed), tuple(other))


# ---- parsing ------------------------------------------------------------------------------------


def parse_query(data: bytes) -> Query | Rejection:
    """The checks miekg/dns (and so Consul) applies before answering, then a strict parse of the question."""
    if len(data) < _HEADER.size:
        return Rejection(0, 0, None, "shorter than a DNS header")
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & QR:
        return Rejection(msg_id, flags, None, "a response (QR bit set), not a query")
    if flags & OPCODE_MASK != OPCODE_QUERY:
        return Rejection(msg_id, flags, NOTIMP, f"opcode {(flags & OPCODE_MASK) >> 11} is not implemented")
    if qdcount != 1 or ancount > 1 or nscount > 1 or arcount > 2:
        return Rejection(msg_id, flags, FORMERR, f"section counts {qdcount}/{ancount}/{nscount}/{arcount}")
    try:
        name, end = read_name(data, _HEADER.size)
        if end + _QUESTION_TAIL.size > len(data):
            raise MalformedQuery("question ends early")
        qtype, qclass = _QUESTION_TAIL.unpack_from(data, end)
        end += _QUESTION_TAIL.size
        edns_size, edns_options = _read_edns(data, end, ancount + nscount + arcount)
    except MalformedQuery as exc:
        return Rejection(msg_id, flags, FORMERR, str(exc))
    return Query(msg_id, flags, name, qtype, qclass, data[_HEADER.size : end], edns_size, edns_options, data)


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """(lower-case dotted name, offset after it). Names in questions are rarely compressed: walk the labels, and
    take the careful path (pointers, loop and size limits) only when a pointer shows up."""
    labels: list[bytes] = []
    pos = offset
    size = len(data)
    while True:
        if pos >= size:
            raise MalformedQuery("name runs past the end of the message")
        length = data[pos]
        if length == 0:
            break
        if length & 0xC0:
            return _read_compressed_name(data, offset)
        if pos + 1 + length > size:
            raise MalformedQuery("label runs past the end of the message")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += length + 1
    if pos + 1 - offset > MAX_NAME:
        raise MalformedQuery("name longer than 255 octets")
    return _text(labels), pos + 1


def _text(labels: list[bytes]) -> str:
    return b".".join(labels).lower().decode("utf-8", "surrogateescape")  # DNS case folding is ASCII only


def _read_compressed_name(data: bytes, offset: int) -> tuple[str, int]:
    labels: list[bytes] = []
    wire_length = 1
    end = -1
    hops = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise MalformedQuery("name runs past the end of the message")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise MalformedQuery("compression pointer cut off")
            hops += 1
            if hops > MAX_POINTERS:
                raise MalformedQuery("compression loop")
            if end < 0:
                end = pos + 2
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise MalformedQuery("compression pointer points forward (loop)")
            pos = target
            continue
        if length & 0xC0:
            raise MalformedQuery(f"unsupported label type {length >> 6}")
        if length == 0:
            return _text(labels), (pos + 1 if end < 0 else end)
        wire_length += length + 1
        if wire_length > MAX_NAME:
            raise MalformedQuery("name longer than 255 octets")
        label = data[pos + 1 : pos + 1 + length]
        if len(label) < length:
            raise MalformedQuery("label runs past the end of the message")
        labels.append(label)
        pos += 1 + length


def _read_edns(data: bytes, offset: int, records: int) -> tuple[int | None, bytes]:
    """The EDNS0 buffer size from an OPT record among the other sections (RFC 6891), or None; and the options
    the reply's OPT carries."""
    size: int | None = None
    options = b""
    pos = offset
    for _ in range(records):
        _, pos = read_name(data, pos)
        if pos + _RR_FIXED.size > len(data):
            raise MalformedQuery("record header cut off")
        rtype, rclass, _ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += _RR_FIXED.size + rdlength
        if pos > len(data):
            raise MalformedQuery("record data cut off")
        if rtype == OPT:
            if size is not None:
                raise MalformedQuery("more than one OPT record")
            size = max(rclass, UDP_PLAIN_SIZE)
            options = _client_subnet_echo(data[pos - rdlength : pos])
    return size, options


def _client_subnet_echo(rdata: bytes) -> bytes:
    """The EDNS client subnet option (RFC 7871) of a query, as Consul echoes it: same family, source prefix and
    address, scope 0 (the answer holds for every subnet)."""
    pos = 0
    while pos < len(rdata):
        if pos + 4 > len(rdata):
            raise MalformedQuery("EDNS option header cut off")
        code, length = struct.unpack_from("!HH", rdata, pos)
        value = rdata[pos + 4 : pos + 4 + length]
        if len(value) < length:
            raise MalformedQuery("EDNS option cut off")
        pos += 4 + length
        if code == EDNS_CLIENT_SUBNET and length >= 4:
            return struct.pack("!HH", code, length) + value[:3] + b"\x00" + value[4:]
    return b""


# ---- encoding -----------------------------------------------------------------------------------


_POINTER = struct.Struct("!H")


def encode(query: Query, rcode: int, units: list[PackedUnit], *, authority: tuple[bytes, ...] = (),
           additional: tuple[tuple[tuple[object, ...], bytes], ...] = (), authoritative: bool = True,
           truncated: bool = False, recursion_available: bool = False) -> bytes:
    """A reply to `query`: the units' answers in order, then authority records, then additional records."""
    flags = QR | (query.flags & (OPCODE_MASK | RD | CD)) | (rcode & 0xF)
    if authoritative:
        flags |= AA
    if truncated:
        flags |= TC
    if recursion_available:
        flags |= RA
    parts = [b"", query.question]
    position = _HEADER.size + len(query.question)
    extras: list[bytes] = []
    seen: set[object] = set()
    answers = 0
    for unit in units:
        parts.append(unit.answer)
        answers += unit.answer_count
        if unit.target_extras:
            at = position + unit.target_at
            owner = _POINTER.pack(0xC000 | at) if at < 0x3FFF else unit.target
            for rest in unit.target_extras:
                if (unit.target, rest) not in seen:
                    seen.add((unit.target, rest))
                    extras.append(owner + rest)
        for key, blob in unit.other_extras:
            if key not in seen:
                seen.add(key)
                extras.append(blob)
        position += len(unit.answer)
    parts.extend(authority)
    for key, blob in additional:
        if key not in seen:
            seen.add(key)
            extras.append(blob)
    parts.extend(extras)
    count = len(extras)
    if query.edns_size is not None:
        # Consul echoes the client's buffer size (and its subnet option).
        parts.append(b"\x00" + _RR_FIXED.pack(OPT, query.edns_size, 0, len(query.edns_options)) + query.edns_options)
        count += 1
    parts[0] = _HEADER.pack(query.id, flags, 1, answers, len(authority), count)
    return b"".join(parts)


def encode_rejection(rejection: Rejection) -> bytes | None:
    if rejection.rcode is None:
        return None
    flags = QR | (rejection.flags & (OPCODE_MASK | RD | CD)) | rejection.rcode
    return _HEADER.pack(rejection.id, flags, 0, 0, 0, 0)


def encode_error(query: Query, rcode: int, *, recursion_available: bool) -> bytes:
    return encode(query, rcode, [], authoritative=False, recursion_available=recursion_available)


# ---- rdata --------------------------------------------------------------------------------------


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return struct.pack("!HHH", priority, weight & 0xFFFF, port & 0xFFFF) + target


def txt_rdata(text: str) -> bytes:
    raw = text.encode("utf-8")
    out = bytearray()
    for i in range(0, max(len(raw), 1), 255):  # character-strings hold 255 octets each
        chunk = raw[i : i + 255]
        out.append(len(chunk))
        out += chunk
    return bytes(out)


def soa_rdata(mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int, minimum: int) -> bytes:
    return mname + rname + struct.pack("!IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)
