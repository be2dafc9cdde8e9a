"""SchedulerLoop: the level-triggered reconciler from jobs/ to allocs/ — reads a snapshot, plans, commits the plan.

It decides nothing itself (planner.plan does) and never starts a process (agents do); each plan is committed in
one txn guarded by compares, so concurrent loops or API writes make it re-plan, never corrupt state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

import orjson

from shipyard.errors import NotLeader
from shipyard.scheduler.jobs import decode_version, revert_ops
from shipyard.scheduler.model import (
    Allocation,
    Deployment,
    Job,
    JobRevert,
    Node,
    Plan,
    Snapshot,
    Unplaceable,
    Waiting,
)
from shipyard.scheduler.planner import plan as make_plan
from shipyard.scheduler.records import (
    ALLOC_STATUS,
    ALLOCS,
    DEPLOYMENTS,
    JOBS,
    NODE_CONTROL,
    NODES,
    PLAN_GUARD,
    UNPLACEABLE,
    WAITING,
    alloc_key,
    controls_by_node,
    decode_alloc,
    decode_deployment,
    decode_job,
    decode_node,
    decode_status,
    deployment_key,
    dumps,
    encode_alloc,
    encode_deployment,
    encode_job,
    job_key,
    job_version_key,
    split_node_alloc,
    unplaceable_key,
    waiting_key,
    with_control,
)
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store, follow_prefix
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger("shipyard.scheduler")

WATCHED = (NODES, NODE_CONTROL, JOBS, DEPLOYMENTS, ALLOCS, ALLOC_STATUS)
# A failed compare means someone wrote in between; re-read and re-plan up to this many times per pass.
PLAN_ATTEMPTS = 8
# While a deployment is active, time alone (min_healthy_time, deadlines) moves it on: look again at least this often.
ACTIVE_RECHECK = 1.0
MIN_RECHECK = 0.02
ERROR_BACKOFF = 1.0


@dataclass
class StoreState:
    """A snapshot plus the raw records it came from, whose revisions guard the commit."""

    snapshot: Snapshot
    jobs: dict[str, tuple[Job, KeyValue]] = field(default_factory=dict)
    deployments: dict[str, KeyValue] = field(default_factory=dict)
    allocs: dict[str, tuple[Allocation, KeyValue]] = field(default_factory=dict)  # merged with client status
    statuses: dict[str, KeyValue] = field(default_factory=dict)  # alloc id -> alloc-status record
    unplaceable: dict[str, KeyValue] = field(default_factory=dict)  # job -> record
    waiting: dict[str, KeyValue] = field(default_factory=dict)  # job -> record
    guard: KeyValue | None = None
    # Job records that cannot be decoded: job id -> (record, why). Planned from their last good version when this
    # process has seen one, else left exactly as they are (never taken for deleted).
    unreadable: dict[str, tuple[KeyValue, str]] = field(default_factory=dict)


def _read_jobs(state: StoreState, job_kvs: list[KeyValue], job_cache: dict[str, tuple[int, Job]] | None) -> None:
    """Decodes job records into state.jobs; one that cannot be decoded goes to state.unreadable instead (with its
    last good version in state.jobs when the cache has one), never skipped as if the job had been deleted."""
    seen = set()
    for kv in job_kvs:
        seen.add(kv.key)
        cached = job_cache.get(kv.key) if job_cache is not None else None
        if cached is not None and cached[0] == kv.mod_revision:
            state.jobs[cached[1].id] = (cached[1], kv)
            continue
        try:
            job = decode_job(kv.value)
        except Exception as exc:  # any decoding failure quarantines the record, never the cluster
            job_id = unquote(kv.key[len(JOBS):])
            state.unreadable[job_id] = (kv, f"{type(exc).__name__}: {exc}")
            if cached is not None and cached[1].id == job_id:
                state.jobs[job_id] = (cached[1], kv)  # its last good version, guarded by the record as it is now
            continue
        state.jobs[job.id] = (job, kv)
        if job_cache is not None:
            job_cache[kv.key] = (kv.mod_revision, job)
    if job_cache is not None:
        for key in [k for k in job_cache if k not in seen]:
            del job_cache[key]


def _read_deployments(state: StoreState, dep_kvs: list[KeyValue]) -> list[Deployment]:
    deployments: list[Deployment] = []
    for kv in dep_kvs:
        try:
            d = decode_deployment(kv.value)
        except Exception:
            # Kept as the job's record all the same: the next plan writes a fresh deployment over it (guarded by
            # it), where skipping it would guard on "no record" and make that job's commit fail forever.
            state.deployments[unquote(kv.key[len(DEPLOYMENTS):])] = kv
            log.error("scheduler: deployment record %s cannot be read; it will be replaced", kv.key)
            continue
        deployments.append(d)
        state.deployments[d.job] = kv
    return deployments


async def read_state(store: Store, now: float | None = None,
                     job_cache: dict[str, tuple[int, Job]] | None = None) -> StoreState:
    """Everything at one revision: a read-only txn is a consistent snapshot in both backends.

    job_cache (key -> (mod_revision, Job)) spares re-validating unchanged specs on every pass."""
    prefixes = (NODES, JOBS, DEPLOYMENTS, ALLOCS, ALLOC_STATUS, UNPLACEABLE, WAITING, NODE_CONTROL)
    read = await store.txn((), [Get(p, True) for p in prefixes] + [Get(PLAN_GUARD)])
    (node_kvs, job_kvs, dep_kvs, alloc_kvs, status_kvs, unplaceable_kvs, waiting_kvs, control_kvs,
     guard_kvs) = read.ranges()
    controls = controls_by_node(control_kvs)
    nodes: list[Node] = []
    for kv in node_kvs:
        with contextlib.suppress(Exception):  # an unreadable record is skipped, never fatal for the cluster
            node = decode_node(kv.value)
            nodes.append(with_control(node, controls.get(node.id)))
    state = StoreState(Snapshot((), ()))
    _read_jobs(state, job_kvs, job_cache)
    deployments = _read_deployments(state, dep_kvs)
    client: dict[str, tuple[str, float | None]] = {}
    for kv in status_kvs:
        with contextlib.suppress(Exception):
            alloc_id = split_node_alloc(kv.key, ALLOC_STATUS)[1]
            state.statuses[alloc_id] = kv
            status = decode_status(kv.value)
            client[alloc_id] = (status.client, status.healthy_since)
    for kv in alloc_kvs:
        with contextlib.suppress(Exception):
            alloc = decode_alloc(kv.value)
            if alloc.id in client:
                c, since = client[alloc.id]
                alloc = replace(alloc, client=c, healthy_since=since)
            state.allocs[alloc.id] = (alloc, kv)
    for kv in unplaceable_kvs:
        with contextlib.suppress(Exception):
            state.unplaceable[orjson.loads(kv.value)["job"]] = kv
    for kv in waiting_kvs:
        with contextlib.suppress(Exception):
            state.waiting[orjson.loads(kv.value)["job"]] = kv
    state.guard = guard_kvs[0] if guard_kvs else None
    state.snapshot = Snapshot(
        nodes=nodes,
        jobs=[job for job, _ in state.jobs.values()],
        frozen=frozenset(j for j in state.unreadable if j not in state.jobs),
        allocations=[a for a, _ in state.allocs.values()],
        deployments=deployments,
        now=time.time() if now is None else now,
        revision=read.revision,
    )
    return state


class SchedulerLoop:
    """Watches the scheduler's inputs and re-plans on every change, and on a short timer while rolling out."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 fence: Callable[[], list[Compare]] | None = None, owner: str = "") -> None:
        self.store = store
        self.clock = clock
        # In a cluster, the compares that hold only while this server leads (raises NotLeader when it knows it
        # does not): every plan txn carries them, so a deposed leader's commit fails in the store itself.
        self.fence = fence
        self.owner = owner  # written in the plan guard: which server committed each plan
        self.passes = 0
        self.commits = 0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._job_cache: dict[str, tuple[int, Job]] = {}
        self._reported: dict[str, int] = {}  # unreadable job -> mod_revision already logged

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._watch(prefix), name=f"scheduler-watch-{prefix}")
                       for prefix in WATCHED]
        self._tasks.append(asyncio.create_task(self._run(), name="scheduler-loop"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_all_and_wait(tasks)

    def wake(self) -> None:
        """Ask for a pass soon (the API calls this after a write so no watch latency is added)."""
        self._dirty.set()

    # ---- one pass --------------------------------------------------------------------------------

    async def run_once(self) -> tuple[Plan, float | None]:
        """Plan from the store and commit it job by job; returns what was committed and when to look again
        (None: on events).

        Each job's part of the plan is its own txn, so a job whose compares cannot hold (a concurrent write, a
        record changed under us) never holds back another's; the jobs that conflicted are planned again."""
        self.passes += 1
        committed = Plan()
        if self.fence is not None:
            self.fence()  # not leading: no read, no plan (NotLeader)
        conflicted: list[str] = []
        for _ in range(PLAN_ATTEMPTS):
            state = await read_state(self.store, self.clock(), self._job_cache)
            self._report_unreadable(state)
            result = make_plan(state.snapshot)
            groups = await self._commit_ops(state, result)
            conflicted = await self._commit_groups(state, groups)
            _merge_plan(committed, result, set(groups) - set(conflicted))
            if not conflicted:
                return committed, next_recheck(state.snapshot, result)
        log.error("scheduler: the plan of %s kept conflicting with the store (%d attempts); the other jobs were "
                  "committed; trying again shortly", ", ".join(sorted(conflicted)), PLAN_ATTEMPTS)
        return committed, MIN_RECHECK * 10

    async def _commit_groups(self, state: StoreState, groups: dict[str, _JobTxn]) -> list[str]:
        """Commits each job's txn; returns the jobs whose compares failed. Every txn also moves the plan guard, so
        concurrent loops still serialise: after one of ours commits, the next expects the guard it left."""
        guard = state.guard.mod_revision if state.guard else 0
        fence = self.fence() if self.fence is not None else []
        conflicted = []
        for job_id in sorted(groups):
            group = groups[job_id]
            entry, dep = state.jobs.get(job_id), state.deployments.get(job_id)
            unreadable = state.unreadable.get(job_id)
            job_kv = entry[1] if entry else unreadable[0] if unreadable else None
            # What the job's plan was decided from must still hold: its record, its deployment, no plan in between.
            compares = [*group.compares,
                        Compare(job_key(job_id), "mod", "=", job_kv.mod_revision if job_kv else 0),
                        Compare(deployment_key(job_id), "mod", "=", dep.mod_revision if dep else 0),
                        Compare(PLAN_GUARD, "mod", "=", guard), *fence]
            ops = [*group.ops, Put(PLAN_GUARD, dumps({"revision": state.snapshot.revision, "at": state.snapshot.now,
                                                      "job": job_id, "by": self.owner}))]
            outcome = await self.store.txn(compares, ops)
            if outcome.succeeded:
                self.commits += 1
                guard = outcome.revision
            else:
                conflicted.append(job_id)
        return conflicted

    def _report_unreadable(self, state: StoreState) -> None:
        """Once per record version, at ERROR: a job that cannot be read is not managed until someone fixes it."""
        for job_id, (kv, why) in state.unreadable.items():
            if self._reported.get(job_id) == kv.mod_revision:
                continue
            self._reported[job_id] = kv.mod_revision
            kept = ("planned from its last good version" if job_id in state.jobs
                    else "its instances are left as they are")
            log.error("scheduler: job %s: record %s (revision %d) cannot be read (%s); %s until it is deployed "
                      "again or deleted", job_id, kv.key, kv.mod_revision, why, kept)
        for job_id in [j for j in self._reported if j not in state.unreadable]:
            del self._reported[job_id]

    async def _commit_ops(self, state: StoreState, plan: Plan) -> dict[str, _JobTxn]:
        groups: dict[str, _JobTxn] = {}

        def group(job_id: str) -> _JobTxn:
            return groups.setdefault(job_id, _JobTxn())

        changed_allocs: dict[str, Allocation] = {}
        for stop in plan.stop:
            alloc = changed_allocs.get(stop.alloc) or state.allocs[stop.alloc][0]
            changed_allocs[stop.alloc] = replace(alloc, desired="stop")
        for update in plan.update:
            alloc = changed_allocs.get(update.alloc) or state.allocs[update.alloc][0]
            changed_allocs[update.alloc] = replace(alloc, version=update.version)
        for alloc_id, alloc in changed_allocs.items():
            kv = state.allocs[alloc_id][1]
            if alloc == state.allocs[alloc_id][0]:
                group(alloc.job)  # already as wanted (a stop of a stopped alloc): nothing to write, still guarded
                continue
            group(alloc.job).add(Put(kv.key, encode_alloc(alloc)), Compare(kv.key, "mod", "=", kv.mod_revision))
        for alloc in plan.place:
            key = alloc_key(alloc.node, alloc.id)
            group(alloc.job).add(Put(key, encode_alloc(alloc)), Compare(key, "create", "=", 0))

        job_puts: dict[str, Job] = {}
        for d in plan.deployments:
            encoded = encode_deployment(d)
            stored = state.deployments.get(d.job)
            # The planner may hand back a deployment exactly as stored; rewriting it would wake us forever.
            if stored is not None and stored.value == encoded:
                continue
            group(d.job).add(Put(deployment_key(d.job), encoded))
            entry = state.jobs.get(d.job)
            if d.status == "successful" and entry is not None and d.job not in state.unreadable:
                job = entry[0]
                if (job.version, job.generation) == (d.version, d.generation) and job.stable_version != d.version:
                    job_puts[d.job] = replace(job, stable_version=d.version)
        for revert in plan.reverts:
            await self._revert_ops(state, revert, group)
            job_puts.pop(revert.job, None)
        for job_id, job in job_puts.items():
            group(job_id).add(Put(job_key(job_id), encode_job(job)))

        self._held_back_ops(plan.unplaceable, state.unplaceable, unplaceable_key, state, group)
        self._held_back_ops(plan.waiting, state.waiting, waiting_key, state, group)
        self._collect_ops(state, group)
        return {job_id: g for job_id, g in groups.items() if g.ops}

    async def _revert_ops(self, state: StoreState, revert: JobRevert, group: Callable[[str], _JobTxn]) -> None:
        entry = state.jobs.get(revert.job)
        version_kv = await self.store.get(job_version_key(revert.job, revert.to_version))
        if entry is None or version_kv is None or revert.job in state.unreadable:
            log.warning("scheduler: cannot revert %s to version %s: job or version record missing or unreadable",
                        revert.job, revert.to_version)
            return
        reverted, revert_compares, revert_puts = revert_ops(entry[0], entry[1], decode_version(version_kv.value),
                                                            revert.reason)
        log.info("scheduler: reverting %s to version %s as version %s: %s", revert.job, revert.to_version,
                 reverted.version, revert.reason)
        g = group(revert.job)
        g.compares.extend(c for c in revert_compares if c.key != job_key(revert.job))
        g.ops.extend(revert_puts)

    def _held_back_ops(self, held: list[Unplaceable] | list[Waiting], stored: dict[str, KeyValue], key: Any,
                       state: StoreState, group: Callable[[str], _JobTxn]) -> None:
        """Records of instances the plan could not place (no room) or may not place yet (depends_on), per job:
        written when they change, deleted when the job has none; `since` is kept while the reason stays."""
        reported = set()
        for u in held:
            reported.add(u.job)
            record = {"job": u.job, "indexes": list(u.indexes), "count": len(u.indexes), "reason": u.reason,
                      "since": state.snapshot.now}
            if isinstance(u, Unplaceable) and u.counts:
                record["nodes"] = dict(u.counts)  # nodes looked at and left out, by why (Marathon's queue)
            old = stored.get(u.job)
            if old is not None:
                with contextlib.suppress(Exception):
                    previous = orjson.loads(old.value)
                    if previous.get("indexes") == record["indexes"] and previous.get("reason") == u.reason:
                        continue
                    if previous.get("reason") == u.reason:
                        record["since"] = previous.get("since", record["since"])
            group(u.job).add(Put(key(u.job), dumps(record)))
        for job_id, kv in stored.items():
            if job_id not in reported and job_id not in state.snapshot.frozen:
                group(job_id).add(Delete(kv.key))

    def _collect_ops(self, state: StoreState, group: Callable[[str], _JobTxn]) -> None:
        """Stopped allocations leave allocs/ once their agent is done (it deletes its status record),
        or at once when their node is gone and no agent will ever report on them again."""
        nodes = {n.id for n in state.snapshot.nodes}
        for alloc_id, (alloc, kv) in state.allocs.items():
            if alloc.desired != "stop":
                continue
            status = state.statuses.get(alloc_id)
            if alloc.node in nodes and status is not None:
                continue
            g = group(alloc.job)
            g.add(Delete(kv.key), Compare(kv.key, "mod", "=", kv.mod_revision))
            if status is not None:
                g.add(Delete(status.key))

    # ---- running ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._dirty.set()
        recheck: float | None = None
        while True:
            if recheck is None:
                await self._dirty.wait()
            else:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event, and
                # stop() (a leader stepping down) would then wait forever for this loop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(recheck):
                        await self._dirty.wait()
            self._dirty.clear()
            try:
                _, recheck = await self.run_once()
            except asyncio.CancelledError:
                raise
            except NotLeader as exc:
                log.info("scheduler: %s; no plan committed", exc.message)
                recheck = ERROR_BACKOFF
            except Exception:
                log.exception("scheduler pass failed; retrying")
                recheck = ERROR_BACKOFF

    async def _watch(self, prefix: str) -> None:
        # Level-triggered: an event only says "look again", so a resync is a pass from a fresh read.
        await follow_prefix(self.store, prefix, self._mark_dirty, self._resync, name=f"scheduler {prefix}")

    def _mark_dirty(self, batch: object) -> None:
        self._dirty.set()

    async def _resync(self) -> int:
        revision = (await self.store.range(PLAN_GUARD)).revision
        self._dirty.set()
        return revision


@dataclass
class _JobTxn:
    """One job's part of a plan: the txn that commits it."""

    compares: list[Compare] = field(default_factory=list)
    ops: list[Any] = field(default_factory=list)

    def add(self, op: Any, compare: Compare | None = None) -> None:
        self.ops.append(op)
        if compare is not None:
            self.compares.append(compare)


def _merge_plan(into: Plan, plan: Plan, jobs: set[str]) -> None:
    """Adds to `into` the parts of `plan` that belong to `jobs` (those committed)."""
    into.place.extend(a for a in plan.place if a.job in jobs)
    into.stop.extend(s for s in plan.stop if s.job in jobs)
    into.update.extend(u for u in plan.update if u.job in jobs)
    into.deployments.extend(d for d in plan.deployments if d.job in jobs)
    into.reverts.extend(r for r in plan.reverts if r.job in jobs)
    into.unplaceable.extend(u for u in plan.unplaceable if u.job in jobs)
    into.waiting.extend(w for w in plan.waiting if w.job in jobs)


def next_recheck(snapshot: Snapshot, plan: Plan) -> float | None:
    """Seconds until time alone could change the plan (a replacement turns stable, a deadline passes)."""
    rollout = _rollout_recheck(snapshot, plan)
    if _draining_busy(snapshot):
        # A drain moves instances as a rolling update does, often outside any active deployment; its deadline
        # comes by time alone too.
        return ACTIVE_RECHECK if rollout is None else min(rollout, ACTIVE_RECHECK)
    return rollout


def _draining_busy(snapshot: Snapshot) -> bool:
    draining = {n.id for n in snapshot.nodes if n.draining}
    return bool(draining) and any(a.desired == "run" and a.node in draining for a in snapshot.allocations)


def _rollout_recheck(snapshot: Snapshot, plan: Plan) -> float | None:
    latest = {d.job: d for d in snapshot.deployments}
    latest.update({d.job: d for d in plan.deployments})
    active = {job for job, d in latest.items() if d.active}
    jobs = {j.id: j for j in snapshot.jobs}
    # A job whose current version has no deployment record yet gets one on the next pass.
    for job in snapshot.jobs:
        d = latest.get(job.id)
        if job.status == "running" and (d is None or (d.version, d.generation) != (job.version, job.generation)):
            return MIN_RECHECK * 10
    if not active:
        return None
    now = snapshot.now
    soonest: float | None = None
    for alloc in (*snapshot.allocations, *plan.place):
        owner = jobs.get(alloc.job)
        if owner is None or alloc.job not in active or alloc.desired != "run":
            continue
        policy = owner.spec.update
        if alloc.client == "healthy" and alloc.healthy_since is not None:
            at = alloc.healthy_since + policy.min_healthy_time
        else:
            at = alloc.created_at + policy.healthy_deadline
        if at > now and (soonest is None or at < soonest):
            soonest = at
    if soonest is None:
        return ACTIVE_RECHECK
    return min(ACTIVE_RECHECK, max(MIN_RECHECK, soonest - now + 0.01))
