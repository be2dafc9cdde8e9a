"""Per-job reconciliation: which instances to start, keep, relabel or stop, and how the job's deployment advances.

It must never pick nodes (placement.py does) and never reads a clock: `now` comes from the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shipyard.scheduler.model import TERMINAL, Allocation, Deployment, Job, JobRevert, Stop, VersionUpdate
from shipyard.spec import UpdatePolicy


@dataclass
class JobDecision:
    """What one job needs; `place` lists (index, canary) pairs still to be given nodes."""

    place: list[tuple[int, bool]] = field(default_factory=list)
    stop: list[Stop] = field(default_factory=list)
    update: list[VersionUpdate] = field(default_factory=list)
    waiting: tuple[int, ...] = ()  # indexes held back until the job's dependencies are met
    deployment: Deployment | None = None  # the deployment new placements belong to
    changed: list[Deployment] = field(default_factory=list)  # deployments to write (new, advanced, cancelled)
    revert: JobRevert | None = None


def deployment_id(job: Job) -> str:
    # Deterministic, so planning twice from the same snapshot yields the same plan.
    return f"{job.id}.v{job.version}.g{job.generation}"


def instance_slots(count: int, retired: tuple[int, ...] | frozenset[int] = ()) -> list[int]:
    """The indexes a job of `count` instances occupies: the lowest ones not retired (killed by name)."""
    if not retired:
        return list(range(count))
    skip = set(retired)
    out: list[int] = []
    i = 0
    while len(out) < count:
        if i not in skip:
            out.append(i)
        i += 1
    return out


def compact_retired(count: int, retired: set[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Only retired indexes below the highest slot in use change which slots a job occupies; the rest are dropped,
    so the set never outgrows the job."""
    slots = instance_slots(count, tuple(retired))
    top = slots[-1] if slots else -1
    return tuple(sorted(i for i in retired if i < top))


def stable(alloc: Allocation, now: float, min_healthy_time: float) -> bool:
    since = alloc.healthy_since
    return alloc.client == "healthy" and since is not None and now - since >= min_healthy_time


def _stop(alloc: Allocation, reason: str) -> Stop:
    return Stop(alloc.id, alloc.job, alloc.node, reason)


def reconcile_stopped(job_id: str, allocs: list[Allocation], deployment: Deployment | None,
                      reason: str) -> JobDecision:
    """A deleted or stopped job: every live instance stops and an unfinished deployment is cancelled."""
    decision = JobDecision()
    live = sorted((a for a in allocs if a.desired == "run"), key=lambda a: -a.index)
    decision.stop = [_stop(a, reason) for a in live]
    if deployment is not None and deployment.active:
        decision.changed.append(replace(deployment, status="cancelled", description=reason))
    return decision


