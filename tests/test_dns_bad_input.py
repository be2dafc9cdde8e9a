"""Hostile and broken DNS packets, sent over raw sockets: Consul's FORMERR/NOTIMP/NXDOMAIN answers, no reply where
a reply would amplify, no traceback and one log line per kind of trouble however many packets come."""

from __future__ import annotations

import socket
import struct

import pytest

from dns_support import ask, rcode, records
from support import ServerProcess

QUESTION = b"\x03web\x07service\x06consul\x00" + struct.pack("!HH", 1, 1)


def header(msg_id: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar)


def exchange(server: ServerProcess, packet: bytes, *, tcp: bool = False) -> bytes | None:
    if tcp:
        with socket.create_connection(("127.0.0.1", server.dns_port), timeout=5) as s:
            s.sendall(struct.pack("!H", len(packet)) + packet)
            length = s.recv(2)
            return s.recv(struct.unpack("!H", length)[0]) if len(length) == 2 else None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(packet, ("127.0.0.1", server.dns_port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def reply_code(reply: bytes | None, msg_id: int) -> int:
    assert reply is not None and len(reply) >= 12
    got_id, got_flags, qd, an, ns, ar = struct.unpack("!HHHHHH", reply[:12])
    assert got_id == msg_id and got_flags & 0x8000 and (qd, an, ns, ar) == (0, 0, 0, 0)
    return got_flags & 0xF


CASES = {
    "compression loop": header(1) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
    "pointer forward": header(2) + b"\x03web\xc0\x20" + struct.pack("!HH", 1, 1) + b"\x00" * 16,
    "name over 255 octets": header(3) + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + struct.pack("!HH", 1, 1),
    "extended label type": header(4) + b"\x41abc\x00" + struct.pack("!HH", 1, 1),
    "label past the end": header(5) + b"\x20web",
    "question cut short": header(6) + b"\x03web\x00\x00",
    "two questions": header(7, qd=2) + QUESTION + QUESTION,
    "no question": header(8, qd=0),
    "answer records in a query": header(9, an=5) + QUESTION,
    "broken additional record": header(10, ar=1) + QUESTION + b"\x00\x00\x29",
}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_malformed_queries_get_formerr(server: ServerProcess, tcp: bool) -> None:
    for name, packet in CASES.items():
        msg_id = struct.unpack("!H", packet[:2])[0]
        assert reply_code(exchange(server, packet, tcp=tcp), msg_id) == 1, name  # FORMERR


def test_other_opcodes_get_notimp(server: ServerProcess) -> None:
    for opcode in (1, 2, 4, 5):  # IQUERY, STATUS, NOTIFY, UPDATE
        packet = header(100 + opcode, flags=opcode << 11) + QUESTION
        assert reply_code(exchange(server, packet), 100 + opcode) == 4, opcode  # NOTIMP


def test_garbage_too_short_for_a_header_gets_nothing(server: ServerProcess) -> None:
    assert exchange(server, b"\x00\x01garb") is None
    assert exchange(server, b"") is None


def test_unknown_types_in_the_domain_and_odd_classes(server: ServerProcess) -> None:
    odd = ask(server.dns_port, "consul.service.consul", "TYPE65280")
    assert rcode(odd) == "NOERROR" and odd.answer == [] and records(odd.authority, "SOA")
    assert rcode(ask(server.dns_port, "x.y.z.consul", "TYPE65280")) == "NXDOMAIN"


def test_bad_input_never_costs_a_traceback_and_logs_once_per_kind(server: ServerProcess) -> None:
    for _ in range(20):
        for packet in CASES.values():
            exchange(server, packet)
    assert rcode(ask(server.dns_port, "consul.service.consul", "A")) == "NOERROR"  # still serving
    log = server.log_tail(200_000)
    assert "Traceback" not in log and "answering failed" not in log
    assert log.count("DNS: answered FORMERR to a malformed query") == 1, log[-3000:]
