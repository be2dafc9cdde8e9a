"""Benchmark of Shipyard's Consul KV HTTP API against etcd 3.4's HTTP/JSON gateway, in one invocation.

Owns the harness (both servers as real subprocesses in temp dirs) and one load generator used
identically for both; never imports Shipyard internals — it measures only what a client sees.

Phases in the same run: the server on its embedded SQLite store against etcd (PUT, GET, blocking-query fan-out
against etcd watches); with --acl and a scoped token against the plain server; and a server on the bench's own etcd
(--single-server) against etcd's gateway on that same etcd (PUT, GET), the cost of the etcd store's path. In that
last phase the server's etcd store commits concurrent KV writes as one etcd txn each (group commit) and reads
concurrent keys in one read-only txn; each line reports CPU per operation of the server, of its etcd, and of this
client, since all three share the machine's cores (the server is one event loop: its CPU per PUT bounds the ratio).

Usage: python bench/kv.py [--quick] [--phases sqlite,acl,etcd-store]
       (progress on stderr, one JSON line with all figures on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

ETCD_BINARY = "/usr/bin/etcd"
PUT_RATIO_TARGET = 0.5
GET_RATIO_TARGET = 0.5
FANOUT_TARGET_S = 1.0
ACL_RATIO_TARGET = 0.8  # KV with a token under --acl (default deny) vs the same server kind without ACLs
ETCD_STORE_RATIO_TARGET = 0.7  # the Consul KV API of a server on etcd vs etcd's own gateway, same etcd
_CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASES = ("sqlite", "acl", "etcd-store")


def progress(message: str) -> None:
    print(f"[bench/kv] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), to report server cost per operation."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# ---- the servers ---------------------------------------------------------------------------------------


class ServerUnderTest:
    """A server subprocess in its own session and temp dir, stopped (and its dir removed) on exit."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url(), timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class ShipyardServer(ServerUnderTest):
    name = "shipyard"

    def command(self) -> list[str]:
        data_dir = self.workdir / "data"
        return [
            sys.executable, "-m", "shipyard.cli.main", "server",
            "--data-dir", str(data_dir), "--http-port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/status/leader"


class ShipyardAclServer(ShipyardServer):
    """The same server with --acl (default deny); `token` may write and read bench/ only (made after start)."""

    name = "shipyard-acl"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "acl")
        workdir.joinpath("acl").mkdir(parents=True, exist_ok=True)
        self.management = str(uuid.uuid4())
        self.token = ""

    def command(self) -> list[str]:
        # The same parts as the plain server (gateway workers, DNS) on ports of its own, so only --acl differs.
        return [*super().command(), "--acl", "--acl-initial-management", self.management,
                "--gateway-port", str(free_port()), "--dns-port", str(free_port()), "--vault-port", "0"]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/status/leader"

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        policy = self._put("/v1/acl/policy", {"Name": "bench", "Rules": 'key_prefix "bench/" { policy = "write" }'})
        self.token = self._put("/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})["SecretID"]

    def _put(self, path: str, body: dict[str, object]) -> dict[str, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         method="PUT", headers={"X-Consul-Token": self.management,
                                                                "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return dict(json.loads(resp.read()))


class ShipyardOnEtcdServer(ShipyardServer):
    """A server whose store is the bench's etcd (--single-server: no RabbitMQ needed), so its Consul KV API can be
    compared with etcd's own gateway on the same etcd, under the same load."""

    name = "shipyard-etcd"

    def __init__(self, workdir: Path, etcd: EtcdServer) -> None:
        super().__init__(workdir / "on-etcd")
        workdir.joinpath("on-etcd").mkdir(parents=True, exist_ok=True)
        self.etcd = etcd

    def command(self) -> list[str]:
        # Ports of its own for the parts the plain server runs too, so only the store differs.
        return [*super().command(), "--store", f"etcd://127.0.0.1:{self.etcd.port}/bench-shipyard", "--single-server",
                "--gateway-port", str(free_port()), "--dns-port", str(free_port()), "--vault-port", "0"]


class EtcdServer(ServerUnderTest):
    """A private single-member etcd with its default (durable: fsync per raft batch) settings."""

    name = "etcd"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.peer_port = free_port()

    def command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            ETCD_BINARY, "--name", "bench", "--data-dir", str(self.workdir / "etcd-data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}", "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


# ---- a minimal HTTP/1.1 keep-alive client (the same for both sides) -----------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection, one request in flight; requests are prebuilt bytes.

    Deliberately tiny (no header objects, no URL handling) so the client's own CPU cost stays small
    next to the servers' on a 2-core machine. Streams (etcd watch) hand each newline-delimited
    message of a chunked body to `on_message`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.on_message: Callable[[bytes], None] | None = None
        self.completed_at = 0.0
        self.consul_index = 0
        self.closed = asyncio.get_running_loop().create_future()
        self._stream = bytearray()
        self._reset()

    def _reset(self) -> None:
        self.in_body = False
        self.status = 0
        self.length = 0
        self.chunked = False
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._parse_step():
            pass

    def _parse_step(self) -> bool:
        buf = self.buf
        if not self.in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            self.status = int(head[0].split(b" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
                elif name == b"x-consul-index":
                    self.consul_index = int(value)
            self.in_body = True
        if self.chunked:
            nl = buf.find(b"\r\n")
            if nl < 0:
                return False
            size = int(bytes(buf[:nl]).split(b";")[0], 16)
            if len(buf) < nl + 2 + size + 2:
                return False
            chunk = bytes(buf[nl + 2 : nl + 2 + size])
            del buf[: nl + 2 + size + 2]
            if size == 0:
                self._complete()
            elif self.on_message is not None:
                self._stream += chunk
                while (cut := self._stream.find(b"\n")) >= 0:
                    message = bytes(self._stream[:cut])
                    del self._stream[: cut + 1]
                    if message.strip():
                        self.on_message(message)
            else:
                self.body += chunk
            return True
        if len(buf) < self.length:
            return False
        self.body = bytearray(buf[: self.length])
        del buf[: self.length]
        self._complete()
        return True

    def _complete(self) -> None:
        self.completed_at = time.perf_counter()
        status, body = self.status, bytes(self.body)
        self._reset()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.cancel()  # a watch stream never ends by itself; nobody awaits it any more
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConnection, "127.0.0.1", port)
    return conn


async def connect_many(port: int, n: int, at_once: int = 100) -> list[HttpConnection]:
    """Opens n connections, a batch at a time so the listen backlog is never overrun."""
    conns: list[HttpConnection] = []
    while len(conns) < n:
        batch = min(at_once, n - len(conns))
        conns += await asyncio.gather(*(connect(port) for _ in range(batch)))
    return conns


def http_request(method: str, path: str, port: int, body: bytes = b"", content_type: str = "",
                 token: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if token:
        head += f"X-Consul-Token: {token}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    if body or method in ("PUT", "POST"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- workloads --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Prebuilt requests for one side: the same keys, values and shapes as the other side's."""

    put_requests: list[bytes]
    get_requests: list[bytes]
    expect_in_get: list[bytes]  # a fragment every GET answer must contain (the value, base64)


def make_keys_and_values(n_keys: int, key_bytes: int, value_bytes: int, seed: int = 7) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    alphabet = (string.ascii_letters + string.digits).encode()
    pairs = []
    for i in range(n_keys):
        key = f"bench/{i:0{key_bytes - 6}d}"
        assert len(key) == key_bytes
        pairs.append((key, bytes(rng.choice(alphabet) for _ in range(value_bytes))))
    return pairs


def shipyard_workload(port: int, pairs: Sequence[tuple[str, bytes]], token: str = "") -> Workload:
    return Workload(
        put_requests=[http_request("PUT", f"/v1/kv/{k}", port, v, token=token) for k, v in pairs],
        get_requests=[http_request("GET", f"/v1/kv/{k}", port, token=token) for k, _ in pairs],
        expect_in_get=[b64(v).encode() for _, v in pairs],
    )


def etcd_workload(port: int, pairs: Sequence[tuple[str, bytes]]) -> Workload:
    def post(path: str, payload: dict[str, str]) -> bytes:
        return http_request("POST", path, port, json.dumps(payload).encode(), "application/json")

    return Workload(
        put_requests=[post("/v3/kv/put", {"key": b64(k.encode()), "value": b64(v)}) for k, v in pairs],
        get_requests=[post("/v3/kv/range", {"key": b64(k.encode())}) for k, _ in pairs],
        expect_in_get=[b64(v).encode() for _, v in pairs],
    )


@dataclass
class PhaseResult:
    ops: int
    seconds: float
    errors: int
    latencies: list[float] = field(repr=False)
    server_cpu_s: float
    client_cpu_s: float
    store_cpu_s: float = 0.0  # CPU of the server's own store process (etcd under shipyard-etcd), same interval

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def closed_loop(
    server: ServerUnderTest,
    requests: Sequence[bytes],
    concurrency: int,
    duration: float,
    expect: Sequence[bytes] | None = None,
) -> PhaseResult:
    """`concurrency` connections, each sending its next request as soon as the previous one is answered."""
    conns = await connect_many(server.port, concurrency)
    latencies: list[float] = []
    errors = 0
    counter = 0
    stop_at = 0.0

    async def drive(offset: int) -> None:
        nonlocal errors, counter
        conn = conns[offset]
        i = offset * 7919
        n = len(requests)
        perf = time.perf_counter
        record = latencies.append
        while True:
            i = (i + 1) % n
            t = perf()
            if t >= stop_at:
                return
            status, body = await conn.send(requests[i])
            record(perf() - t)
            counter += 1
            if status != 200 or (expect is not None and expect[i] not in body):
                errors += 1

    backing = server.etcd if isinstance(server, ShipyardOnEtcdServer) else None
    cpu0, client0, store0 = server.cpu(), time.process_time(), backing.cpu() if backing else 0.0
    t0 = time.perf_counter()
    stop_at = t0 + duration
    await asyncio.gather(*(drive(j) for j in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu1, client1, store1 = server.cpu(), time.process_time(), backing.cpu() if backing else 0.0
    for conn in conns:
        conn.close()
    return PhaseResult(counter, elapsed, errors, latencies, cpu1 - cpu0, client1 - client0, store1 - store0)


async def populate(server: ServerUnderTest, workload: Workload, concurrency: int) -> None:
    """Writes every key once so GETs find values (and checks that writes succeed at all)."""
    conns = await connect_many(server.port, concurrency)
    failures: list[str] = []

    async def drive(offset: int) -> None:
        for i in range(offset, len(workload.put_requests), concurrency):
            status, body = await conns[offset].send(workload.put_requests[i])
            if status != 200:
                failures.append(f"{status} {body[:200]!r}")

    await asyncio.gather(*(drive(j) for j in range(concurrency)))
    for conn in conns:
        conn.close()
    if failures:
        raise RuntimeError(f"{server.name}: {len(failures)} populate writes failed, e.g. {failures[0]}")


# ---- blocking-query / watch fan-out -------------------------------------------------------------------------


@dataclass
class FanoutResult:
    watchers: int
    answered: int
    all_answered_s: float
    first_answer_s: float
    write_ack_s: float


async def fanout_shipyard(server: ServerUnderTest, watchers: int, settle: float, timeout: float) -> FanoutResult:
    """`watchers` Consul blocking queries (?index=N) on one key, then one write; time until all answered."""
    key = "fanout/key0000001"
    control = await connect(server.port)
    status, _ = await control.send(http_request("PUT", f"/v1/kv/{key}", server.port, b"before"))
    assert status == 200, status
    status, _ = await control.send(http_request("GET", f"/v1/kv/{key}", server.port))
    assert status == 200, status
    index = control.consul_index
    conns = await connect_many(server.port, watchers)
    blocking = http_request("GET", f"/v1/kv/{key}?index={index}&wait=120s", server.port)
    answers = [conn.send(blocking) for conn in conns]
    # A Consul blocking query gives no "registered" signal: give the server time to take them all in.
    await asyncio.sleep(settle)
    early = sum(1 for a in answers if a.done())
    if early:
        raise RuntimeError(f"shipyard: {early} blocking queries answered before the write")
    t0 = time.perf_counter()
    ack = control.send(http_request("PUT", f"/v1/kv/{key}", server.port, b"after"))
    done, _ = await asyncio.wait([*answers, ack], timeout=timeout)
    ack_at = control.completed_at
    answered = [c.completed_at for c, a in zip(conns, answers, strict=True) if a in done and a.result()[0] == 200]
    for conn in [*conns, control]:
        conn.close()
    return FanoutResult(
        watchers,
        len(answered),
        (max(answered) - t0) if len(answered) == watchers else float("inf"),
        (min(answered) - t0) if answered else float("inf"),
        ack_at - t0,
    )


async def fanout_etcd(server: ServerUnderTest, watchers: int, timeout: float) -> FanoutResult:
    """`watchers` /v3/watch streams on one key, then one write; time until every stream has the event."""
    key = b"fanout/key0000001"
    loop = asyncio.get_running_loop()
    created = 0
    all_created = loop.create_future()
    event_times: list[float] = []
    all_events = loop.create_future()

    def on_message(message: bytes) -> None:
        nonlocal created
        result = json.loads(message).get("result", {})
        if result.get("created"):
            created += 1
            if created == watchers and not all_created.done():
                all_created.set_result(None)
        if result.get("events"):
            event_times.append(time.perf_counter())
            if len(event_times) == watchers and not all_events.done():
                all_events.set_result(None)

    control = await connect(server.port)
    put = json.dumps({"key": b64(key), "value": b64(b"before")}).encode()
    status, _ = await control.send(http_request("POST", "/v3/kv/put", server.port, put, "application/json"))
    assert status == 200, status
    conns = await connect_many(server.port, watchers)
    watch = json.dumps({"create_request": {"key": b64(key)}}).encode()
    for conn in conns:
        conn.on_message = on_message
        conn.send(http_request("POST", "/v3/watch", server.port, watch, "application/json"))
    await asyncio.wait_for(all_created, timeout)
    t0 = time.perf_counter()
    put = json.dumps({"key": b64(key), "value": b64(b"after")}).encode()
    ack = control.send(http_request("POST", "/v3/kv/put", server.port, put, "application/json"))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_events, timeout)
    await ack
    ack_at = control.completed_at
    for conn in [*conns, control]:
        conn.close()
    return FanoutResult(
        watchers,
        len(event_times),
        (max(event_times) - t0) if len(event_times) == watchers else float("inf"),
        (min(event_times) - t0) if event_times else float("inf"),
        ack_at - t0,
    )


# ---- orchestration ------------------------------------------------------------------------------------------


def summarise(runs: list[PhaseResult]) -> dict[str, float]:
    ops = sum(r.ops for r in runs)
    return {
        "ops_per_s": round(statistics.median(r.ops_per_s for r in runs), 1),
        "p50_ms": round(statistics.median(r.percentile_ms(0.50) for r in runs), 3),
        "p99_ms": round(statistics.median(r.percentile_ms(0.99) for r in runs), 3),
        "errors": sum(r.errors for r in runs),
        "server_cpu_us_per_op": round(sum(r.server_cpu_s for r in runs) / ops * 1e6, 1) if ops else 0.0,
        "client_cpu_us_per_op": round(sum(r.client_cpu_s for r in runs) / ops * 1e6, 1) if ops else 0.0,
        "store_cpu_us_per_op": round(sum(r.store_cpu_s for r in runs) / ops * 1e6, 1) if ops else 0.0,
        "runs_ops_per_s": [round(r.ops_per_s, 1) for r in runs],  # type: ignore[dict-item]
    }


def summarise_fanout(runs: list[FanoutResult]) -> dict[str, float]:
    return {
        "watchers": runs[0].watchers,
        "all_answered_s": round(statistics.median(r.all_answered_s for r in runs), 4),
        "first_answer_s": round(statistics.median(r.first_answer_s for r in runs), 4),
        "write_ack_s": round(statistics.median(r.write_ack_s for r in runs), 4),
        "min_answered": min(r.answered for r in runs),
        "runs_all_answered_s": [round(r.all_answered_s, 4) for r in runs],  # type: ignore[dict-item]
    }


def describe(r: PhaseResult) -> str:
    def per_op(seconds: float) -> str:
        return f"{seconds / max(r.ops, 1) * 1e6:.0f} us"

    return (f"{r.ops_per_s:9.0f} ops/s  p50 {r.percentile_ms(0.5):6.2f} ms  p99 {r.percentile_ms(0.99):6.2f} ms  "
            f"errors {r.errors}  cpu/op: server {per_op(r.server_cpu_s)}"
            + (f", its etcd {per_op(r.store_cpu_s)}" if r.store_cpu_s else "") + f", client {per_op(r.client_cpu_s)}")


async def measure_fanout(args: argparse.Namespace, servers: dict[str, ServerUnderTest],
                         results: dict[str, dict[str, list]], rep: int) -> None:
    for name in ("shipyard", "etcd"):
        if name not in servers:
            continue
        if name == "shipyard":
            f = await fanout_shipyard(servers[name], args.watchers, args.settle, args.fanout_timeout)
        else:
            f = await fanout_etcd(servers[name], args.watchers, args.fanout_timeout)
        results[name]["fanout"].append(f)
        progress(
            f"run {rep + 1}/{args.repeats} {name:8} fan-out: {f.answered}/{f.watchers} answered, "
            f"all in {f.all_answered_s * 1000:.1f} ms (first {f.first_answer_s * 1000:.1f} ms, "
            f"write ack {f.write_ack_s * 1000:.1f} ms)"
        )


def ratios_of(figures: dict[str, dict[str, Any]], acl: dict[str, Any] | None,
              on_etcd: dict[str, Any] | None) -> dict[str, float | None]:
    """Throughput ratios: the server on SQLite against etcd, with ACLs against without, on etcd against etcd."""
    def ops(side: dict[str, Any] | None, op: str) -> float:
        return float(side[op]["ops_per_s"]) if side else 0.0

    def ratio(ours: float, theirs: float) -> float | None:
        return round(ours / theirs, 3) if ours and theirs else None

    plain, etcd = figures.get("shipyard"), figures.get("etcd")
    ratios: dict[str, float | None] = {}
    for op in ("put", "get"):
        ratios[op] = ratio(ops(plain, op), ops(etcd, op))
    for op in ("put", "get"):
        ratios[f"acl_{op}"] = ratio(ops(acl, op), ops(plain, op))
    for op in ("put", "get"):
        ratios[f"etcd_store_{op}"] = ratio(ops(on_etcd, op), ops(etcd, op))
    return ratios


async def run(args: argparse.Namespace, servers: dict[str, ServerUnderTest]) -> dict[str, object]:
    load_at_start = os.getloadavg()[0]
    pairs = make_keys_and_values(args.keys, args.key_bytes, args.value_bytes)
    builders: dict[str, Callable[..., Workload]] = {"shipyard": shipyard_workload, "etcd": etcd_workload,
                                                    "shipyard-acl": shipyard_workload,
                                                    "shipyard-etcd": shipyard_workload}
    workloads = {name: builders[name](server.port, pairs) for name, server in servers.items()}
    acl_server = servers.get("shipyard-acl")
    if isinstance(acl_server, ShipyardAclServer):
        workloads["shipyard-acl"] = shipyard_workload(acl_server.port, pairs, acl_server.token)
    results: dict[str, dict[str, list]] = {name: {"put": [], "get": [], "fanout": []} for name in servers}

    for name, server in servers.items():
        progress(f"{name}: populating {args.keys} keys and warming up for {args.warmup}s per operation")
        await populate(server, workloads[name], args.concurrency)
        await closed_loop(server, workloads[name].put_requests, args.concurrency, args.warmup)
        await closed_loop(server, workloads[name].get_requests, args.concurrency, args.warmup)

    # Phases alternate between the two servers so that noise from other load on the machine hits both alike.
    for rep in range(args.repeats):
        for op in ("put", "get"):
            for name, server in servers.items():
                w = workloads[name]
                requests, expect = (w.put_requests, None) if op == "put" else (w.get_requests, w.expect_in_get)
                r = await closed_loop(server, requests, args.concurrency, args.duration, expect)
                results[name][op].append(r)
                progress(f"run {rep + 1}/{args.repeats} {name:8} {op}: {describe(r)}")
        if "sqlite" in args.phases:  # the ACL and etcd-store phases measure KV GET/PUT only
            await measure_fanout(args, servers, results, rep)

    figures: dict[str, dict[str, object]] = {}
    for name in servers:
        figures[name] = {
            "put": summarise(results[name]["put"]),
            "get": summarise(results[name]["get"]),
            "fanout": summarise_fanout(results[name]["fanout"]) if results[name]["fanout"] else None,
        }
    acl = figures.pop("shipyard-acl", None)
    on_etcd = figures.pop("shipyard-etcd", None)

    ratios = ratios_of(figures, acl, on_etcd)
    fanout_s = figures["shipyard"]["fanout"]["all_answered_s"] if "shipyard" in figures else None  # type: ignore[index]
    return {
        "bench": "kv",
        "reference": "etcd " + etcd_version(),
        "key_bytes": args.key_bytes,
        "value_bytes": args.value_bytes,
        "keys": args.keys,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "phases": sorted(args.phases),
        # other load on the machine (1-minute load average at the start and the end) skews every ratio
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "shipyard": figures.get("shipyard"),
        "etcd": figures.get("etcd"),
        "shipyard_acl": acl,
        "shipyard_on_etcd": on_etcd,
        "ratios": ratios,
        "targets": {"put_ratio": PUT_RATIO_TARGET, "get_ratio": GET_RATIO_TARGET, "fanout_s": FANOUT_TARGET_S,
                    "acl_ratio": ACL_RATIO_TARGET, "etcd_store_ratio": ETCD_STORE_RATIO_TARGET},
        "meets_targets": {
            "put": ratios["put"] is not None and ratios["put"] >= PUT_RATIO_TARGET,
            "get": ratios["get"] is not None and ratios["get"] >= GET_RATIO_TARGET,
            "fanout": fanout_s is not None and fanout_s < FANOUT_TARGET_S,
            "acl": all(r is not None and r >= ACL_RATIO_TARGET for r in (ratios["acl_put"], ratios["acl_get"])),
            "etcd_store": all(r is not None and r >= ETCD_STORE_RATIO_TARGET
                              for r in (ratios["etcd_store_put"], ratios["etcd_store_get"])),
        },
    }


def etcd_version() -> str:
    try:
        out = subprocess.run([ETCD_BINARY, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0].split(":", 1)[1].strip() if out else "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 2s phases, 1 repeat")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per phase (medians are reported)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per operation and server")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (one per connection)")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys written and read")
    parser.add_argument("--key-bytes", type=int, default=16)
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--watchers", type=int, default=1000, help="blocking queries / watch streams on one key")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds for blocking queries to be taken in")
    parser.add_argument("--fanout-timeout", type=float, default=30.0)
    parser.add_argument("--no-acl", action="store_true", help="skip the ACL phase (a second server with --acl)")
    parser.add_argument("--no-etcd-store", action="store_true",
                        help="skip the etcd-store phase (a server on the bench's etcd against etcd's own gateway)")
    parser.add_argument(
        "--phases", default=",".join(PHASES),
        help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all; etcd-store alone runs etcd and the "
             "server on it only)")
    parser.add_argument("--workdir", default=None, help="parent of the temp dirs (default: system temp)")
    parser.add_argument(
        "--only", choices=("shipyard", "etcd"), default=None, help="measure one side only (no ratios; for debugging)"
    )
    args = parser.parse_args(argv)
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if unknown := args.phases - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))} (known: {', '.join(PHASES)})")
    if args.no_acl:
        args.phases.discard("acl")
    if args.no_etcd_store:
        args.phases.discard("etcd-store")
    if args.quick:
        args.duration, args.repeats, args.warmup, args.settle = 2.0, 1, 1.0, 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.exists(ETCD_BINARY):
        progress(f"{ETCD_BINARY} is missing (apt-get install etcd-server)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="shipyard-bench-kv-", dir=args.workdir))
    etcd = EtcdServer(workdir)
    servers: dict[str, ServerUnderTest] = {"etcd": etcd}
    if args.phases & {"sqlite", "acl"}:
        servers = {"shipyard": ShipyardServer(workdir), **servers}  # the ACL phase's reference is the plain server
    if "etcd-store" in args.phases:
        servers["shipyard-etcd"] = ShipyardOnEtcdServer(workdir, etcd)  # after etcd: started once etcd is up
    if "acl" in args.phases:
        servers["shipyard-acl"] = ShipyardAclServer(workdir)
    if args.only:
        servers = {args.only: servers[args.only]}
    try:
        for name, server in servers.items():
            progress(f"starting {name} on 127.0.0.1:{server.port} in {workdir}")
            server.start()
        figures = uvloop.run(run(args, servers))
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
