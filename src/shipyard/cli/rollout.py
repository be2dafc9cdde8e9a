"""Following a rollout from the CLI: live healthy counts per service, each crash as it happens (exit code, last
stderr lines, restarts), and a fast failure when a new instance crash-loops before it was ever healthy.

It only reads the jobs API; it never changes a job (the rollout goes on at the server whatever the CLI does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shipyard.cli.http import ApiClient
from shipyard.errors import ShipyardError
from shipyard.spec import TaskSpec

console = Console()
err_console = Console(stderr=True)

DEFAULT_CRASH_LIMIT = 3  # exits before an instance was ever healthy: the code is broken, not unlucky
STDERR_LINES_SHOWN = 3
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Target:
    """The job's version and restart generation a command waits for (its deployment has this id)."""

    job: str
    version: int
    generation: int

    @classmethod
    def of(cls, job: dict[str, Any]) -> Target:
        return cls(job["id"], int(job["version"]), int(job.get("generation", 0)))

    @property
    def deployment_id(self) -> str:
        return f"{self.job}.v{self.version}.g{self.generation}"


def exit_text(last_exit: dict[str, Any]) -> str:
    if last_exit.get("signal"):
        text = f"killed by signal {last_exit['signal']}"
    else:
        text = f"exit code {last_exit.get('exit_code')}"
    reason = last_exit.get("reason") or ""
    return f"{text} ({reason})" if reason not in ("", "exited", "killed by signal") else text


def stderr_tail(status: dict[str, Any], count: int = STDERR_LINES_SHOWN) -> list[str]:
    tail = (status.get("last_exit") or {}).get("stderr_tail") or []
    lines = [line for line in tail if isinstance(line, str) and line.strip()]
    return lines[-count:]


@dataclass
class CrashWatch:
    """Turns what agents report into lines printed once per crash, and stops a hopeless wait early."""

    crash_limit: int
    seen_healthy: set[str] = field(default_factory=set)
    reported: dict[str, int] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    shown_tails: dict[str, list[str]] = field(default_factory=dict)  # by job: the same traceback is said once

    def _template(self, job: dict[str, Any]) -> str:
        key = f"{job['id']}.{job['version']}"
        if key not in self.templates:
            self.templates[key] = TaskSpec.from_dict(job["spec"]).template_hash()
        return self.templates[key]

    def news(self, detail: dict[str, Any]) -> list[str]:
        """A line (and the last stderr lines) for every exit not reported yet."""
        lines = []
        for alloc in _live(detail):
            status = alloc.get("status") or {}
            if status.get("client") == "healthy":
                self.seen_healthy.add(alloc["id"])
            restarts, last_exit = int(status.get("restarts") or 0), status.get("last_exit")
            if not last_exit or self.reported.get(alloc["id"], 0) >= max(restarts, 1):
                continue
            self.reported[alloc["id"]] = max(restarts, 1)
            lines.append(f"[red]{alloc['job']}.{alloc['index']}[/red] {escape(exit_text(last_exit))}, "
                         f"restarts: {restarts}" + (", crash loop" if status.get("crash_looping") else ""))
            tail = stderr_tail(status)
            if tail != self.shown_tails.get(alloc["job"]):
                self.shown_tails[alloc["job"]] = tail
                lines += [f"    [dim]{escape(line)}[/dim]" for line in tail]
        return lines

    def check(self, detail: dict[str, Any]) -> None:
        """Raises once an instance of the wanted code has exited crash_limit times without ever being healthy."""
        if self.crash_limit <= 0:
            return
        template = self._template(detail["job"])
        for alloc in _live(detail):
            status = alloc.get("status") or {}
            restarts = int(status.get("restarts") or 0)
            if (alloc.get("template") != template or alloc["id"] in self.seen_healthy
                    or status.get("healthy_since") or restarts < self.crash_limit or not status.get("last_exit")):
                continue
            tail = stderr_tail(status, 1)
            cause = exit_text(status["last_exit"]) + (f": {tail[0]}" if tail else "")
            raise ShipyardError(
                f"{alloc['job']}.{alloc['index']} crash-looped ({restarts} restarts) before it was ever healthy: "
                f"{cause} (see `shipyard logs {alloc['job']}`; it keeps restarting until you fix and deploy, "
                f"`shipyard rollback {alloc['job']}` or `shipyard stop {alloc['job']}`)")


