"""Scheduler benchmark: the planner's placement rate on Nomad's C1M shape, and deploy-to-healthy time.

Owns the simulated snapshot and the timing; the planner part starts no process (planning is pure), the
time-to-healthy part runs a real server with real instances.

Usage: python bench/scheduler.py [--quick] [--spread]
  (progress on stderr, one JSON line with all figures on stdout)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from shipyard.scheduler import Job, Node, Snapshot, plan
from shipyard.spec import Resources, TaskSpec

# Nomad's "C1M" run placed 1,000,000 containers on 5,000 nodes in under 5 minutes: about 3,750 placements/s.
NOMAD_C1M_PLACEMENTS_PER_S = 3750
TARGET_PLACEMENTS_PER_S = 10_000

NODE_CPU = 4000  # MHz
NODE_MEMORY = 16384  # MB


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def c1m_snapshot(nodes: int, jobs: int, instances: int) -> Snapshot:
    """An empty cluster and `jobs` new jobs; instance sizes vary per job so the packing is not trivial.

    Averages of 15 MHz and 48 MB per instance fill 75% of the cpu and 59% of the memory at the full C1M shape;
    64 MB jobs run out of memory first and 32 MB jobs out of cpu, so nodes end up full in either dimension.
    """
    cluster = [Node(f"node-{n:05d}", NODE_CPU, NODE_MEMORY, {"rack": f"r{n % 50}"}) for n in range(nodes)]
    specs = [
        Job(f"job-{j:04d}", 1, TaskSpec(name=f"job-{j:04d}", kind="service", cmd="sleep infinity", instances=instances,
                                         resources=Resources(cpu=10 + 5 * (j % 3), memory=32 * (1 + j % 2))))
        for j in range(jobs)
    ]
    return Snapshot(nodes=cluster, jobs=specs, now=0.0, revision=1)


def bench_planner(nodes: int, jobs: int, instances: int, spread: bool) -> dict[str, Any]:
    snapshot = c1m_snapshot(nodes, jobs, instances)
    log(f"planning {jobs} jobs x {instances} instances on {nodes} nodes (spread={spread}) ...")
    gc.collect()
    gc.disable()  # a million new records would otherwise trigger collections that measure gc, not the planner
    try:
        started = time.perf_counter()
        result = plan(snapshot, spread=spread, candidates=4 if spread else 2)
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    placed = len(result.place)
    unplaced = sum(len(u.indexes) for u in result.unplaceable)
    rate = placed / elapsed
    log(f"  placed {placed:,} in {elapsed:.2f}s = {rate:,.0f}/s; unplaceable {unplaced}")
    assert placed + unplaced == jobs * instances, "an instance was neither placed nor reported unplaceable"
    used: dict[str, list[int]] = {}
    for alloc in result.place:
        cpu_mem = used.setdefault(alloc.node, [0, 0])
        cpu_mem[0] += alloc.cpu
        cpu_mem[1] += alloc.memory
    assert all(c <= NODE_CPU and m <= NODE_MEMORY for c, m in used.values()), "a node was overcommitted"

    # A second pass over the placed cluster: the steady-state cost of a reconcile that has nothing to place.
    settled = Snapshot(nodes=snapshot.nodes, jobs=snapshot.jobs, allocations=result.place,
                       deployments=result.deployments, now=1.0, revision=2)
    gc.disable()
    try:
        started = time.perf_counter()
        again = plan(settled, spread=spread)
        replan = time.perf_counter() - started
    finally:
        gc.enable()
    assert not again.place, "re-planning a placed cluster placed more"
    log(f"  re-plan of the placed cluster ({len(result.place):,} allocations): {replan:.2f}s")
    return {
        "nodes": nodes, "jobs": jobs, "instances_per_job": instances, "spread": spread,
        "placements": placed, "unplaceable": unplaced, "plan_s": round(elapsed, 3),
        "placements_per_s": round(rate), "nodes_used": len(used), "replan_s": round(replan, 3),
        "nomad_c1m_placements_per_s": NOMAD_C1M_PLACEMENTS_PER_S,
        "ratio_vs_nomad": round(rate / NOMAD_C1M_PLACEMENTS_PER_S, 2),
        "target_placements_per_s": TARGET_PLACEMENTS_PER_S, "meets_target": rate >= TARGET_PLACEMENTS_PER_S,
    }


APP = Path(__file__).resolve().parent.parent / "tests" / "apps" / "versioned_http.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy_spec(instances: int) -> dict[str, Any]:
    return {"services": {"bench": {
        "cmd": f"{sys.executable} {APP}", "instances": instances, "ports": ["http"],
        "health": {"http": "/health", "interval": "1s", "timeout": "1s"},
        "resources": {"cpu": 10, "memory": 32}, "stop_grace": "2s",
        "update": {"max_parallel": max(1, instances), "min_healthy_time": "0s"},
    }}}


def _job(api: str) -> dict[str, Any]:
    return httpx.get(f"{api}/api/v1/jobs/bench", timeout=10).json()


def _wait(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"not reached in {timeout}s")


def bench_time_to_healthy(quick: bool) -> dict[str, Any] | None:
    """Deploy 1, 10 and 100 instances of a small HTTP service on a real server and time until all are
    healthy (passing their HTTP check); then kill -9 one instance and time until it is healthy again."""
    counts = (1, 10) if quick else (1, 10, 100)
    out: dict[str, Any] = {"target_100_s": 10.0}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-") as tmp:
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", f"{tmp}/data",
             "--http-port", str(port), "--dns-port", "0", "--drain-delay", "0.2"],
            stdout=open(f"{tmp}/server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait(lambda: _ok(api), 30)
            for n in counts:
                started = time.monotonic()
                httpx.post(f"{api}/api/v1/jobs", json=_deploy_spec(n), timeout=30).raise_for_status()
                _wait(lambda n=n: _job(api)["instances"]["healthy"] == n, 120)
                out[f"instances_{n}_s"] = round(time.monotonic() - started, 2)
                log(f"time to healthy: {n} instance(s) in {out[f'instances_{n}_s']}s")
                if n == counts[-1]:
                    out["restart_after_kill9_s"] = _kill_one_and_time(api)
                    log(f"kill -9 of one instance: healthy again in {out['restart_after_kill9_s']}s")
                httpx.delete(f"{api}/api/v1/jobs/bench", timeout=30).raise_for_status()
                _wait(lambda: not httpx.get(f"{api}/api/v1/allocs", timeout=10).json()["allocations"], 120)
        finally:
            # A stopping server leaves instances running for the next one to adopt: delete them first.
            with contextlib.suppress(Exception):
                httpx.delete(f"{api}/api/v1/jobs/bench", timeout=30)
                _wait(lambda: not httpx.get(f"{api}/api/v1/allocs", timeout=30).json()["allocations"], 120)
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    if "instances_100_s" in out:
        out["meets_target"] = out["instances_100_s"] < out["target_100_s"]
    return out


def _ok(api: str) -> bool:
    try:
        return httpx.get(f"{api}/v1/status/leader", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _kill_one_and_time(api: str) -> float:
    alloc = next(a for a in _job(api)["allocations"] if a["desired"] == "run")
    pid = alloc["status"]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def healthy_again() -> bool:
        status = httpx.get(f"{api}/api/v1/allocs/{alloc['id']}", timeout=10).json()["allocation"]["status"]
        return status["pid"] != pid and status["client"] == "healthy"

    _wait(healthy_again, 60)
    return round(time.monotonic() - killed, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 nodes, 100 jobs x 100 instances")
    parser.add_argument("--spread", action="store_true", help="also spread a job's instances across nodes")
    args = parser.parse_args()
    shape = (500, 100, 100) if args.quick else (5000, 1000, 1000)
    figures: dict[str, Any] = {
        "bench": "scheduler", "quick": args.quick, "python": platform.python_version(),
        "planner": bench_planner(*shape, spread=args.spread),
        "time_to_healthy": bench_time_to_healthy(args.quick),
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
