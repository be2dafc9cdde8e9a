"""Marathon's JSON shapes for apps, tasks, deployments and events, built from jobs, allocations and their status.

Pure: it must never read the store or the clock, so every shape is a function of the records it is given.
Only fields Marathon defines appear: marathon-python builds objects from responses with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from shipyard.api.marathon.apps import app_from_spec, app_id_of
from shipyard.scheduler.jobs import JobVersion
from shipyard.scheduler.model import Allocation, Deployment, Job
from shipyard.scheduler.records import AllocStatus
from shipyard.spec import TaskSpec

# Allocation client status -> Marathon task state.
TASK_STATES = {
    "pending": "TASK_STAGING",
    "running": "TASK_RUNNING",
    "healthy": "TASK_RUNNING",
    "unhealthy": "TASK_RUNNING",
    "failed": "TASK_FAILED",
    "lost": "TASK_LOST",
    "complete": "TASK_FINISHED",
}
ACTIVE_TASK_STATES = frozenset({"TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_KILLING"})


def iso(ts: float | None) -> str | None:
    """Marathon's timestamps (and app versions): ISO 8601 UTC; microseconds keep two versions apart."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AppState:
    """Everything one app's JSON is made of."""

    job: Job
    versions: Mapping[int, float]  # version -> created_at
    tasks: tuple[tuple[Allocation, AllocStatus | None], ...]
    deployments: tuple[Deployment, ...]  # active (or about to start) deployments of this job
    config_changed_at: float | None = None  # the newest version that changed more than the instance count

    def version_string(self, version: int) -> str:
        return version_string(self.versions, version)


def version_string(versions: Mapping[int, float], version: int) -> str:
    return iso(versions.get(version)) or str(version)


def task_state(alloc: Allocation, status: AllocStatus | None) -> str:
    if alloc.desired == "stop":
        return "TASK_KILLING" if status is not None and status.client not in ("failed", "complete") else "TASK_KILLED"
    if status is None:
        return "TASK_STAGING"
    return TASK_STATES.get(status.client, "TASK_STAGING")


def task_json(alloc: Allocation, status: AllocStatus | None, job: Job, version: str) -> dict[str, Any]:
    host = status.address if status is not None else "127.0.0.1"
    ports = [status.ports[p.name] for p in job.spec.ports if p.name in status.ports] if status is not None else []
    started = None
    if status is not None and status.client in ("running", "healthy", "unhealthy"):
        started = iso(status.healthy_since if status.healthy_since is not None else status.updated_at or None)
    out: dict[str, Any] = {
        "id": alloc.id,
        "appId": app_id_of(alloc.job),
        "host": host,
        "ports": ports,
        "servicePorts": service_ports(job, ports),
        "slaveId": alloc.node,
        "stagedAt": iso(alloc.created_at),
        "startedAt": started,
        "state": task_state(alloc, status),
        "version": version,
        "ipAddresses": [{"ipAddress": host, "protocol": "IPv4"}],
        "localVolumes": [],
    }
    if job.spec.health is not None and status is not None and status.client in ("running", "healthy", "unhealthy"):
        alive = status.client == "healthy"
        out["healthCheckResults"] = [{
            "alive": alive,
            "consecutiveFailures": 0 if alive else (1 if status.client == "unhealthy" else 0),
            "firstSuccess": iso(status.healthy_since) if alive else None,
            "lastFailure": iso(status.updated_at) if status.client == "unhealthy" else None,
            "lastSuccess": iso(status.updated_at) if alive else None,
            "lastFailureCause": status.message or None if status.client == "unhealthy" else None,
            "taskId": alloc.id,
            "instanceId": alloc.id,
        }]
    else:
        out["healthCheckResults"] = []
    return out


def service_ports(job: Job, ports: list[int]) -> list[int]:
    """One service port per port of the task, as Marathon lists them (marathon-python's list_endpoints indexes
    servicePorts by the task's port index). Marathon draws a service port for a dynamic port from a range of its
    own, for a load balancer (marathon-lb) to listen on; Shipyard has no such balancer (its gateway routes by
    service name), so each service port is the port the task listens on: the fixed port, or the one it got."""
    if len(ports) != len(job.spec.ports):
        return []  # not running yet: no ports to list
    return list(ports)


def live_tasks(tasks: Iterable[tuple[Allocation, AllocStatus | None]]) -> list[tuple[Allocation, AllocStatus | None]]:
    """The tasks Marathon would list: wanted ones and those still shutting down."""
    return [(a, s) for a, s in tasks if task_state(a, s) in ACTIVE_TASK_STATES]


