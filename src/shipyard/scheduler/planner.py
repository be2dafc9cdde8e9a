"""plan(snapshot) -> Plan: every job reconciled, every new instance given a node or a reason why not.

It must never do I/O, read a clock or start anything; the caller writes the plan to the store, agents act on it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from shipyard.errors import Conflict
from shipyard.scheduler.feasibility import RulePlacer, by_class_note, pool_counts
from shipyard.scheduler.model import TERMINAL, Allocation, Deployment, Job, Plan, Snapshot, Unplaceable, Waiting
from shipyard.scheduler.placement import NodePool
from shipyard.scheduler.reconcile import JobDecision, reconcile_job, reconcile_stopped


def plan(snapshot: Snapshot, *, spread: bool = False, candidates: int = 2) -> Plan:
    """Reconcile every job in the snapshot; jobs are visited in id order so a plan is deterministic.

    spread: prefer, among equally good fits, nodes with fewer instances of the same job.
    candidates: how many fitting nodes to rank per placement (more = tighter packing, slower).
    """
    demands = [(j.spec.resources.cpu, j.spec.resources.memory) for j in snapshot.jobs]
    floor = (min(c for c, _ in demands), min(m for _, m in demands)) if demands else (0, 0)
    pool = NodePool(snapshot.nodes, snapshot.allocations, floor)
    alive = frozenset(pool.index_of)
    draining = Draining.of(snapshot)
    by_job: dict[str, list[Allocation]] = defaultdict(list)
    for alloc in snapshot.allocations:
        by_job[alloc.job].append(alloc)
    latest: dict[str, Deployment] = {d.job: d for d in snapshot.deployments}
    jobs = {job.id: job for job in snapshot.jobs}
    result = Plan()
    seq = 0
    up = _dependency_states(jobs, by_job)

    for job_id in sorted(set(by_job) | set(latest)):
        if job_id not in jobs and job_id not in snapshot.frozen:
            _merge(result, reconcile_stopped(job_id, by_job.get(job_id, []), latest.get(job_id), "job deleted"))

    for job_id in sorted(jobs):
        job = jobs[job_id]
        allocs = by_job.get(job_id, [])
        template = job.spec.template_hash()
        if job.status == "stopped":
            decision = reconcile_stopped(job_id, allocs, latest.get(job_id), "job stopped")
        else:
            waiting_for = _waiting_for(job, jobs, up) if job.spec.depends_on else ""
            decision = reconcile_job(job, allocs, latest.get(job_id), alive, snapshot.now, template, waiting_for,
                                     draining.nodes, draining.expired)
            if decision.waiting:
                result.waiting.append(Waiting(job_id, decision.waiting, waiting_for))
        _merge(result, decision)
        if decision.place:
            rules = _rule_placer(pool, snapshot, job, template, decision, allocs, draining.nodes)
            seq = _place(result, pool, job, template, decision, allocs, snapshot, seq, spread, candidates, rules)
    return result


class Draining:
    """The nodes being drained, and those whose drain deadline has passed (what still runs there is stopped)."""

    def __init__(self, nodes: frozenset[str], expired: frozenset[str]) -> None:
        self.nodes = nodes
        self.expired = expired

    @classmethod
    def of(cls, snapshot: Snapshot) -> Draining:
        draining = [n for n in snapshot.nodes if n.draining]
        expired = [n.id for n in draining if n.drain_deadline is not None and snapshot.now >= n.drain_deadline]
        return cls(frozenset(n.id for n in draining), frozenset(expired))


def _rule_placer(pool: NodePool, snapshot: Snapshot, job: Job, template: str, decision: JobDecision,
                 allocs: list[Allocation], draining: frozenset[str]) -> RulePlacer | None:
    """Only jobs with placement rules pay for a scan of the nodes. The instances that count against distinct and
    spread rules are those that stay: not stopping, not outdated (a rolling update replaces them), not on a
    draining node (they are moving)."""
    if not job.spec.has_placement_rules:
        return None
    stopping = {s.alloc for s in decision.stop}
    counted = [a for a in allocs if a.desired == "run" and a.client not in TERMINAL and a.id not in stopping
               and a.node not in draining and a.template == template and a.generation == job.generation]
    return RulePlacer(pool, snapshot.nodes, job.spec, counted)


# Client statuses that count as "started" for depends_on: the process runs (healthy or not yet checked).
STARTED = frozenset({"running", "healthy"})


def _dependency_states(jobs: dict[str, Job], by_job: dict[str, list[Allocation]]) -> dict[str, tuple[bool, bool]]:
    """(started, healthy) of every job some other job depends on: at least one live instance running / healthy."""
    out: dict[str, tuple[bool, bool]] = {}
    for job in jobs.values():
        for dep in job.spec.depends_on:
            if dep in out:
                continue
            live = [a.client for a in by_job.get(dep, ()) if a.desired == "run"]
            out[dep] = (any(c in STARTED for c in live), "healthy" in live)
    return out


def _waiting_for(job: Job, jobs: dict[str, Job], up: dict[str, tuple[bool, bool]]) -> str:
    """Why the job may not start yet ("" if it may): the first dependency, by name, whose condition is unmet.

    A dependency that wants no instances is met (waiting for it would wait forever); one that is stopped or not
    deployed is not, and the reason says so."""
    for dep, condition in sorted(job.spec.depends_on.items()):
        target = jobs.get(dep)
        if target is not None and target.status == "running" and target.spec.instances == 0:
            continue
        started, healthy = up.get(dep, (False, False))
        if healthy or (started and condition == "started"):
            continue
        reason = f"waiting for {dep} to be {condition}"
        if target is None:
            reason += f" (no job named {dep})"
        elif target.status != "running":
            reason += f" ({dep} is stopped)"
        return reason
    return ""


def _merge(result: Plan, decision: JobDecision) -> None:
    result.stop.extend(decision.stop)
    result.update.extend(decision.update)
    result.deployments.extend(decision.changed)
    if decision.revert is not None:
        result.reverts.append(decision.revert)


def _place(result: Plan, pool: NodePool, job: Job, template: str, decision: JobDecision, allocs: list[Allocation],
           snapshot: Snapshot, seq: int, spread: bool, candidates: int, rules: RulePlacer | None = None) -> int:
    resources = job.spec.resources
    cpu, mem = resources.cpu, resources.memory
    counts: dict[int, int] | None = None
    if spread:
        counts = defaultdict(int)
        for a in allocs:
            if a.desired == "run" and a.node in pool.index_of:
                counts[pool.index_of[a.node]] += 1
    total = max(1, job.spec.instances)
    deployment_id = decision.deployment.id if decision.deployment is not None else None
    ids, choose, reserve, place = pool.ids, pool.choose, pool.reserve, result.place.append
    prefix = f"{job.id}."
    suffix = f".{snapshot.revision}-"
    failed: list[int] = []
    for index, canary in decision.place:
        if failed:  # capacity only shrinks within a plan: what did not fit once will not fit again
            failed.append(index)
            continue
        i = choose(cpu, mem, counts, total, candidates) if rules is None else rules.choose(cpu, mem)
        if i is None:
            failed.append(index)
            continue
        reserve(i, cpu, mem)
        if counts is not None:
            counts[i] += 1
        if rules is not None:
            rules.placed(i)
        seq += 1
        place(Allocation(f"{prefix}{index}{suffix}{seq}", job.id, job.version, index, ids[i], cpu, mem, template,
                         job.generation, "run", "pending", deployment_id, canary, snapshot.now, None))
    if failed:
        reason = _why(pool, snapshot, rules, cpu, mem)
        figures = rules.counts(cpu, mem) if rules is not None else pool_counts(pool, cpu, mem)
        result.unplaceable.append(Unplaceable(job.id, tuple(failed), reason, figures))
        _account_unplaced(result, deployment_id, decision, failed, reason)
    return seq


def _why(pool: NodePool, snapshot: Snapshot, rules: RulePlacer | None, cpu: int, mem: int) -> str:
    if rules is not None:
        return rules.why(cpu, mem)
    reason = pool.unplaceable_reason(cpu, mem)
    note = by_class_note(pool, snapshot.nodes, cpu, mem)
    return f"{reason}; {note}" if note else reason


def _account_unplaced(result: Plan, deployment_id: str | None, decision: JobDecision, failed: list[int],
                      reason: str) -> None:
    """The deployment record counts only what was really placed, and says why the rest was not."""
    canaries = sum(1 for index, canary in decision.place if canary and index in set(failed))
    for n, d in enumerate(result.deployments):
        if d.id == deployment_id:
            result.deployments[n] = replace(d, placed=d.placed - len(failed),
                                            placed_canaries=d.placed_canaries - canaries,
                                            description=f"{len(failed)} instance(s) unplaceable: {reason}")


def check_conflict(job_change: Job, active_deployment: Deployment | None, force: bool = False) -> None:
    """Refuse (409) a change to a job whose deployment is still rolling out, unless forced.

    A forced change supersedes the running deployment: the next plan cancels it and starts the new one.
    """
    d = active_deployment
    if d is None or force or not d.active or d.job != job_change.id:
        return
    raise Conflict(
        f"job {job_change.id!r} has a deployment in progress ({d.id}, {d.status}); "
        "wait for it, promote it, or force the change",
        {"job": job_change.id, "deployment": d.id, "status": d.status, "version": d.version},
    )