def reconcile_job(job: Job, allocs: list[Allocation], latest: Deployment | None, alive_nodes: set[str] | frozenset,
                  now: float, template: str, waiting_for: str = "", draining: frozenset[str] = frozenset(),
                  drain_expired: frozenset[str] = frozenset()) -> JobDecision:
    """waiting_for: why the job's dependencies are not met yet ("" when they are); it holds back the placements of
    a job that has not started, never those of one already running (ordering at start only, as in Compose).

    draining: nodes whose instances move elsewhere as a rolling update would (replacement placed and stable before
    the old one stops, max_parallel at a time); drain_expired: draining nodes past their deadline, whose instances
    stop at once (and are placed again elsewhere)."""
    decision = JobDecision()
    spec = job.spec
    policy = spec.update
    wanted = 0 if job.status == "stopped" else spec.instances
    slots = instance_slots(wanted, job.retired)
    in_slots = (lambda i: i < wanted) if not job.retired else set(slots).__contains__

    # Instances whose node vanished or whose process is done hold nothing and get replaced.
    live: list[Allocation] = []
    for a in allocs:
        if a.desired != "run":
            continue
        if a.node not in alive_nodes or a.client == "lost":
            decision.stop.append(_stop(a, "node lost"))
        elif a.node in drain_expired:
            decision.stop.append(_stop(a, "node drain deadline reached"))
        elif a.client in TERMINAL:
            decision.stop.append(_stop(a, f"instance {a.client}"))
        else:
            live.append(a)

    # Scaling down stops the highest indexes first (or the retired ones: those killed by name).
    for a in sorted((a for a in live if not in_slots(a.index)), key=lambda a: -a.index):
        decision.stop.append(_stop(a, "scaled down" if wanted else "job stopped"))
    live = [a for a in live if in_slots(a.index)]

    current: dict[int, Allocation] = {}
    outdated: dict[int, Allocation] = {}
    for a in sorted(live, key=lambda a: (a.client != "healthy", a.created_at)):
        fresh = a.template == template and a.generation == job.generation and a.node not in draining
        bucket = current if fresh else outdated
        if a.index in bucket:
            decision.stop.append(_stop(a, "duplicate instance"))  # keeps the healthy, older one
        else:
            bucket[a.index] = a

    # The deployment of this version and restart generation, created on first sight.
    d = latest
    if d is None or (d.version, d.generation) != (job.version, job.generation):
        if d is not None and d.active:
            decision.changed.append(replace(d, status="cancelled", description=f"superseded by version {job.version}"))
        canary_count = min(policy.canary, len(outdated)) if outdated else 0
        d = Deployment(id=deployment_id(job), job=job.id, version=job.version, generation=job.generation,
                       status="running", created_at=now, desired_total=wanted, desired_canaries=canary_count,
                       description="placing canaries" if canary_count else "deploying")
    decision.deployment = d

    for a in current.values():
        if a.version != job.version:
            decision.update.append(VersionUpdate(a.id, job.id, job.version))

    if d.status in ("failed", "cancelled"):
        # A failed rollout is frozen where it stands (the old version keeps serving) until the job changes; but an
        # index left with nothing (its instance lost or failed) is still filled, as Nomad's reconciler does.
        stable_version = job.stable_version
        if d.status == "failed" and policy.auto_revert and stable_version is not None and stable_version != job.version:
            decision.revert = JobRevert(job.id, stable_version, f"deployment {d.id} failed: {d.description}")
        _place_missing(decision, slots, current, outdated, live, waiting_for)
        # ...and instances on a draining node still move (to the job's current version: the only one it can place).
        _roll(decision, {i: a for i, a in outdated.items() if a.node in draining}, current, policy, now, draining)
        return decision

    ours = [a for a in current.values() if a.deployment == d.id]
    gave_up = [a for a in allocs if a.desired == "run" and a.client == "failed" and a.deployment == d.id]
    failure = _deadline_failure(ours, gave_up, now, policy.healthy_deadline)
    if failure and d.active:
        d = replace(d, status="failed", description=failure)
        stable_version = job.stable_version
        if policy.auto_revert and stable_version is not None and stable_version != job.version:
            decision.revert = JobRevert(job.id, stable_version, f"deployment {d.id} failed: {failure}")
        decision.changed.append(_count(d, ours, 0, 0, now, policy.min_healthy_time))
        return decision

    _place_missing(decision, slots, current, outdated, live, waiting_for)
    waiting = sorted(i for i in outdated if i not in current)
    placed_canaries = 0

    canary_phase = d.active and d.desired_canaries > 0 and not d.promoted
    if canary_phase:
        have = sum(1 for a in ours if a.canary)
        for i in waiting[:max(0, d.desired_canaries - have)]:
            decision.place.append((i, True))
            placed_canaries += 1
        canaries = [a for a in ours if a.canary]
        if len(canaries) == d.desired_canaries and all(stable(a, now, policy.min_healthy_time) for a in canaries):
            d = replace(d, status="paused-for-promotion", description="canaries healthy; waiting for promotion")
    else:
        if d.status == "paused-for-promotion":
            d = replace(d, status="running", description="promoted")
        _roll(decision, outdated, current, policy, now, draining)

    if not d.active:
        return decision  # a successful deployment only keeps the count up; its record stays as it ended
    d = _count(d, ours, len(decision.place), placed_canaries, now, policy.min_healthy_time)
    if decision.waiting:
        d = replace(d, description=waiting_for)
    elif d.description.startswith("waiting for ") and decision.place:
        d = replace(d, description="deploying")
    replaced_all = all(i in current and stable(current[i], now, policy.min_healthy_time) for i in outdated)
    if (d.active and not canary_phase and not decision.place and replaced_all and len(current) == wanted
            and all(stable(a, now, policy.min_healthy_time) for a in current.values())):
        d = replace(d, status="successful", description="all instances healthy")
    decision.deployment = d
    if d != latest:
        decision.changed.append(d)
    return decision


def _roll(decision: JobDecision, outdated: dict[int, Allocation], current: dict[int, Allocation],
          policy: UpdatePolicy, now: float, draining: frozenset[str]) -> None:
    """Old instances (outdated, or on a draining node) go only once their replacement has been healthy for
    min_healthy_time (surge, never dip), max_parallel replacements in flight at a time."""
    in_flight = 0
    for i, old in sorted(outdated.items()):
        new = current.get(i)
        if new is None:
            continue
        if stable(new, now, policy.min_healthy_time):
            why = "node draining; " if old.node in draining else ""
            decision.stop.append(_stop(old, f"{why}replaced by {new.id}"))
        else:
            in_flight += 1
    waiting = sorted(i for i in outdated if i not in current)
    for i in waiting[:max(0, policy.max_parallel - in_flight)]:
        decision.place.append((i, False))


def _place_missing(decision: JobDecision, slots: list[int], current: dict[int, Allocation],
                   outdated: dict[int, Allocation], live: list[Allocation], waiting_for: str) -> None:
    """Indexes with nothing at all are placed at once: a new job, scale-up, or a lost or failed instance; a job
    that has nothing live yet waits for its dependencies first."""
    missing = [i for i in slots if i not in current and i not in outdated]
    if waiting_for and not live and missing:
        decision.waiting = tuple(missing)
        return
    decision.place.extend((i, False) for i in missing)


def _deadline_failure(ours: list[Allocation], gave_up: list[Allocation], now: float, deadline: float) -> str:
    for a in sorted(gave_up, key=lambda a: a.index):
        return f"instance {a.index} ({a.id}) failed"
    for a in sorted(ours, key=lambda a: a.index):
        if a.client != "healthy" and now - a.created_at > deadline:
            return f"instance {a.index} ({a.id}) not healthy within {deadline:g}s (status {a.client})"
    return ""


def _count(d: Deployment, ours: list[Allocation], placing: int, placing_canaries: int, now: float,
           min_healthy_time: float) -> Deployment:
    healthy = sum(1 for a in ours if stable(a, now, min_healthy_time))
    unhealthy = sum(1 for a in ours if a.client == "unhealthy")
    return replace(d, placed=len(ours) + placing, placed_canaries=sum(1 for a in ours if a.canary) + placing_canaries,
                   healthy=healthy, unhealthy=unhealthy)