def app_json(state: AppState, *, embed_tasks: bool, embed_failure: bool = False) -> dict[str, Any]:
    job = state.job
    app = app_from_spec(job.spec)
    if job.status == "stopped":
        app["instances"] = 0  # a stopped job keeps its spec; Marathon would show it scaled to zero
    wanted = [(a, s) for a, s in state.tasks if a.desired == "run"]
    states = [task_state(a, s) for a, s in wanted]
    app["tasksStaged"] = states.count("TASK_STAGING")
    app["tasksRunning"] = states.count("TASK_RUNNING")
    app["tasksHealthy"] = sum(1 for _, s in wanted if s is not None and s.client == "healthy")
    app["tasksUnhealthy"] = sum(1 for _, s in wanted if s is not None and s.client == "unhealthy")
    app["version"] = state.version_string(job.version)
    app["versionInfo"] = version_info(state)
    app["deployments"] = [{"id": d.id} for d in state.deployments]
    if embed_tasks:
        app["tasks"] = [task_json(a, s, job, state.version_string(a.version)) for a, s in live_tasks(state.tasks)]
    if embed_failure:
        app["lastTaskFailure"] = last_task_failure(state)
    return app


def version_info(state: AppState) -> dict[str, str | None]:
    """lastScalingAt: the newest version; lastConfigChangeAt: the newest one that changed more than instances."""
    versions = sorted(state.versions.items())
    newest = iso(versions[-1][1]) if versions else None
    return {"lastScalingAt": newest, "lastConfigChangeAt": iso(state.config_changed_at) or newest}


def config_changed_at(versions: Iterable[JobVersion]) -> float | None:
    previous: TaskSpec | None = None
    changed = None
    for v in sorted(versions, key=lambda v: v.version):
        if previous is None or replace(previous, instances=v.spec.instances) != v.spec:
            changed = v.created_at
        previous = v.spec
    return changed


def last_task_failure(state: AppState) -> dict[str, Any] | None:
    failures = [(a, s) for a, s in state.tasks if s is not None and s.last_exit]
    if not failures:
        return None
    alloc, status = max(failures, key=lambda pair: pair[1].updated_at if pair[1] else 0.0)
    assert status is not None and status.last_exit is not None
    reason = status.last_exit.get("reason") or f"exited with code {status.last_exit.get('code')}"
    return {"appId": app_id_of(alloc.job), "host": status.address, "message": str(reason),
            "state": "TASK_FAILED", "taskId": alloc.id, "instanceId": alloc.id, "slaveId": alloc.node,
            "timestamp": iso(status.updated_at), "version": state.version_string(alloc.version)}


# ---- deployments --------------------------------------------------------------------------------------------


def deployment_actions(deployment: Deployment, previous_versions: int,
                       tasks: Iterable[tuple[Allocation, AllocStatus | None]], template: str) -> list[list[str]]:
    """Marathon's steps for a deployment: a new app starts then scales; a changed template or a restart
    replaces running tasks (RestartApplication); anything else only scales."""
    if previous_versions <= 1 and deployment.version == 1 and deployment.generation == 0:
        return [["StartApplication"], ["ScaleApplication"]]
    outdated = any(a.desired == "run" and (a.template != template or a.generation != deployment.generation)
                   for a, _ in tasks)
    return [["RestartApplication"]] if outdated else [["ScaleApplication"]]


def deployment_json(deployment: Deployment, version: str, steps: list[list[str]]) -> dict[str, Any]:
    app_id = app_id_of(deployment.job)
    step_json = [{"actions": [{"action": a, "app": app_id} for a in step]} for step in steps]
    current = len(steps) if deployment.placed or deployment.status != "running" else 1
    return {
        "id": deployment.id,
        "version": version,
        "affectedApps": [app_id],
        "affectedPods": [],
        "steps": step_json,
        "currentActions": [{"action": a, "app": app_id, "readinessCheckResults": []} for a in steps[current - 1]],
        "currentStep": current,
        "totalSteps": len(steps),
    }


def plan_json(deployment: Deployment, version: str, steps: list[list[str]], app: Mapping[str, Any] | None
              ) -> dict[str, Any]:
    """The deployment plan inside deployment_* events (marathon-python's MarathonDeploymentPlan)."""
    apps = [dict(app)] if app is not None else []
    return {
        "id": deployment.id,
        "version": version,
        "original": {"id": "/", "version": version, "apps": [], "groups": [], "dependencies": [], "pods": []},
        "target": {"id": "/", "version": version, "apps": apps, "groups": [], "dependencies": [], "pods": []},
        "steps": [{"actions": [{"action": a, "app": app_id_of(deployment.job)} for a in step]} for step in steps],
    }
