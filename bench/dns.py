"""Benchmark of Shipyard's DNS interface (an SRV lookup) against dnsmasq answering the same records, in one run.

Owns the harness: a real `shipyard server` and a real dnsmasq (Debian's dnsmasq-base, a static zone of the same
SRV and A records) on free loopback ports, loaded identically by dnsperf (Debian's dnsperf); never imports
Shipyard internals — it measures what a resolver sees. Without dnsperf it falls back to a dnspython load
generator and says so in the JSON ("load": "dnspython").

Usage: python bench/dns.py [--quick] [--seconds N]   (progress on stderr, one JSON line on stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and this file (dns.py) would shadow dnspython.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rdatatype  # noqa: E402

QNAME = "web.service.consul"
INSTANCES = 3
RATIO_TARGET = 0.5
P99_TARGET_MS = 5.0
LATENCY_RATE = 2000  # queries/s for the latency phase: well below either server's capacity
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[bench/dns] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def binary(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- the servers ---------------------------------------------------------------------------------------------


@contextmanager
def shipyard_server(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    http_port, dns_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--no-gateway", "--http-port",
           str(http_port), "--dns-port", str(dns_port), "--log-level", "warning"]
    with open(workdir / "shipyard.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/v1/status/leader", timeout=1).read()
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = (workdir / "shipyard.log").read_text()
                    raise RuntimeError("shipyard server did not start: " + text) from exc
                time.sleep(0.1)
        for i in range(INSTANCES):
            body = {"Name": "web", "ID": f"web-{i}", "Address": f"127.0.0.{11 + i}", "Port": 8001 + i}
            request = urllib.request.Request(base + "/v1/agent/service/register", data=json.dumps(body).encode(),
                                             method="PUT", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()
        yield proc, dns_port
    finally:
        stop(proc)


def srv_records(port: int) -> list[tuple[int, int, int, str, str]]:
    """(priority, weight, port, target, address) of Shipyard's SRV answer, for the reference's zone."""
    query = dns.message.make_query(QNAME, "SRV", use_edns=True, payload=4096)
    reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=5)
    addresses = {str(rrset.name): str(rrset[0]) for rrset in reply.additional if rrset.rdtype == dns.rdatatype.A}
    out = []
    for rrset in reply.answer:
        for rd in rrset:
            target = str(rd.target)
            out.append((rd.priority, rd.weight, rd.port, target.rstrip("."), addresses[target]))
    if len(out) != INSTANCES:
        raise RuntimeError(f"shipyard answered {len(out)} SRV records, expected {INSTANCES}")
    return out


@contextmanager
def dnsmasq_server(workdir: Path, records: list[tuple[int, int, int, str, str]]
                   ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    path = binary("dnsmasq")
    if path is None:
        raise SystemExit("dnsmasq is missing: apt-get install dnsmasq-base (scripts/install-peers.sh)")
    port = free_port()
    zone = [f"--srv-host={QNAME},{target},{srv_port},{prio},{weight}" for prio, weight, srv_port, target, _ in records]
    zone += [f"--host-record={target},{address}" for *_, target, address in records]
    cmd = [path, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--no-resolv", "--no-hosts",
           "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}", "--local=/consul/",
           "--log-facility=/dev/null", *zone]
    with open(workdir / "dnsmasq.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                query = dns.message.make_query(QNAME, "SRV")
                if len(dns.query.udp(query, "127.0.0.1", port=port, timeout=1).answer):
                    break
            except (OSError, dns.exception.Timeout):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dnsmasq did not start: " + (workdir / "dnsmasq.log").read_text())
            time.sleep(0.1)
        yield proc, port
    finally:
        stop(proc)


# ---- the load ------------------------------------------------------------------------------------------------


def dnsperf(port: int, datafile: Path, seconds: float, *, rate: int | None = None) -> dict[str, float]:
    """Throughput (no rate) or latency (at `rate`, every answer's time kept) of one dnsperf run."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-l", str(seconds), "-c", "4",
           "-q", "200", "-t", "2"]
    if rate is not None:
        cmd += ["-Q", str(rate), "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    figures: dict[str, float] = {}
    latencies = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("> NOERROR"):
            latencies.append(float(line.split()[-1]))
        elif line.startswith("Queries per second:"):
            figures["qps"] = float(line.split()[-1])
        elif line.startswith("Queries completed:"):
            figures["completed"] = float(line.split()[2])
        elif line.startswith("Queries lost:"):
            figures["lost"] = float(line.split()[2])
        elif line.startswith("Average Latency (s):"):
            figures["avg_ms"] = float(line.split()[3]) * 1000
    if latencies:
        latencies.sort()
        figures["p50_ms"] = statistics.median(latencies) * 1000
        figures["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    if "qps" not in figures:
        raise RuntimeError(f"dnsperf gave no figures: {out[-2000:]}")
    return figures


def python_load(port: int, seconds: float, *, rate: int | None = None) -> dict[str, float]:
    """The fallback when dnsperf is missing: one client, one question at a time (so latency-bound, not a
    capacity figure), or paced at `rate`."""
    query = dns.message.make_query(QNAME, "SRV")
    latencies = []
    lost = 0
    end = time.monotonic() + seconds
    interval = 1.0 / rate if rate else 0.0
    next_send = time.monotonic()
    while time.monotonic() < end:
        if interval:
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_send += interval
        start = time.perf_counter()
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
            latencies.append(time.perf_counter() - start)
        except dns.exception.Timeout:
            lost += 1
    latencies.sort()
    return {"qps": len(latencies) / seconds, "completed": len(latencies), "lost": lost,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000}


def measure(port: int, pid: int, datafile: Path, seconds: float, use_dnsperf: bool) -> dict[str, float]:
    if use_dnsperf:
        dnsperf(port, datafile, 1)  # warm-up: first answers, caches
        before = cpu_seconds(pid)
        figures = dnsperf(port, datafile, seconds)
        figures["server_cpu_us_per_query"] = (cpu_seconds(pid) - before) / max(figures["completed"], 1) * 1e6
        latency = dnsperf(port, datafile, max(2.0, seconds / 2), rate=LATENCY_RATE)
    else:
        figures = python_load(port, seconds)
        latency = python_load(port, max(2.0, seconds / 2), rate=LATENCY_RATE)
    figures["p50_ms"], figures["p99_ms"] = latency["p50_ms"], latency["p99_ms"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (2 s per phase)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load per server (default 10)")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    use_dnsperf = shutil.which("dnsperf") is not None
    if not use_dnsperf:
        progress("dnsperf is missing (apt-get install dnsperf): falling back to a dnspython load generator")
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        workdir = Path(tmp)
        datafile = workdir / "queries.txt"
        datafile.write_text(f"{QNAME} SRV\n" * 10)
        with shipyard_server(workdir) as (shipyard, shipyard_port):
            records = srv_records(shipyard_port)
            with dnsmasq_server(workdir, records) as (reference, reference_port):
                progress(f"reference dnsmasq on :{reference_port}, {seconds:.0f}s")
                ref = measure(reference_port, reference.pid, datafile, seconds, use_dnsperf)
                progress(f"shipyard on :{shipyard_port}, {seconds:.0f}s")
                ours = measure(shipyard_port, shipyard.pid, datafile, seconds, use_dnsperf)
    ratio = ours["qps"] / ref["qps"] if ref["qps"] else 0.0
    print(json.dumps({
        "bench": "dns",
        "load": "dnsperf" if use_dnsperf else "dnspython (one outstanding query; not a capacity figure)",
        "question": f"{QNAME} SRV", "instances": INSTANCES, "seconds": seconds,
        "reference": "dnsmasq (static records)",
        "shipyard": {k: round(v, 3) for k, v in ours.items()},
        "dnsmasq": {k: round(v, 3) for k, v in ref.items()},
        "ratio": round(ratio, 3),
        "latency_phase_qps": LATENCY_RATE,
        "targets": {"ratio": RATIO_TARGET, "p99_ms": P99_TARGET_MS},
        "met": {"ratio": ratio >= RATIO_TARGET, "p99": ours["p99_ms"] < P99_TARGET_MS},
    }))


if __name__ == "__main__":
    main()
