"""Benchmark of a Shipyard cluster: several servers on one etcd, many agents holding many instances with TTL checks.

Owns the harness (etcd, the servers, the simulated agents as subprocesses) and the measurements; it never imports
Shipyard internals: agents are what the servers see of agents, Consul API requests.

What it measures, in one run (one JSON line on stdout, progress on stderr):
- registration: `--agents` agents (distinct node names, asyncio tasks in `--agent-procs` processes) register
  `--instances` instances, each a service instance with a TTL check, through /v1/catalog/register, spread over the
  servers (a Consul agent's anti-entropy sync does the same requests);
- fan-out: `--watchers` blocking queries /v1/health/service/web?index=N spread over the servers, then one catalog
  change (a new instance of web); the time until every watcher is answered (target < 1 s);
- server RSS per 1,000 instances (each server's resident memory after registration minus before);
- heartbeats: the agents' TTL check updates (each a check status write with a new Output, as an agent syncs a TTL
  pass to the servers) for `--heartbeat-duration` seconds, closed loop: how many per second the servers sustain;
- failover: kill -9 of the leading server; the time until the others agree on a new leader.

Usage: python bench/cluster.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv import (  # bench/ is not a package: its scripts share helpers by path
    ETCD_BINARY,
    EtcdServer,
    HttpConnection,
    ServerUnderTest,
    connect,
    connect_many,
    http_request,
)

FANOUT_TARGET_S = 1.0
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
WATCHED = "web"


def progress(message: str) -> None:
    print(f"[bench/cluster] {message}", file=sys.stderr, flush=True)


class ClusterServer(ServerUnderTest):
    """One `shipyard server` on the bench's etcd, RabbitMQ as its bus (several servers: a cluster)."""

    def __init__(self, workdir: Path, index: int, etcd: EtcdServer, leader_ttl: int) -> None:
        self.name = f"server-{index}"
        super().__init__(workdir / self.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etcd = etcd
        self.leader_ttl = leader_ttl

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(self.workdir / "data"),
            "--http-port", str(self.port), "--dns-port", "0", "--vault-port", "0", "--no-gateway",
            "--store", f"etcd://127.0.0.1:{self.etcd.port}/bench-cluster", "--bus", RABBIT_URL,
            "--node", self.name, "--leader-ttl", str(self.leader_ttl), "--log-level", "warning",
        ]  # fmt: skip

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/status/leader"

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def leader(self) -> str:
        with urllib.request.urlopen(self.ready_url(), timeout=2) as resp:
            return str(json.loads(resp.read()))


# ---- the agents (run as subprocesses of this script: --agent-phase) ------------------------------------------------


def instance_plan(agents: range, total_agents: int, instances: int) -> list[tuple[str, str, str]]:
    """(node, service name, instance id) of every instance the given agents hold; 1 in 100 instances is `web`."""
    out = []
    per_agent = instances // total_agents
    for a in agents:
        for i in range(per_agent):
            n = a * per_agent + i
            service = WATCHED if n % 100 == 0 else f"svc-{n % 97}"
            out.append((f"agent-{a:03d}", service, f"{service}-{n}"))
    return out


def register_body(node: str, service: str, sid: str, output: str, with_service: bool) -> bytes:
    body: dict[str, object] = {
        "Node": node, "Address": "127.0.0.1", "SkipNodeUpdate": not with_service,
        "Check": {"CheckID": f"ttl:{sid}", "Name": f"{sid} TTL", "ServiceID": sid, "Status": "passing",
                  "Output": output, "Definition": {"TTL": "30s"}},
    }  # fmt: skip
    if with_service:
        body["Service"] = {"ID": sid, "Service": service, "Address": "127.0.0.1", "Port": 8080}
    return json.dumps(body).encode()


