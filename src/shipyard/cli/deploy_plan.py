"""What a deploy would change, per service, told before it is sent: new, unchanged, or a new version with the
fields and files that changed and how it rolls out.

Pure: it compares the running jobs (as the jobs API lists them) with the project about to be sent; it never writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shipyard.cli.source_tree import changed_files
from shipyard.spec import ProjectSpec, TaskSpec

MAX_FILES_SHOWN = 10


@dataclass(frozen=True)
class ServicePlan:
    name: str
    action: str  # "new" | "unchanged" | "update" | "start"
    summary: str
    files: tuple[str, ...] = ()


def _rollout(spec: TaskSpec, replaced: int) -> str:
    u = spec.update
    how = f"{u.canary} canary first, then " if u.canary else ""
    return (f"rolling update: {how}replaces {replaced} instance(s), {u.max_parallel} at a time, "
            f"each healthy for {u.min_healthy_time:g}s")


def _changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = (old.keys() | new.keys()) - {"source", "name", "kind"}
    return sorted(k for k in keys if old.get(k) != new.get(k))


def plan_service(spec: TaskSpec, current: dict[str, Any] | None) -> ServicePlan:
    if current is None:
        return ServicePlan(spec.name, "new", f"new: {spec.instances} instance(s)")
    running = TaskSpec.from_dict(current["spec"])
    wanted = spec
    if spec.autoscale is not None and running.autoscale is not None:  # the server keeps an autoscaled count
        wanted = TaskSpec.from_dict({**spec.to_dict(), "instances": running.instances})
    if wanted.content_hash() == running.content_hash():
        if current.get("status") == "stopped":
            return ServicePlan(spec.name, "start", f"start again: version {current['version']}, "
                               f"{spec.instances} instance(s)")
        return ServicePlan(spec.name, "unchanged", "unchanged")
    files = changed_files(running.source, wanted.source)
    fields = _changed_fields(running.to_dict(), wanted.to_dict())
    what = ", ".join([*(["code"] if files else []), *fields])
    if wanted.template_hash() != running.template_hash():
        how = _rollout(wanted, min(running.instances, wanted.instances))
    else:
        how = f"no instance replaced (instances {running.instances} → {wanted.instances})" \
            if wanted.instances != running.instances else "no instance replaced"
    summary = f"version {current['version']} → {current['version'] + 1} ({what}); {how}"
    return ServicePlan(spec.name, "update", summary, tuple(files))


def plan_project(project: ProjectSpec, jobs: list[dict[str, Any]]) -> list[ServicePlan]:
    by_id = {job["id"]: job for job in jobs}
    return [plan_service(spec, by_id.get(name)) for name, spec in project.tasks.items()]


def plan_lines(plans: list[ServicePlan]) -> list[str]:
    lines = []
    for plan in plans:
        lines.append(f"{plan.name}: {plan.summary}")
        shown = plan.files[:MAX_FILES_SHOWN]
        lines += [f"    {line}" for line in shown]
        if len(plan.files) > len(shown):
            lines.append(f"    ... and {len(plan.files) - len(shown)} more file(s)")
    return lines
