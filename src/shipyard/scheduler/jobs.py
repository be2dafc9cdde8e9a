"""JobService: the only writer of jobs/ and job-versions/ — deploy, scale, restart, promote, stop, delete, rollback.

It records what the user wants (a new version per change, guarded by compares); it must never place instances
or start anything: the scheduler loop plans from what it writes, agents execute.
"""

from __future__ import annotations

import builtins
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

import orjson

from shipyard.errors import BadRequest, Conflict, NotFound, Unprocessable
from shipyard.scheduler.model import Allocation, Deployment, Job
from shipyard.scheduler.planner import check_conflict
from shipyard.scheduler.reconcile import compact_retired, deployment_id, instance_slots
from shipyard.scheduler.records import (
    ALLOC_STATUS,
    ALLOCS,
    DEPLOYMENTS,
    JOBS,
    UNPLACEABLE,
    WAITING,
    AllocStatus,
    decode_alloc,
    decode_deployment,
    decode_job,
    decode_status,
    deployment_key,
    dumps,
    encode_deployment,
    encode_job,
    job_key,
    job_version_key,
    split_node_alloc,
    unplaceable_key,
    waiting_key,
)
from shipyard.script_checks import ScriptChecks
from shipyard.spec import NAME_RE, ProjectSpec, SpecError, SpecProblem, TaskSpec
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store

# A spec asking for more than this is a typo, not a plan: the planner would build a list that large.
MAX_INSTANCES = 10_000
# Compare failures mean someone else wrote in between; re-read and try again this many times.
WRITE_ATTEMPTS = 8


@dataclass(frozen=True)
class DeployResult:
    job: Job
    changed: bool
    deployment_id: str | None


@dataclass(frozen=True)
class JobVersion:
    version: int
    spec: TaskSpec
    created_at: float
    reason: str


def job_versions_prefix(job_id: str) -> str:
    return job_version_key(job_id, 0)[: -len("0000000000")]


def encode_version(version: JobVersion) -> bytes:
    return dumps({"version": version.version, "spec": version.spec.to_dict(), "created_at": version.created_at,
                  "reason": version.reason})


def decode_version(raw: bytes) -> JobVersion:
    data = orjson.loads(raw)
    return JobVersion(int(data["version"]), TaskSpec.from_dict(data["spec"]), float(data.get("created_at", 0.0)),
                      str(data.get("reason", "")))


def check_limits(spec: TaskSpec, source: str = "request body") -> None:
    """Limits the spec format leaves open but the platform cannot honour."""
    if spec.instances > MAX_INSTANCES:
        raise SpecError([SpecProblem(source, None, f"{spec.name}.instances",
                                     f"at most {MAX_INSTANCES} instances per job, got {spec.instances}")])


def keep_autoscaled_count(spec: TaskSpec, current: Job | None) -> TaskSpec:
    """A worker the autoscaler sizes keeps its current count when redeployed (within the new bounds): the file's
    `instances` is only where it starts, or every `shipyard up` would undo the scaling."""
    if current is None or spec.autoscale is None or current.spec.autoscale is None:
        return spec
    policy = spec.autoscale
    return replace(spec, instances=max(policy.min, min(policy.max, current.spec.instances)))


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise BadRequest("job id must be a non-empty string")
    return job_id


def read_job(kv: KeyValue) -> Job:
    """The job in a record, or Conflict (409) saying that the record cannot be read and what to do about it."""
    try:
        return decode_job(kv.value)
    except Exception as exc:  # whatever the decoder raised, the record is unreadable
        job_id = unquote(kv.key[len(JOBS):])
        raise Conflict(f"job {job_id!r}: its record cannot be read ({unreadable_reason(exc)}); the scheduler leaves "
                       "its instances as they are; delete the job to replace it",
                       {"job": job_id, "error": unreadable_reason(exc)}) from None