async def drive(ports: list[int], requests: list[tuple[int, bytes]], concurrency: int,
                until: float | None) -> tuple[int, int]:
    """Sends (port, request) pairs over `concurrency` keep-alive connections (each bound to one server), closed loop;
    all of them once, or round and round until `until`. Returns (answered 200, other)."""
    per_server = max(1, concurrency // len(ports))
    ok = bad = 0

    async def loop(port: int, share: list[bytes]) -> None:
        nonlocal ok, bad
        conn = await connect(port)
        try:
            while share:
                for request in share:
                    if until is not None and time.monotonic() >= until:
                        return
                    status, _ = await conn.send(request)
                    ok, bad = (ok + 1, bad) if status == 200 else (ok, bad + 1)
                if until is None:
                    return
        finally:
            conn.close()

    tasks = []
    for port in ports:
        mine = [r for q, r in requests if q == port]
        tasks += [loop(port, mine[k::per_server]) for k in range(per_server)]
    await asyncio.gather(*tasks)
    return ok, bad


def agent_phase(args: argparse.Namespace) -> None:
    """In an agent subprocess: register (every instance once) or heartbeat (until the deadline)."""
    first, last = (int(x) for x in args.agent_range.split("-"))
    ports = [int(p) for p in args.ports.split(",")]
    plan = instance_plan(range(first, last + 1), args.agents, args.instances)
    requests = []
    for k, (node, service, sid) in enumerate(plan):
        port = ports[int(node[-3:]) % len(ports)]  # an agent talks to one server, as it would to its nearest
        if args.agent_phase == "register":
            requests.append((port, http_request("PUT", "/v1/catalog/register", port,
                                                register_body(node, service, sid, "registered", True))))
        else:
            requests.append((port, http_request("PUT", "/v1/catalog/register", port,
                                                register_body(node, service, sid, f"beat {k}", False))))
    random.Random(first).shuffle(requests)
    until = None if args.agent_phase == "register" else time.monotonic() + args.heartbeat_duration
    started = time.monotonic()
    ok, bad = uvloop.run(drive(ports, requests, args.agent_concurrency, until))
    print(json.dumps({"ok": ok, "bad": bad, "seconds": time.monotonic() - started}), flush=True)


def run_agents(args: argparse.Namespace, phase: str, servers: list[ClusterServer]) -> dict[str, float]:
    """The agents' phase in --agent-procs processes at once; their counts summed."""
    ports = ",".join(str(s.port) for s in servers if s.proc is not None and s.proc.poll() is None)
    per = -(-args.agents // args.agent_procs)
    procs = []
    for first in range(0, args.agents, per):
        last = min(args.agents, first + per) - 1
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--agent-phase", phase, "--agent-range", f"{first}-{last}",
             "--ports", ports, "--agents", str(args.agents), "--instances", str(args.instances),
             "--agent-concurrency", str(max(1, args.concurrency // args.agent_procs)),
             "--heartbeat-duration", str(args.heartbeat_duration)],
            stdout=subprocess.PIPE))  # fmt: skip
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"agent process for {phase} exited with {proc.returncode}")
        results.append(json.loads(out))
    seconds = max(r["seconds"] for r in results)
    ok, bad = sum(r["ok"] for r in results), sum(r["bad"] for r in results)
    return {"ok": ok, "errors": bad, "seconds": round(seconds, 2), "per_s": round(ok / seconds, 1) if seconds else 0}


# ---- fan-out and failover -------------------------------------------------------------------------------------------


async def fanout(servers: list[ClusterServer], watchers: int, settle: float, timeout: float) -> dict[str, object]:
    """`watchers` blocking health queries on `web`, spread over the servers; one new web instance; time to all."""
    first = servers[0]
    control = await connect(first.port)
    conns: list[HttpConnection] = []
    answers = []
    indexes = []
    for k, server in enumerate(servers):
        # each watcher blocks on the index its own server answered, as a Consul client does
        probe = await connect(server.port)
        status, body = await probe.send(http_request("GET", f"/v1/health/service/{WATCHED}", server.port))
        if status != 200:
            raise RuntimeError(f"{server.name}: /v1/health/service/{WATCHED} answered {status}: {body[:300]!r}")
        indexes.append(probe.consul_index)
        probe.close()
        share = watchers // len(servers) + (1 if k < watchers % len(servers) else 0)
        mine = await connect_many(server.port, share)
        query = http_request("GET", f"/v1/health/service/{WATCHED}?index={indexes[-1]}&wait=120s", server.port)
        answers += [conn.send(query) for conn in mine]
        conns += mine
    await asyncio.sleep(settle)  # a blocking query gives no "registered" signal: time for every server to take them
    early = sum(1 for a in answers if a.done())
    if early:
        raise RuntimeError(f"{early} blocking queries answered before the change (indexes {indexes})")
    change = register_body("agent-000", WATCHED, f"{WATCHED}-fanout-{time.time_ns()}", "new", True)
    t0 = time.perf_counter()
    ack = control.send(http_request("PUT", "/v1/catalog/register", first.port, change))
    done, _ = await asyncio.wait([*answers, ack], timeout=timeout)
    write_ack = control.completed_at - t0 if ack in done else float("inf")
    answered = [c.completed_at for c, a in zip(conns, answers, strict=True) if a in done and a.result()[0] == 200]
    for conn in [*conns, control]:
        conn.close()
    all_s = (max(answered) - t0) if len(answered) == watchers else float("inf")
    return {"watchers": watchers, "answered": len(answered), "all_answered_s": round(all_s, 4), "indexes": indexes,
            "first_answer_s": round(min(answered) - t0, 4) if answered else float("inf"),
            "write_ack_s": round(write_ack, 4)}


