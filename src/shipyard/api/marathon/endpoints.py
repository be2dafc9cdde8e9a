"""The Marathon /v2 endpoints for apps, tasks, deployments, info and leader, answering in Marathon's JSON shapes.

Every change goes through the JobService; it must never write the store itself nor touch processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.api.marathon.apps import AppInvalid, app_from_spec, app_id_of, job_id_of, spec_from_app
from shipyard.api.marathon.views import (
    AppState,
    app_json,
    config_changed_at,
    deployment_actions,
    deployment_json,
    iso,
    live_tasks,
    task_json,
    version_string,
)
from shipyard.errors import BadRequest, Conflict, NotFound
from shipyard.scheduler.jobs import JobService, JobVersion
from shipyard.scheduler.model import Allocation, Deployment, Job
from shipyard.scheduler.reconcile import deployment_id
from shipyard.scheduler.records import AllocStatus
from shipyard.spec import TaskSpec

MAX_APP_BODY = 1 << 20
MARATHON_VERSION = "1.10.17"  # the Marathon API generation these endpoints follow

routes = web.RouteTableDef()
Tasks = list[tuple[Allocation, AllocStatus | None]]


def jobs_of(request: web.Request) -> JobService:
    platform = platform_of(request)
    if platform.jobs is None:
        platform.jobs = JobService(platform.store)
    return platform.jobs


def marathon_json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json", headers=headers)


def flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() in ("", "true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BadRequest(f"query parameter {name} must be true or false")


async def read_body(request: web.Request) -> Any:
    raw = await read_limited(request, MAX_APP_BODY)
    try:
        return orjson.loads(raw or b"null")
    except orjson.JSONDecodeError as exc:
        raise BadRequest("Invalid JSON", [{"path": "/", "errors": [str(exc)]}]) from None


def app_path(request: web.Request) -> str:
    return "/" + request.match_info["app_id"].strip("/")


async def job_for_app(jobs: JobService, app_id: str) -> Job:
    try:
        return await jobs.get(job_id_of(app_id))
    except NotFound:
        raise NotFound(f"App '{app_id}' does not exist") from None


# ---- building app states ------------------------------------------------------------------------------------


def pending_or_active(job: Job, stored: Deployment | None, created_at: float | None) -> Deployment | None:
    """The deployment in progress for a job: the stored one while active, or the one the scheduler is about to
    start for a version or restart it has not picked up yet (Marathon shows a deployment at once)."""
    if job.status != "running":
        return None
    if stored is not None and (stored.version, stored.generation) == (job.version, job.generation):
        return stored if stored.active else None
    return Deployment(id=deployment_id(job), job=job.id, version=job.version, generation=job.generation,
                      status="running", created_at=created_at or 0.0, description="waiting for the scheduler")


async def app_states(jobs: JobService, selected: Iterable[Job]) -> list[AppState]:
    selected = list(selected)
    if not selected:
        return []
    all_tasks: dict[str, Tasks] = {}
    for alloc, status in await jobs.allocations():
        all_tasks.setdefault(alloc.job, []).append((alloc, status))
    stored = {d.job: d for d in await jobs.deployments()}
    states = []
    for job in selected:
        try:
            versions = await jobs.versions(job.id)
        except NotFound:
            continue  # deleted while we were reading
        created = {v.version: v.created_at for v in versions}
        d = pending_or_active(job, stored.get(job.id), created.get(job.version))
        states.append(AppState(job, created, tuple(all_tasks.get(job.id, ())), (d,) if d else (),
                               config_changed_at(versions)))
    return states


async def app_state(jobs: JobService, app_id: str) -> AppState:
    states = await app_states(jobs, [await job_for_app(jobs, app_id)])
    if not states:
        raise NotFound(f"App '{app_id}' does not exist")
    return states[0]


def embeds(request: web.Request) -> set[str]:
    out: set[str] = set()
    for value in request.query.getall("embed", []):
        out.update(v.strip() for v in value.split(","))
    # Marathon accepts both spellings on both endpoints.
    return {e.replace("apps.", "").replace("app.", "") for e in out}


def matches_label(labels: dict[str, str], selector: str) -> bool:
    """Marathon's ?label=: comma-separated "key", "key==value" or "key!=value", all of which must hold."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "==" in term:
            key, value = term.split("==", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


# ---- /v2/apps -----------------------------------------------------------------------------------------------


@routes.get("/apps")
@routes.get("/apps/")  # Prometheus's marathon_sd asks for /v2/apps/?embed=apps.tasks; Marathon answers both
async def list_apps(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    wanted = embeds(request)
    id_filter, cmd_filter, label = request.query.get("id"), request.query.get("cmd"), request.query.get("label")
    selected = []
    for job in await jobs.list():
        if id_filter and id_filter not in app_id_of(job.id):
            continue
        if cmd_filter and cmd_filter not in (job.spec.cmd or " ".join(job.spec.args)):
            continue
        if label and not matches_label(dict(job.spec.meta), label):
            continue
        selected.append(job)
    states = await app_states(jobs, selected)
    apps = [app_json(s, embed_tasks="tasks" in wanted,
                     embed_failure=bool({"lastTaskFailure", "failures"} & wanted)) for s in states]
    return marathon_json({"apps": apps})


@routes.post("/apps")
@routes.post("/apps/")
async def create_app(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    body = await read_body(request)
    spec = spec_from_app(body)
    app_id = app_id_of(spec.name)
    try:
        await jobs.get(spec.name)
    except NotFound:
        pass
    else:
        raise Conflict(f"An app with id [{app_id}] already exists.")
    await jobs.deploy(spec, force=flag(request, "force"))
    state = await app_state(jobs, app_id)
    return marathon_json(app_json(state, embed_tasks=False), 201, headers={"Location": f"/v2/apps{app_id}"})


@routes.get("/apps/{app_id:.+}/versions/{version}")
async def get_app_version(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    job = await job_for_app(jobs, app_path(request))
    found = await find_version(jobs, job, request.match_info["version"])
    app = app_from_spec(found.spec)
    app["version"] = iso(found.created_at)
    return marathon_json(app)


@routes.get("/apps/{app_id:.+}/versions")
async def list_app_versions(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    job = await job_for_app(jobs, app_path(request))
    versions = await jobs.versions(job.id)
    return marathon_json({"versions": [iso(v.created_at) for v in sorted(versions, key=lambda v: -v.version)]})


async def find_version(jobs: JobService, job: Job, wanted: str) -> JobVersion:
    for v in await jobs.versions(job.id):
        if wanted in (iso(v.created_at), str(v.version)):
            return v
    raise NotFound(f"App '{app_id_of(job.id)}' does not exist in version {wanted}")


@routes.post("/apps/{app_id:.+}/restart")
async def restart_app(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    job = await job_for_app(jobs, app_path(request))
    job = await jobs.restart(job.id, force=flag(request, "force"))
    return await deployment_answer(jobs, job)


@routes.get("/apps/{app_id:.+}/tasks")
async def list_app_tasks(request: web.Request) -> web.Response:
    state = await app_state(jobs_of(request), app_path(request))
    tasks = [task_json(a, s, state.job, state.version_string(a.version)) for a, s in live_tasks(state.tasks)]
    return marathon_json({"tasks": tasks})


@routes.delete("/apps/{app_id:.+}/tasks/{task_id}")
async def kill_app_task(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    state = await app_state(jobs, app_path(request))
    task_id = request.match_info["task_id"]
    match = [(a, s) for a, s in live_tasks(state.tasks) if a.id == task_id]
    if not match:
        raise NotFound(f"Task '{task_id}' does not exist")
    await kill_tasks(jobs, state.job, [a for a, _ in match], scale=flag(request, "scale"),
                     force=flag(request, "force"))
    alloc, status = match[0]
    return marathon_json({"task": task_json(alloc, status, state.job, state.version_string(alloc.version))})


@routes.delete("/apps/{app_id:.+}/tasks")
async def kill_app_tasks(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    state = await app_state(jobs, app_path(request))
    host = request.query.get("host")
    tasks = [(a, s) for a, s in live_tasks(state.tasks) if a.desired == "run"
             and (host is None or (s.address if s else "127.0.0.1") == host or a.node == host)]
    scale = flag(request, "scale")
    job = await kill_tasks(jobs, state.job, [a for a, _ in tasks], scale=scale, force=flag(request, "force"))
    if scale:
        return await deployment_answer(jobs, job)
    return marathon_json({"tasks": [task_json(a, s, state.job, state.version_string(a.version)) for a, s in tasks]})


async def kill_tasks(jobs: JobService, job: Job, tasks: list[Allocation], *, scale: bool, force: bool) -> Job:
    """Marathon's task kill, expressed with what the JobService offers.

    With scale, exactly the named tasks go: their instance indexes are retired and the job shrinks by as many,
    so the scheduler stops those and keeps the others. Without scale, exactly the named tasks are replaced by
    new ones (as Marathon launches a replacement for a killed task); the others are untouched.
    """
    wanted = [a for a in tasks if a.desired == "run"]
    if not wanted:
        return job
    if scale:
        return await jobs.kill_instances(job.id, {a.index for a in wanted}, force=force)
    return await jobs.replace_instances(job.id, {a.index for a in wanted}, force=force)


@routes.get("/apps/{app_id:.+}")
async def get_app(request: web.Request) -> web.Response:
    state = await app_state(jobs_of(request), app_path(request))
    return marathon_json({"app": app_json(state, embed_tasks=True, embed_failure=True)})


@routes.put("/apps/{app_id:.+}")
async def put_app(request: web.Request) -> web.Response:
    partial = request.query.get("partialUpdate", "true").lower() != "false"
    return await update_app(request, partial=partial)


@routes.patch("/apps/{app_id:.+}")
async def patch_app(request: web.Request) -> web.Response:
    return await update_app(request, partial=True)


async def update_app(request: web.Request, *, partial: bool) -> web.Response:
    jobs = jobs_of(request)
    app_id = app_path(request)
    force = flag(request, "force")
    body = await read_body(request)
    try:
        current: Job | None = await jobs.get(job_id_of(app_id))
    except NotFound:
        current = None
    if isinstance(body, dict) and "version" in body and set(body) <= {"id", "version"}:
        if current is None:
            raise NotFound(f"App '{app_id}' does not exist")
        # Marathon's rollback: PUT {"version": v} redeploys that version's definition as a new version.
        target = await find_version(jobs, current, str(body["version"]))
        result = await jobs.deploy(target.spec, force=force)
        return await deployment_answer(jobs, result.job)
    spec = spec_from_app(body, base=current.spec if current is not None and partial else None, app_id=app_id)
    job = await apply_app(jobs, spec, current, force=force)
    if current is None:
        state = await app_state(jobs, app_id)
        return marathon_json(app_json(state, embed_tasks=False), 201, headers={"Location": f"/v2/apps{app_id}"})
    return await deployment_answer(jobs, job)


async def apply_app(jobs: JobService, spec: TaskSpec, current: Job | None, *, force: bool) -> Job:
    """Create, scale or redeploy: a change of the instance count alone is a scale, as in Marathon."""
    if current is not None and spec.instances != current.spec.instances and \
            replace(current.spec, instances=spec.instances) == spec:
        return await jobs.scale(current.id, spec.instances, force=force)
    return (await jobs.deploy(spec, force=force)).job


@routes.put("/apps")
@routes.put("/apps/")
async def put_apps(request: web.Request) -> web.Response:
    """Marathon's bulk create-or-update: every app is validated before any is changed (one 422 names them all)."""
    jobs = jobs_of(request)
    partial = request.query.get("partialUpdate", "true").lower() != "false"
    force = flag(request, "force")
    body = await read_body(request)
    if not isinstance(body, list) or not body:
        raise AppInvalid([{"path": "/", "errors": ["expected a non-empty JSON array of app definitions"]}])
    planned: list[tuple[TaskSpec, Job | None]] = []
    problems: list[dict[str, Any]] = []
    for i, app in enumerate(body):
        app_id = app.get("id") if isinstance(app, dict) else None
        if not isinstance(app_id, str) or not app_id.strip("/"):
            problems.append({"path": f"/{i}/id", "errors": ["every app of a bulk update needs its id"]})
            continue
        current = await existing_job(jobs, app_id)
        try:
            spec = spec_from_app(app, base=current.spec if current is not None and partial else None, app_id=app_id)
        except AppInvalid as exc:
            problems += [{"path": f"/{i}{d['path']}", "errors": d["errors"]} for d in exc.details]
            continue
        planned.append((spec, current))
    if problems:
        raise AppInvalid(problems)
    changed = [await apply_app(jobs, spec, current, force=force) for spec, current in planned]
    # Marathon answers one deployment for the whole update; each app here rolls out as its own.
    return await deployment_answer(jobs, changed[0])


async def existing_job(jobs: JobService, app_id: str) -> Job | None:
    try:
        return await jobs.get(job_id_of(app_id))
    except NotFound:
        return None


async def deployment_answer(jobs: JobService, job: Job) -> web.Response:
    """Marathon's answer to a change: the deployment carrying it and the app version it deploys."""
    versions = {v.version: v.created_at for v in await jobs.versions(job.id)}
    stored = await jobs.deployment(job.id)
    d = pending_or_active(job, stored, versions.get(job.version))
    ident = d.id if d is not None else (stored.id if stored is not None else deployment_id(job))
    return marathon_json({"deploymentId": ident, "version": version_string(versions, job.version)})


@routes.delete("/apps/{app_id:.+}")
async def delete_app(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    job = await job_for_app(jobs, app_path(request))
    await jobs.delete(job.id)
    # The scheduler stops the instances on its own; there is no deployment record left to point to.
    return marathon_json({"deploymentId": f"{job.id}.deleted.v{job.version}", "version": iso(time.time())})


# ---- /v2/tasks ----------------------------------------------------------------------------------------------


async def all_tasks(jobs: JobService) -> list[tuple[Allocation, AllocStatus | None, Job, str]]:
    by_job = {j.id: j for j in await jobs.list()}
    versions: dict[str, dict[int, float]] = {}
    out = []
    for alloc, status in live_tasks(await jobs.allocations()):
        job = by_job.get(alloc.job)
        if job is None:
            continue
        if job.id not in versions:
            versions[job.id] = {v.version: v.created_at for v in await jobs.versions(job.id)}
        out.append((alloc, status, job, version_string(versions[job.id], alloc.version)))
    return out


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    wanted = {s.lower() for s in request.query.getall("status", [])}
    tasks = []
    for alloc, status, job, version in await all_tasks(jobs_of(request)):
        shown = task_json(alloc, status, job, version)
        if wanted and shown["state"].removeprefix("TASK_").lower() not in wanted:
            continue
        tasks.append(shown)
    return marathon_json({"tasks": tasks})


@routes.post("/tasks/delete")
async def delete_tasks(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    body = await read_body(request)
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise AppInvalid([{"path": "/ids", "errors": ["must be a list of task ids"]}])
    known = {alloc.id: (alloc, job) for alloc, _, job, _ in await all_tasks(jobs)}
    missing = [i for i in ids if i not in known]
    if missing:
        raise NotFound(f"Task '{missing[0]}' does not exist")
    by_job: dict[str, tuple[Job, list[Allocation]]] = {}
    for task_id in ids:
        alloc, job = known[task_id]
        by_job.setdefault(job.id, (job, []))[1].append(alloc)
    scale, force = flag(request, "scale"), flag(request, "force")
    for job, allocs in by_job.values():
        await kill_tasks(jobs, job, allocs, scale=scale, force=force)
    return marathon_json({})


# ---- /v2/deployments ----------------------------------------------------------------------------------------


async def current_deployments(jobs: JobService) -> list[dict[str, Any]]:
    out = []
    for state in await app_states(jobs, await jobs.list()):
        for d in state.deployments:
            steps = deployment_actions(d, len(state.versions), state.tasks, state.job.spec.template_hash())
            out.append(deployment_json(d, state.version_string(d.version), steps))
    return out


@routes.get("/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    return marathon_json(await current_deployments(jobs_of(request)))


@routes.delete("/deployments/{deployment_id}")
async def delete_deployment(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    wanted = request.match_info["deployment_id"]
    found = next((d for d in await current_deployments(jobs) if d["id"] == wanted), None)
    if found is None:
        raise NotFound(f"DeploymentPlan {wanted} does not exist")
    # Marathon cancels by deploying the previous state again (a rollback deployment); Shipyard has no
    # half-finished state to leave behind, so ?force=true rolls back as well and only answers like Marathon.
    job = await jobs.rollback(job_id_of(found["affectedApps"][0]))
    if flag(request, "force"):
        return web.Response(status=202)
    return await deployment_answer(jobs, job)


# ---- /v2/info, /v2/leader -----------------------------------------------------------------------------------


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    platform = platform_of(request)
    leader = f"{platform.config.bind}:{platform.config.http_port}"
    return marathon_json({
        "name": "shipyard",
        "version": MARATHON_VERSION,
        "buildref": "shipyard",
        "elected": True,
        "leader": leader,
        "frameworkId": platform.node.id,
        "marathon_config": {"hostname": platform.node.name, "ha": False, "checkpoint": True,
                            "framework_name": "shipyard", "mesos_role": None, "mesos_user": None},
        "zookeeper_config": {},
        "http_config": {"http_port": platform.config.http_port},
        "event_subscriber": None,
    })


@routes.get("/leader")
async def leader(request: web.Request) -> web.Response:
    platform = platform_of(request)
    return marathon_json({"leader": f"{platform.config.bind}:{platform.config.http_port}"})


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong", content_type="text/plain")
