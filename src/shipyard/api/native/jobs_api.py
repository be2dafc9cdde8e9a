"""The native jobs API (/api/v1/jobs, /api/v1/deployments, /api/v1/allocs): deploy, inspect and change jobs.

A thin edge over JobService: it parses and validates input and shapes JSON; it never plans or writes the store itself.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import orjson
from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.api.guard import JSON_TYPES, YAML_TYPES, accepts_body
from shipyard.api.native.usage_relay import instances_usage
from shipyard.errors import BadRequest, ShipyardError
from shipyard.scheduler.jobs import DeployResult, JobService, job_json
from shipyard.scheduler.model import Allocation, Deployment, Job
from shipyard.scheduler.records import AllocStatus
from shipyard.spec import ProjectSpec, SpecError, SpecProblem, TaskSpec, parse_project

routes = web.RouteTableDef()

PREFIX = "/api/v1"
MAX_SPEC_BODY = 1 << 20  # a shipyard.yaml of a few hundred services is well under this
MAX_ACTION_BODY = 64 << 10
SOURCE = "request body"


class ServiceUnavailable(ShipyardError):
    status = 503


def jobs_of(request: web.Request) -> JobService:
    jobs = getattr(platform_of(request), "jobs", None)
    if not isinstance(jobs, JobService):
        raise ServiceUnavailable("this server runs no scheduler")
    return jobs


def _wake_scheduler(request: web.Request) -> None:
    # The loop would notice through its watch anyway; waking it saves the watch latency.
    loop = getattr(platform_of(request), "scheduler", None)
    wake = getattr(loop, "wake", None)
    if callable(wake):
        wake()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", ""):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no"):
        return False
    raise BadRequest(f"{name} must be true or false, got {value!r}")


def _force(request: web.Request, body: dict[str, Any] | None = None) -> bool:
    if body is not None and "force" in body:
        return _flag(body["force"], "force")
    return _flag(request.query.get("force", "false"), "force")


async def _action_body(request: web.Request) -> dict[str, Any]:
    raw = await read_limited(request, MAX_ACTION_BODY)
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


# ---- JSON shapes ------------------------------------------------------------------------------------


def deployment_json(d: Deployment | None) -> dict[str, Any] | None:
    return None if d is None else {**asdict(d), "active": d.active}


def alloc_json(alloc: Allocation, status: AllocStatus | None) -> dict[str, Any]:
    data = asdict(alloc)
    data["status"] = asdict(status) if status is not None else None
    return data


def deploy_result_json(result: DeployResult) -> dict[str, Any]:
    return {"job": job_json(result.job), "changed": result.changed, "deployment": result.deployment_id}


def _counts(job: Job, allocs: list[tuple[Allocation, AllocStatus | None]]) -> dict[str, int]:
    live = [a for a, _ in allocs if a.desired == "run"]
    return {
        "desired": job.spec.instances if job.status == "running" else 0,
        "placed": len(live),
        "running": sum(1 for a in live if a.client in ("running", "healthy")),
        "healthy": sum(1 for a in live if a.client == "healthy"),
        "stopping": sum(1 for a, _ in allocs if a.desired == "stop"),
    }


# ---- parsing a deploy body ---------------------------------------------------------------------------


def parse_deploy_body(raw: bytes, content_type: str) -> ProjectSpec | TaskSpec:
    """JSON: a project ({"services": ...}) or one TaskSpec dict ({"name": ..., "cmd": ...}); else shipyard.yaml."""
    text_type = content_type in YAML_TYPES
    if not raw.strip():
        raise BadRequest("request body is empty: send a shipyard.yaml or a JSON job spec")
    if content_type == "application/json" or (not text_type and raw.lstrip()[:1] in (b"{", b"[")):
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        return _from_json(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 text") from None
    return parse_project(text, source=SOURCE)


def _from_json(data: Any) -> ProjectSpec | TaskSpec:
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(SOURCE, None, "", "expected a JSON object (a job spec or a project)")])
    if "services" in data or "workers" in data:
        return ProjectSpec.from_dict(data, source=SOURCE)
    name, kind = data.get("name"), data.get("kind", "service")
    problems = []
    if not isinstance(name, str) or not name:
        problems.append(SpecProblem(SOURCE, None, "name", "required: the job's name (a string)"))
    if kind not in ("service", "worker"):
        problems.append(SpecProblem(SOURCE, None, "kind", f"must be service or worker, got {kind!r}"))
    if problems:
        raise SpecError(problems)
    try:
        return TaskSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError([replace(p, source=SOURCE) for p in exc.problems]) from None


# ---- routes ------------------------------------------------------------------------------------------


@routes.get(PREFIX + "/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    allocs = await jobs.allocations()
    deployments = {d.job: d for d in await jobs.deployments()}
    waiting = await jobs.waiting()
    unplaceable = await jobs.unplaceables()
    out = []
    for job in await jobs.list():
        mine = [(a, s) for a, s in allocs if a.job == job.id]
        out.append({**job_json(job), "deployment": deployment_json(deployments.get(job.id)),
                    "instances": _counts(job, mine), "waiting": waiting.get(job.id),
                    "unplaceable": unplaceable.get(job.id)})
    # Records the scheduler cannot read (it leaves their instances alone): id, key, mod_revision, error.
    return _json({"jobs": out, "unreadable": await jobs.unreadable()})


@routes.post(PREFIX + "/jobs")
@accepts_body(*JSON_TYPES, *YAML_TYPES)
async def deploy_jobs(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    force = _force(request)
    raw = await read_limited(request, MAX_SPEC_BODY, what="job spec")
    parsed = parse_deploy_body(raw, request.content_type)
    if isinstance(parsed, TaskSpec):
        results = [await jobs.deploy(parsed, force=force)]
    else:
        results = await jobs.deploy_project(parsed, force=force)
    if any(r.changed for r in results):
        _wake_scheduler(request)
    status = 201 if any(r.changed for r in results) else 200
    return _json({"deployed": [deploy_result_json(r) for r in results]}, status)


@routes.get(PREFIX + "/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    job_id = request.match_info["id"]
    job = await jobs.get(job_id)
    allocs = await jobs.allocations(job_id)
    return _json({
        "job": job_json(job),
        "deployment": deployment_json(await jobs.deployment(job_id)),
        "instances": _counts(job, allocs),
        "allocations": [alloc_json(a, s) for a, s in allocs],
        "unplaceable": await jobs.unplaceable(job_id),
        "waiting": (await jobs.waiting(job_id)).get(job_id),
    })


@routes.delete(PREFIX + "/jobs/{id}")
async def delete_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    await jobs_of(request).delete(job_id)
    _wake_scheduler(request)
    return _json({"deleted": job_id})


@routes.get(PREFIX + "/jobs/{id}/versions")
async def job_versions(request: web.Request) -> web.Response:
    versions = await jobs_of(request).versions(request.match_info["id"])
    return _json({"versions": [{"version": v.version, "created_at": v.created_at, "reason": v.reason,
                                "spec": v.spec.to_dict()} for v in versions]})


@routes.post(PREFIX + "/jobs/{id}/scale")
async def scale_job(request: web.Request) -> web.Response:
    body = await _action_body(request)
    if "instances" not in body:
        raise BadRequest('body must be {"instances": N}')
    job = await jobs_of(request).scale(request.match_info["id"], body["instances"], force=_force(request, body))
    _wake_scheduler(request)
    return _json({"job": job_json(job)})


@routes.post(PREFIX + "/jobs/{id}/restart")
async def restart_job(request: web.Request) -> web.Response:
    body = await _action_body(request)
    job = await jobs_of(request).restart(request.match_info["id"], force=_force(request, body))
    _wake_scheduler(request)
    return _json({"job": job_json(job)})


@routes.post(PREFIX + "/jobs/{id}/promote")
async def promote_job(request: web.Request) -> web.Response:
    body = await _action_body(request)
    deployment = await jobs_of(request).promote(request.match_info["id"], force=_force(request, body))
    _wake_scheduler(request)
    return _json({"deployment": deployment_json(deployment)})


@routes.post(PREFIX + "/jobs/{id}/stop")
async def stop_job(request: web.Request) -> web.Response:
    await _action_body(request)
    job = await jobs_of(request).stop(request.match_info["id"])
    _wake_scheduler(request)
    return _json({"job": job_json(job)})


@routes.post(PREFIX + "/jobs/{id}/rollback")
async def rollback_job(request: web.Request) -> web.Response:
    await _action_body(request)
    job = await jobs_of(request).rollback(request.match_info["id"])
    _wake_scheduler(request)
    return _json({"job": job_json(job)})


@routes.get(PREFIX + "/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    return _json({"deployments": [deployment_json(d) for d in await jobs_of(request).deployments()]})


async def _with_usage(request: web.Request, allocs: list[tuple[Allocation, AllocStatus | None]]
                      ) -> list[dict[str, Any]]:
    """The allocations as JSON; with ?usage=1 each also carries its instance's real CPU and memory ("usage"), read
    in one pass per node (this server's own, and each `shipyard agent` asked once): null for an instance that is
    not running, or whose node does not answer."""
    rows = [alloc_json(a, s) for a, s in allocs]
    if not _flag(request.query.get("usage", "false"), "usage"):
        return rows
    found = await instances_usage(platform_of(request), [a for a, _ in allocs])
    for row in rows:
        row["usage"] = found.get(row["id"])
    return rows


@routes.get(PREFIX + "/allocs")
async def list_allocs(request: web.Request) -> web.Response:
    job_id = request.query.get("job")
    allocs = await jobs_of(request).allocations(job_id or None)
    return _json({"allocations": await _with_usage(request, allocs)})


@routes.get(PREFIX + "/allocs/{id}")
async def get_alloc(request: web.Request) -> web.Response:
    alloc, status = await jobs_of(request).allocation(request.match_info["id"])
    [row] = await _with_usage(request, [(alloc, status)])
    return _json({"allocation": row})