def agreed_leader(servers: list[ClusterServer]) -> str:
    answers = set()
    for server in servers:
        try:
            answers.add(server.leader())
        except OSError:
            return ""
    return answers.pop() if len(answers) == 1 else ""


def failover(servers: list[ClusterServer], timeout: float = 60.0) -> dict[str, object]:
    """kill -9 of the leader; seconds until every other server names the same new, live leader."""
    leader_addr = agreed_leader(servers)
    leader = next((s for s in servers if leader_addr.endswith(f":{s.port}")), None)
    if leader is None or leader.proc is None:
        return {"error": f"no agreed leader before the kill ({leader_addr!r})"}
    os.killpg(leader.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    leader.proc.wait(10)
    rest = [s for s in servers if s is not leader]
    while time.monotonic() - t0 < timeout:
        now = agreed_leader(rest)
        if now and now != leader_addr:
            return {"killed": leader.name, "new_leader_s": round(time.monotonic() - t0, 3)}
        time.sleep(0.02)
    return {"killed": leader.name, "new_leader_s": float("inf")}


# ---- orchestration --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, servers: list[ClusterServer]) -> dict[str, object]:
    time.sleep(2)  # the servers' first election and node records settle before anything is measured
    rss_before = [s.rss_bytes() for s in servers]
    progress(f"registering {args.instances} instances of {args.agents} agents over {len(servers)} servers")
    registration = run_agents(args, "register", servers)
    progress(f"registered: {registration}")
    if registration["errors"]:
        raise RuntimeError(f"{registration['errors']} registrations failed")
    time.sleep(1)
    rss_after = [s.rss_bytes() for s in servers]
    rss_per_1000 = [round((a - b) / (args.instances / 1000) / 2**20, 2) for a, b in zip(rss_after, rss_before,
                                                                                         strict=True)]
    fanouts = []
    for rep in range(args.repeats):
        f = uvloop.run(fanout(servers, args.watchers, args.settle, args.fanout_timeout))
        progress(f"fan-out {rep + 1}/{args.repeats}: {f}")
        fanouts.append(f)
    progress(f"heartbeats for {args.heartbeat_duration}s")
    heartbeats = run_agents(args, "heartbeat", servers)
    progress(f"heartbeats: {heartbeats}")
    failed_over = failover(servers)
    progress(f"failover: {failed_over}")
    fan_s = statistics.median(float(f["all_answered_s"]) for f in fanouts)  # type: ignore[arg-type]
    return {
        "bench": "cluster",
        "servers": len(servers), "agents": args.agents, "instances": args.instances, "watchers": args.watchers,
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "registration": registration,
        "fanout": {"all_answered_s": fan_s, "runs": fanouts},
        "server_rss_mib_per_1000_instances": rss_per_1000,
        "server_rss_mib_after": [round(r / 2**20, 1) for r in rss_after],
        "heartbeats": heartbeats,
        "failover": {**failed_over, "leader_ttl_s": args.leader_ttl},
        "targets": {"fanout_s": FANOUT_TARGET_S},
        "meets_targets": {"fanout": fan_s < FANOUT_TARGET_S},
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: 10 agents, 1,000 instances, 200 watchers")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--agent-procs", type=int, default=2, help="processes the agents run in (asyncio tasks)")
    parser.add_argument("--concurrency", type=int, default=64, help="agents' requests in flight, in all")
    parser.add_argument("--heartbeat-duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="fan-out runs (the median is reported)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds for blocking queries to be taken in")
    parser.add_argument("--fanout-timeout", type=float, default=30.0)
    parser.add_argument("--leader-ttl", type=int, default=3, help="the servers' --leader-ttl")
    parser.add_argument("--workdir", default=None, help="parent of the temp dirs (default: system temp)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the servers' data and logs")
    # internal: one process of agents
    parser.add_argument("--agent-phase", choices=("register", "heartbeat"), help=argparse.SUPPRESS)
    parser.add_argument("--agent-range", help=argparse.SUPPRESS)
    parser.add_argument("--agent-concurrency", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.instances, args.watchers, args.heartbeat_duration = 10, 1000, 200, 3.0
        args.repeats, args.settle = 1, 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.agent_phase:
        agent_phase(args)
        return 0
    if not os.path.exists(ETCD_BINARY):
        progress(f"{ETCD_BINARY} is missing (apt-get install etcd-server)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="shipyard-bench-cluster-", dir=args.workdir))
    etcd = EtcdServer(workdir)
    servers = [ClusterServer(workdir, i, etcd, args.leader_ttl) for i in range(args.servers)]
    try:
        progress(f"starting etcd and {args.servers} servers in {workdir}")
        etcd.start()
        for server in servers:
            server.start(timeout=60)
        figures = run(args, servers)
    finally:
        for server in servers:
            server.stop()
        etcd.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
