"""Scheduler benchmark: the planner's placement rate on Nomad's C1M shape, and (later) deploy-to-healthy time.

Owns only the simulated snapshot and the timing; never starts processes for the planner part (planning is pure).

Usage: python bench/scheduler.py [--quick] [--spread]
  (progress on stderr, one JSON line with all figures on stdout)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from typing import Any

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


def bench_time_to_healthy(quick: bool) -> dict[str, Any] | None:
    """Deploy 1, 10 and 100 instances of a small HTTP service and time until all are healthy.

    Needs the node agent, which runs allocations; until it exists this reports nothing rather than a guess.
    """
    return None


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