def unreadable_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class JobService:
    """Reads and changes jobs; every write is one store txn guarded by the records it was decided from."""

    def __init__(self, store: Store, *, script_checks: ScriptChecks | None = None) -> None:
        self.store = store
        # The server's switch: a spec whose health check runs a command is refused while it is off (None: no
        # refusal at this layer; the agent still asks the switch before it runs anything).
        self.script_checks = script_checks

    # ---- reads -----------------------------------------------------------------------------------

    async def _job_kv(self, job_id: str) -> KeyValue | None:
        return await self.store.get(job_key(check_job_id(job_id)))

    async def get(self, job_id: str) -> Job:
        kv = await self._job_kv(job_id)
        if kv is None:
            raise NotFound(f"no job {job_id!r}", {"job": job_id})
        return read_job(kv)

    async def list(self) -> list[Job]:
        result = await self.store.range(JOBS, prefix=True)
        jobs = []
        for kv in result.kvs:
            try:
                jobs.append(decode_job(kv.value))
            except Exception:  # an unreadable record must not hide every other job (see unreadable())
                continue
        return sorted(jobs, key=lambda j: j.id)

    # Below list(), `list` in this class's annotations is that method: the type is spelt builtins.list.
    async def unreadable(self) -> builtins.list[dict[str, Any]]:
        """Job records that cannot be decoded (the scheduler quarantines them): id, key, revision and why."""
        result = await self.store.range(JOBS, prefix=True)
        out = []
        for kv in result.kvs:
            try:
                decode_job(kv.value)
            except Exception as exc:  # whatever the decoder raised, the record is unreadable
                out.append({"id": unquote(kv.key[len(JOBS):]), "key": kv.key, "mod_revision": kv.mod_revision,
                            "error": unreadable_reason(exc)})
        return out

    async def versions(self, job_id: str) -> builtins.list[JobVersion]:
        await self.get(job_id)
        result = await self.store.range(job_versions_prefix(job_id), prefix=True)
        return [decode_version(kv.value) for kv in result.kvs]

    async def version(self, job_id: str, version: int) -> JobVersion:
        kv = await self.store.get(job_version_key(job_id, version))
        if kv is None:
            raise NotFound(f"job {job_id!r} has no version {version}", {"job": job_id, "version": version})
        return decode_version(kv.value)

    async def deployment(self, job_id: str) -> Deployment | None:
        kv = await self.store.get(deployment_key(check_job_id(job_id)))
        return decode_deployment(kv.value) if kv is not None else None

    async def deployments(self) -> builtins.list[Deployment]:
        result = await self.store.range(DEPLOYMENTS, prefix=True)
        return sorted((decode_deployment(kv.value) for kv in result.kvs), key=lambda d: d.job)

    async def unplaceable(self, job_id: str) -> dict[str, Any] | None:
        """The scheduler's last word on instances of this job it could not place, or None."""
        kv = await self.store.get(unplaceable_key(check_job_id(job_id)))
        return orjson.loads(kv.value) if kv is not None else None

    async def unplaceables(self) -> dict[str, dict[str, Any]]:
        """Every job's unplaceable record, by job: {"indexes", "count", "reason", "since"}."""
        result = await self.store.range(UNPLACEABLE, prefix=True)
        out = {}
        for kv in result.kvs:
            with contextlib.suppress(Exception):
                record = orjson.loads(kv.value)
                out[record["job"]] = record
        return out

    async def waiting(self, job_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Instances held back until their job's depends_on is met, by job: {"indexes", "reason", "since"...}."""
        if job_id is not None:
            kv = await self.store.get(waiting_key(check_job_id(job_id)))
            return {job_id: orjson.loads(kv.value)} if kv is not None else {}
        result = await self.store.range(WAITING, prefix=True)
        out = {}
        for kv in result.kvs:
            with contextlib.suppress(Exception):
                record = orjson.loads(kv.value)
                out[record["job"]] = record
        return out

    async def allocations(self, job_id: str | None = None) -> builtins.list[tuple[Allocation, AllocStatus | None]]:
        """Every allocation (also those draining) with what its agent last reported, in job and index order."""
        read = await self.store.txn((), (Get(ALLOCS, True), Get(ALLOC_STATUS, True)))
        alloc_kvs, status_kvs = read.ranges()
        statuses: dict[str, AllocStatus] = {}
        for kv in status_kvs:
            try:
                statuses[split_node_alloc(kv.key, ALLOC_STATUS)[1]] = decode_status(kv.value)
            except Exception:
                continue
        out = []
        for kv in alloc_kvs:
            try:
                alloc = decode_alloc(kv.value)
            except Exception:
                continue
            if job_id is not None and alloc.job != job_id:
                continue
            status = statuses.get(alloc.id)
            if status is not None:
                alloc = replace(alloc, client=status.client, healthy_since=status.healthy_since)
            out.append((alloc, status))
        return sorted(out, key=lambda pair: (pair[0].job, pair[0].index, pair[0].created_at))

    async def allocation(self, alloc_id: str) -> tuple[Allocation, AllocStatus | None]:
        for alloc, status in await self.allocations():
            if alloc.id == alloc_id:
                return alloc, status
        raise NotFound(f"no allocation {alloc_id!r}", {"alloc": alloc_id})

    # ---- changes ---------------------------------------------------------------------------------

    async def deploy(self, spec: TaskSpec, *, force: bool = False) -> DeployResult:
        """A new version iff the spec's content changed; the same spec again changes nothing."""
        check_limits(spec)
        if self.script_checks is not None:
            self.script_checks.require_for([spec])
        if not NAME_RE.match(spec.name):
            raise SpecError([SpecProblem("request body", None, "name", f"invalid job name {spec.name!r}")])

        def change(current: Job | None) -> tuple[Job, str] | None:
            if current is None:
                return Job(spec.name, 1, spec), "deployed"
            wanted = keep_autoscaled_count(spec, current)
            if current.spec.content_hash() == wanted.content_hash():
                if current.status == "running":
                    return None
                # Same spec on a stopped job: start it again as a fresh rollout of the same version.
                return replace(current, status="running", generation=current.generation + 1), ""
            return replace(current, version=current.version + 1, spec=wanted, status="running"), "deployed"

        job, changed = await self._change(spec.name, change, force=force, must_exist=False)
        return DeployResult(job, changed, deployment_id(job) if changed else None)

    async def deploy_project(self, project: ProjectSpec, *, force: bool = False) -> builtins.list[DeployResult]:
        """Every service and worker of a project; conflicts are checked for all before any is written."""
        tasks = list(project.tasks.values())
        for spec in tasks:
            check_limits(spec)
        if self.script_checks is not None:
            self.script_checks.require_for(tasks)
        if not force:
            conflicts: builtins.list[dict[str, Any]] = []
            for spec in tasks:
                kv = await self._job_kv(spec.name)
                current = read_job(kv) if kv is not None else None
                if current is None or current.spec.content_hash() == keep_autoscaled_count(
                        spec, current).content_hash():
                    continue
                d = await self.deployment(spec.name)
                if d is not None and d.active:
                    conflicts.append({"job": spec.name, "deployment": d.id, "status": d.status, "version": d.version})
            if conflicts:
                names = ", ".join(c["job"] for c in conflicts)
                raise Conflict(f"deployment in progress for {names}; wait for it, promote it, or force the change",
                               conflicts)
        return [await self.deploy(spec, force=force) for spec in tasks]

    async def scale(self, job_id: str, instances: Any, *, force: bool = False) -> Job:
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
            problem = {"path": "instances", "message": f"expected a non-negative integer, got {instances!r}"}
            raise Unprocessable("instances must be a non-negative integer", [problem])
        if instances > MAX_INSTANCES:
            raise Unprocessable(f"at most {MAX_INSTANCES} instances per job",
                                [{"path": "instances", "message": f"at most {MAX_INSTANCES}, got {instances}"}])

        def change(current: Job | None) -> tuple[Job, str] | None:
            assert current is not None
            # Scaling a stopped job starts it again at the new count, as scaling a suspended app does in Marathon
            # (scaling it to 0 only records the count).
            status = "running" if instances > 0 else current.status
            if current.spec.instances == instances:
                if current.status == status:
                    return None
                return replace(current, status=status, generation=current.generation + 1), ""
            spec = replace(current.spec, instances=instances)
            retired = compact_retired(instances, current.retired)
            return (replace(current, version=current.version + 1, spec=spec, status=status, retired=retired),
                    f"scaled to {instances}")

        job, _ = await self._change(job_id, change, force=force)
        return job

    async def kill_instances(self, job_id: str, indexes: set[int], *, force: bool = False) -> Job:
        """Shrinks the job by exactly the named instances (Marathon's task kill with ?scale): their indexes are
        retired, so the planner stops them and keeps the others where they are."""
        def change(current: Job | None) -> tuple[Job, str] | None:
            assert current is not None
            wanted = current.spec.instances if current.status == "running" else 0
            named = set(indexes) & set(instance_slots(wanted, current.retired))
            if not named:
                return None
            count = wanted - len(named)
            retired = compact_retired(count, set(current.retired) | named)
            spec = replace(current.spec, instances=count)
            killed = ", ".join(str(i) for i in sorted(named))
            return (replace(current, version=current.version + 1, spec=spec, retired=retired),
                    f"scaled to {count}: killed instance{'s' if len(named) > 1 else ''} {killed}")

        job, _ = await self._change(job_id, change, force=force)
        return job

    async def replace_instances(self, job_id: str, indexes: set[int], *, force: bool = False) -> Job:
        """Replaces exactly the named instances (Marathon's task kill without ?scale): their indexes are retired and
        the count stays, so the planner stops them and places as many new ones; the others keep running and the
        version does not change."""
        def change(current: Job | None) -> tuple[Job, str] | None:
            assert current is not None
            if current.status != "running":
                return None
            named = set(indexes) & set(instance_slots(current.spec.instances, current.retired))
            if not named:
                return None
            retired = compact_retired(current.spec.instances, set(current.retired) | named)
            return replace(current, retired=retired), ""

        job, _ = await self._change(job_id, change, force=force)
        return job

    async def restart(self, job_id: str, *, force: bool = False) -> Job:
        """Replaces every instance, rolling by the job's update policy; the version stays."""
        def change(current: Job | None) -> tuple[Job, str] | None:
            assert current is not None
            if current.status != "running":
                raise Conflict(f"job {job_id!r} is stopped; deploy it to start it again", {"job": job_id})
            return replace(current, generation=current.generation + 1), ""

        job, _ = await self._change(job_id, change, force=force)
        return job

    async def stop(self, job_id: str) -> Job:
        """Every instance goes; the job and its history stay, so deploying it again starts it."""
        def change(current: Job | None) -> tuple[Job, str] | None:
            assert current is not None
            return None if current.status == "stopped" else (replace(current, status="stopped"), "")

        # Stopping always wins over a rollout in progress: the planner cancels that deployment.
        job, _ = await self._change(job_id, change, force=True)
        return job

    async def rollback(self, job_id: str) -> Job:
        """Back to the last version whose deployment succeeded (or the one before, if the current one did),
        as a new version; it supersedes whatever is rolling out, as Marathon's DELETE /v2/deployments does."""
        for _ in range(WRITE_ATTEMPTS):
            kv = await self._job_kv(job_id)
            if kv is None:
                raise NotFound(f"no job {job_id!r}", {"job": job_id})
            current = read_job(kv)
            target = current.stable_version
            if target is None or target == current.version:
                older = [v.version for v in await self.versions(job_id) if v.version < current.version]
                if not older:
                    raise Conflict(f"job {job_id!r} has no earlier version to roll back to", {"job": job_id})
                target = older[-1]
            spec = (await self.version(job_id, target)).spec
            if spec.content_hash() == current.spec.content_hash() and current.status == "running":
                return current
            job = replace(current, version=current.version + 1, spec=spec, status="running")
            if await self._write(job, kv, None, f"rollback to version {target}", check_deployment=False):
                return job
        raise Conflict(f"job {job_id!r} keeps changing; try again", {"job": job_id})

    async def promote(self, job_id: str, *, force: bool = False) -> Deployment:
        """Lets a canary deployment go on to replace every instance."""
        await self.get(job_id)
        for _ in range(WRITE_ATTEMPTS):
            kv = await self.store.get(deployment_key(job_id))
            d = decode_deployment(kv.value) if kv is not None else None
            if d is None or not d.active:
                raise Conflict(f"job {job_id!r} has no deployment in progress to promote", {"job": job_id})
            if d.desired_canaries == 0 or d.promoted:
                raise Conflict(f"deployment {d.id} has no canaries waiting for promotion",
                               {"job": job_id, "deployment": d.id, "status": d.status})
            if d.status != "paused-for-promotion" and not force:
                raise Conflict(f"canaries of deployment {d.id} are not healthy yet; wait or force the promotion",
                               {"job": job_id, "deployment": d.id, "healthy": d.healthy,
                                "canaries": d.desired_canaries})
            assert kv is not None
            promoted = replace(d, promoted=True, description="promoted")
            result = await self.store.txn([Compare(kv.key, "mod", "=", kv.mod_revision)],
                                          [Put(kv.key, encode_deployment(promoted))])
            if result.succeeded:
                return promoted
        raise Conflict(f"deployment of job {job_id!r} keeps changing; try again", {"job": job_id})

    async def delete(self, job_id: str) -> None:
        """The job, its history and records go at once; the scheduler then stops its instances."""
        kv = await self._job_kv(job_id)
        if kv is None:
            raise NotFound(f"no job {job_id!r}", {"job": job_id})
        await self.store.txn(
            (),
            (Delete(job_key(job_id)), Delete(job_versions_prefix(job_id), True), Delete(deployment_key(job_id)),
             Delete(unplaceable_key(job_id)), Delete(waiting_key(job_id))),
        )

    # ---- the one write path ----------------------------------------------------------------------

    async def _change(self, job_id: str, change: Any, *, force: bool, must_exist: bool = True) -> tuple[Job, bool]:
        """Read, decide, write with compares; a compare failure means a concurrent write: decide again."""
        for _ in range(WRITE_ATTEMPTS):
            read = await self.store.txn((), (Get(job_key(check_job_id(job_id))), Get(deployment_key(job_id))))
            job_kvs, dep_kvs = read.ranges()
            kv = job_kvs[0] if job_kvs else None
            dep_kv = dep_kvs[0] if dep_kvs else None
            current = read_job(kv) if kv is not None else None
            if current is None and must_exist:
                raise NotFound(f"no job {job_id!r}", {"job": job_id})
            decided = change(current)
            if decided is None:
                assert current is not None
                return current, False
            job, reason = decided
            deployment = decode_deployment(dep_kv.value) if dep_kv is not None else None
            check_conflict(job, deployment, force)
            new_version = reason if current is None or job.version != current.version else None
            if await self._write(job, kv, dep_kv, new_version):
                return job, True
        raise Conflict(f"job {job_id!r} keeps changing; try again", {"job": job_id})

    async def _write(self, job: Job, kv: KeyValue | None, dep_kv: KeyValue | None, version_reason: str | None,
                     *, check_deployment: bool = True) -> bool:
        compares = [Compare(job_key(job.id), "mod", "=", kv.mod_revision if kv is not None else 0)]
        if check_deployment:
            # A deployment that started after we read it would make our conflict check stale.
            compares.append(Compare(deployment_key(job.id), "mod", "=", dep_kv.mod_revision if dep_kv else 0))
        ops = [Put(job_key(job.id), encode_job(job))]
        if version_reason is not None:
            record = JobVersion(job.version, job.spec, time.time(), version_reason)
            compares.append(Compare(job_version_key(job.id, job.version), "create", "=", 0))
            ops.append(Put(job_version_key(job.id, job.version), encode_version(record)))
        result = await self.store.txn(compares, ops)
        return result.succeeded


def revert_ops(job: Job, job_kv: KeyValue | None, version: JobVersion, reason: str) -> tuple[Job, list[Any], list[Any]]:
    """(job, compares, ops) for auto-revert: the stable version's spec again, as a new version (as Nomad does).

    The scheduler loop puts these into its plan's txn, so the revert and the plan commit together.
    """
    reverted = replace(job, version=job.version + 1, spec=version.spec, status="running")
    record = JobVersion(reverted.version, version.spec, time.time(), f"auto-revert to version {version.version}: "
                        f"{reason}")
    compares = [Compare(job_key(job.id), "mod", "=", job_kv.mod_revision if job_kv else 0),
                Compare(job_version_key(job.id, reverted.version), "create", "=", 0)]
    ops = [Put(job_key(job.id), encode_job(reverted)), Put(job_version_key(job.id, reverted.version),
                                                             encode_version(record))]
    return reverted, compares, ops


def job_json(job: Job) -> dict[str, Any]:
    return {"id": job.id, "version": job.version, "status": job.status, "generation": job.generation,
            "stable_version": job.stable_version, "spec": job.spec.to_dict()}
