"""Helpers for the DNS interface's tests: questions asked with dig and with dnspython, and a private dnsmasq.

Everything here talks to real listeners over real sockets; nothing reaches inside a server.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

from support import free_port, need_binary


def dig(port: int, *args: str) -> str:
    binary = need_binary("dig")
    cmd = [binary, "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


def dig_short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def ask(port: int, name: str, rdtype: str, *, tcp: bool = False, payload: int | None = None) -> dns.message.Message:
    """One question with dnspython: plain UDP (no EDNS0) unless payload is given, or TCP."""
    query = dns.message.make_query(name, rdtype, use_edns=payload is not None, payload=payload or 512)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=5)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=5, ignore_trailing=False)


def records(section: list[dns.rrset.RRset], rdtype: str | None = None) -> list[str]:
    """'owner TYPE rdata' lines of a section, sorted, optionally of one type."""
    out: list[str] = []
    for rrset in section:
        if rdtype is None or rrset.rdtype == dns.rdatatype.from_text(rdtype):
            out.extend(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rd}" for rd in rrset)
    return sorted(out)


def rcode(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())


def flags(message: dns.message.Message) -> str:
    return dns.flags.to_text(message.flags)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


class DnsmasqProcess:
    """A private dnsmasq (Debian's dnsmasq-base) on a free loopback port, answering only its own records."""

    def __init__(self, directory: Path, *records: str) -> None:
        self.binary = need_binary("dnsmasq")
        self.port = free_port()
        self.records = list(records)  # dnsmasq options, e.g. "--host-record=outside.example,192.0.2.7"
        self.log_path = directory / f"dnsmasq-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DnsmasqProcess:
        cmd = [self.binary, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--no-resolv",
               "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={self.port}",
               "--log-facility=-", *self.records]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.log_path.read_text(errors='replace')}")
            if "status:" in dig(self.port, "+tcp", "probe.invalid", "A"):
                return self
            time.sleep(0.1)
        raise RuntimeError("dnsmasq did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