def _live(detail: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in detail.get("allocations", []) if a.get("desired") == "run"]


def why_not_healthy(detail: dict[str, Any]) -> str:
    """One line on why a job is not healthy: unplaceable, crash loop, failing check, failed deployment."""
    reasons = []
    waiting = detail.get("waiting")
    if waiting:
        reasons.append(f"{waiting.get('count', len(waiting.get('indexes', [])))} instance(s) {waiting.get('reason')}")
    unplaceable = detail.get("unplaceable")
    if unplaceable:
        reasons.append(f"unplaceable: {unplaceable.get('reason') or unplaceable}")
    deployment = detail.get("deployment") or {}
    if deployment.get("status") == "failed":
        reasons.append(f"deployment failed: {deployment.get('description', '')}")
    for alloc in _live(detail):
        status = alloc.get("status") or {}
        if status.get("client") == "healthy":
            continue
        line = status.get("message") or status.get("client") or "pending"
        tail = stderr_tail(status, 1)
        if tail:
            line += f" — stderr: {tail[0]}"
        reasons.append(f"instance {alloc.get('index')}: {line}")
    return "; ".join(reasons[:3]) or "waiting for instances to pass their health checks"


def _state(target: Target, detail: dict[str, Any]) -> tuple[bool, str]:
    """(done, what to show after the service's name)."""
    counts, deployment = detail["instances"], detail.get("deployment") or {}
    mine = deployment.get("id") == target.deployment_id
    if mine and deployment.get("status") == "failed":
        raise ShipyardError(f"{target.job}: {why_not_healthy(detail)}")
    if mine and deployment.get("status") == "cancelled":
        raise ShipyardError(f"{target.job}: the rollout was superseded ({deployment.get('description', '')})")
    if mine and deployment.get("status") == "paused-for-promotion":
        return True, f"canaries healthy: shipyard promote {target.job}"
    waiting = detail.get("waiting")
    if waiting:
        return False, str(waiting.get("reason", "waiting"))
    settled = mine and not deployment.get("active") and not counts["stopping"]
    done = settled and counts["healthy"] >= counts["desired"] and counts["placed"] == counts["desired"]
    stopping = f", {counts['stopping']} stopping" if counts["stopping"] else ""
    return done, stopping.lstrip(", ")


def _counts_text(detail: dict[str, Any]) -> str:
    counts = detail["instances"]
    return f"{counts['healthy']}/{counts['desired']} healthy"


def wait_rolled_out(api: ApiClient, targets: list[Target], timeout: float,
                    crash_limit: int = DEFAULT_CRASH_LIMIT) -> None:
    """Until every target's deployment is done and all its instances are healthy; live progress meanwhile."""
    deadline = time.monotonic() + timeout
    watch = CrashWatch(crash_limit)
    details = {t.job: api.get_json(f"/api/v1/jobs/{t.job}") for t in targets}  # the first frame has real counts
    width = max(len(t.job) for t in targets) if targets else 8
    columns = (SpinnerColumn(), TextColumn(f"{{task.description:<{width}}}"), BarColumn(bar_width=24),
               TextColumn("{task.fields[counts]}"), TextColumn("[dim]{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks = {t.job: bar.add_task(t.job, total=max(details[t.job]["instances"]["desired"], 1),
                                     counts=_counts_text(details[t.job]), note="") for t in targets}
        while True:
            pending = []
            for target in targets:
                detail = details.pop(target.job, None) or api.get_json(f"/api/v1/jobs/{target.job}")
                for line in watch.news(detail):
                    bar.console.print(line, highlight=False, soft_wrap=True)
                watch.check(detail)
                done, note = _state(target, detail)
                counts = detail["instances"]
                bar.update(tasks[target.job], total=max(counts["desired"], 1), completed=counts["healthy"],
                           counts=_counts_text(detail), note=note)
                if not done:
                    pending.append((target.job, detail))
            if not pending:
                return
            if time.monotonic() > deadline:
                bar.stop()
                for job, detail in pending:
                    err_console.print(f"[red]not healthy:[/red] {job}: {escape(why_not_healthy(detail))}",
                                      highlight=False, soft_wrap=True)
                raise ShipyardError(f"{len(pending)} service(s) not healthy after {timeout:.0f}s")
            time.sleep(POLL_SECONDS)
