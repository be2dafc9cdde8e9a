"""CLI commands that run services: up, deploy, ps, logs, scale, restart, promote, stop, down.

They speak only the server's /api/v1 jobs and allocs API; `up` may start a server, nothing else
here touches processes or the store directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.cli.http import ApiClient, ServerUnreachable
from shipyard.cli.options import server_args, server_port_options
from shipyard.errors import BadRequest, NotFound, ShipyardError
from shipyard.spec import ProjectSpec, SpecError, TaskSpec, load_project

console = Console()
err_console = Console(stderr=True)

_STATE_STYLE = {"healthy": "green", "running": "cyan", "pending": "yellow", "waiting": "yellow", "unhealthy": "red",
                "failed": "red"}


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def _project_file(path: str) -> Path:
    target = Path(path)
    if target.is_dir():
        target = target / "shipyard.yaml"
    if not target.is_file():
        raise NotFound(f"no shipyard.yaml at {target}")
    return target


def _load_locally(spec_file: Path) -> ProjectSpec:
    """Shows every spec problem with file:line before anything is sent or started."""
    try:
        return load_project(str(spec_file))
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(f"[red]error:[/red] {problem}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def _with_workdirs(project: ProjectSpec, base: Path) -> ProjectSpec:
    """Commands run where shipyard.yaml is (or in its `workdir`, resolved against that directory)."""
    def resolve(task: TaskSpec) -> TaskSpec:
        return replace(task, workdir=str((base / (task.workdir or ".")).resolve()))

    return replace(
        project,
        services={name: resolve(t) for name, t in project.services.items()},
        workers={name: resolve(t) for name, t in project.workers.items()},
    )


def _server_is_up(api: ApiClient) -> bool:
    try:
        api.request("GET", "/v1/status/leader")
        return True
    except ServerUnreachable:
        return False


def _start_server(api: ApiClient, state_dir: Path) -> int:
    """Starts `shipyard server` in the background for this project; returns its pid."""
    host_port = api.base_url.split("://", 1)[1]
    host, _, port = host_port.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ShipyardError(f"no server at {api.base_url}, and `up` only starts local ones")
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "server.log", "ab")
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(state_dir / "data"),
           "--http-port", port]
    cmd += server_args()  # up's --gateway-port / --dns-port (and their env vars)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    (state_dir / "server.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise ShipyardError(f"the server exited at start: {' '.join(tail)}")
        if _server_is_up(api):
            return proc.pid
        time.sleep(0.1)
    raise ShipyardError(f"the server did not answer within 30s (see {state_dir / 'server.log'})")


def _deploy(api: ApiClient, spec_file: Path, project: ProjectSpec, force: bool) -> list[dict[str, Any]]:
    resolved = _with_workdirs(project, spec_file.parent)
    response = api.request(
        "POST", "/api/v1/jobs", params={"force": "true"} if force else None,
        json=resolved.to_dict(), ok_statuses=(200, 201),
    )
    return response.json()["deployed"]


def _why_not_healthy(detail: dict[str, Any]) -> str:
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
    for alloc in detail.get("allocations", []):
        status = alloc.get("status") or {}
        if alloc.get("desired") != "run" or status.get("client") == "healthy":
            continue
        line = status.get("message") or status.get("client") or "pending"
        last_exit = status.get("last_exit") or {}
        tail = last_exit.get("stderr_tail") or []
        if isinstance(tail, list) and tail:
            line += f" — stderr: {tail[-1]}"
        reasons.append(f"instance {alloc.get('index')}: {line}")
    return "; ".join(reasons[:3]) or "waiting for instances to pass their health checks"


def _wait_healthy(api: ApiClient, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description:<24}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} healthy"), TimeElapsedColumn(), console=console) as bar:
        tasks = {job: bar.add_task(job, total=None) for job in job_ids}
        while True:
            pending = []
            for job in job_ids:
                detail = api.get_json(f"/api/v1/jobs/{job}")
                counts = detail["instances"]
                deployment = detail.get("deployment") or {}
                bar.update(tasks[job], total=counts["desired"], completed=counts["healthy"])
                if deployment.get("status") == "failed":
                    raise ShipyardError(f"{job}: {_why_not_healthy(detail)}")
                if deployment.get("status") == "paused-for-promotion":
                    bar.update(tasks[job], description=f"{job} (canary: shipyard promote {job})")
                    continue
                waiting = detail.get("waiting")
                bar.update(tasks[job], description=f"{job} ({waiting['reason']})" if waiting else job)
                done = counts["healthy"] >= counts["desired"] and not counts["stopping"]
                if not done or deployment.get("active"):
                    pending.append((job, detail))
            if not pending:
                return
            if time.monotonic() > deadline:
                bar.stop()
                for job, detail in pending:
                    err_console.print(f"[red]not healthy:[/red] {job}: {_why_not_healthy(detail)}",
                                      highlight=False, soft_wrap=True)
                raise ShipyardError(f"{len(pending)} service(s) not healthy after {timeout:.0f}s")
            time.sleep(0.25)


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--force", is_flag=True, help="Replace a deployment that is still running.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for all services healthy.")
@server_port_options
@click.pass_context
def up(ctx: click.Context, directory: str, force: bool, timeout: float) -> None:
    """Start a server if none is running, deploy DIRECTORY/shipyard.yaml, wait until all is healthy."""
    started = time.monotonic()
    spec_file = _project_file(directory)
    project = _load_locally(spec_file)
    api = _client(ctx)
    if not _server_is_up(api):
        with console.status(f"starting shipyard server at {api.base_url}"):
            pid = _start_server(api, spec_file.parent / ".shipyard")
        console.print(f"started shipyard server (pid {pid}, logs in {spec_file.parent / '.shipyard'})",
                      highlight=False)
    deployed = _deploy(api, spec_file, project, force)
    jobs = [d["job"]["id"] for d in deployed]
    _wait_healthy(api, jobs, timeout)
    console.print(f"[green]all services healthy[/green] ({len(jobs)} jobs) in {time.monotonic() - started:.1f}s",
                  highlight=False)


@click.command()
@click.argument("path", default=".", type=click.Path())
@click.option("--force", is_flag=True, help="Replace a deployment that is still running.")
@click.option("--detach", is_flag=True, help="Don't wait for the services to be healthy.")
@click.option("--timeout", default=120.0, show_default=True)
@click.pass_context
def deploy(ctx: click.Context, path: str, force: bool, detach: bool, timeout: float) -> None:
    """Deploy a shipyard.yaml to a running server (a new version of every changed service)."""
    spec_file = _project_file(path)
    project = _load_locally(spec_file)
    api = _client(ctx)
    deployed = _deploy(api, spec_file, project, force)
    for item in deployed:
        job = item["job"]
        what = f"version {job['version']}" if item["changed"] else "unchanged"
        console.print(f"{job['id']}: {what}", highlight=False)
    if not detach:
        _wait_healthy(api, [d["job"]["id"] for d in deployed], timeout)
        console.print("[green]all services healthy[/green]")


@click.command()
@click.argument("service", required=False)
@click.pass_context
def ps(ctx: click.Context, service: str | None) -> None:
    """List instances with their state, ports, restarts and last exit (and those waiting for a dependency)."""
    api = _client(ctx)
    params = {"job": service} if service else None
    allocs = api.request("GET", "/api/v1/allocs", params=params).json()["allocations"]
    # Instances held back by depends_on have no allocation yet: they show as waiting, with what for.
    for job in api.get_json("/api/v1/jobs")["jobs"]:
        waiting = job.get("waiting")
        if not waiting or (service and job["id"] != service):
            continue
        for index in waiting.get("indexes", []):
            allocs.append({"job": job["id"], "index": index, "id": "-", "version": job["version"], "desired": "run",
                           "status": {"client": "waiting", "message": waiting.get("reason", ""), "restarts": ""}})
    table = Table("SERVICE", "#", "ALLOC", "VER", "STATE", "PORTS", "PID", "RESTARTS", "LAST EXIT", "NOTE",
                  box=None)
    for alloc in sorted(allocs, key=lambda a: (a["job"], a["index"], a["desired"])):
        status = alloc.get("status") or {}
        state = status.get("client") or alloc.get("client") or "pending"
        if alloc["desired"] == "stop":
            state = "stopping"
        if status.get("crash_looping"):
            state = "crash-loop"
        style = _STATE_STYLE.get(state, "red" if state == "crash-loop" else "")
        ports = ",".join(f"{k}={v}" for k, v in (status.get("ports") or {}).items())
        last_exit = status.get("last_exit") or {}
        exit_text = ""
        if last_exit:
            code = last_exit.get("exit_code")
            exit_text = f"signal {last_exit['signal']}" if last_exit.get("signal") else f"code {code}"
        note = status.get("message") or ""
        if status.get("limits") and "not enforced" in status.get("limits", ""):
            note = (note + "; " if note else "") + status["limits"]
        table.add_row(alloc["job"], str(alloc["index"]), alloc["id"], str(alloc["version"]),
                      f"[{style}]{state}[/{style}]" if style else state, ports, str(status.get("pid") or ""),
                      str(status.get("restarts", 0)), exit_text, note)
    console.print(table)


@click.command()
@click.argument("service")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--instance", type=int, default=None, help="Instance index (default: all, prefixed).")
@click.option("--stderr", "stream", flag_value="stderr", help="Show stderr instead of stdout.")
@click.option("--stdout", "stream", flag_value="stdout", default=True)
@click.option("--tail", default=100, show_default=True)
@click.pass_context
def logs(ctx: click.Context, service: str, follow: bool, instance: int | None, stream: str, tail: int) -> None:
    """Print an instance's stdout (or --stderr); -f follows."""
    api = _client(ctx)
    allocs = api.request("GET", "/api/v1/allocs", params={"job": service}).json()["allocations"]
    allocs = [a for a in allocs if a["desired"] == "run" and (instance is None or a["index"] == instance)]
    if not allocs:
        raise NotFound(f"no running instance of {service!r}" + (f" with index {instance}" if instance else ""))
    if follow and len(allocs) > 1:
        raise BadRequest("-f follows one instance: pass --instance N")
    params = {"stream": stream, "tail": str(tail), **({"follow": "1"} if follow else {})}
    for alloc in allocs:
        prefix = f"[{service}.{alloc['index']}] " if len(allocs) > 1 else ""
        path = f"/api/v1/allocs/{alloc['id']}/logs"
        try:
            with api.stream("GET", path, params=params) as response:
                for line in response.iter_lines():
                    click.echo(prefix + line)
        except KeyboardInterrupt:
            return


def _job_action(name: str, help_text: str):  # type: ignore[no-untyped-def]
    @click.command(name=name, help=help_text)
    @click.argument("service")
    @click.option("--force", is_flag=True, help="Override a deployment that is still running.")
    @click.pass_context
    def command(ctx: click.Context, service: str, force: bool) -> None:
        body = {"force": True} if force else {}
        _client(ctx).request("POST", f"/api/v1/jobs/{service}/{name}", json=body)
        console.print(f"{service}: {name} requested", highlight=False)

    return command


@click.command()
@click.argument("service")
@click.argument("instances", type=click.IntRange(0, 100_000))
@click.option("--force", is_flag=True, help="Override a deployment that is still running.")
@click.pass_context
def scale(ctx: click.Context, service: str, instances: int, force: bool) -> None:
    """Set the number of instances of SERVICE."""
    _client(ctx).request("POST", f"/api/v1/jobs/{service}/scale", json={"instances": instances, "force": force})
    console.print(f"{service}: scaling to {instances}", highlight=False)


@click.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for instances to stop.")
@click.argument("directory", default=".", type=click.Path())
@click.pass_context
def down(ctx: click.Context, timeout: float, directory: str) -> None:
    """Stop every service cleanly, then the server if `shipyard up` started it for DIRECTORY."""
    api = _client(ctx)
    if _server_is_up(api):
        jobs = api.get_json("/api/v1/jobs")["jobs"]
        for job in jobs:
            api.request("DELETE", f"/api/v1/jobs/{job['id']}")
        deadline = time.monotonic() + timeout
        with console.status(f"stopping {len(jobs)} service(s)") as status:
            while True:
                live = api.get_json("/api/v1/allocs")["allocations"]
                if not live:
                    break
                if time.monotonic() > deadline:
                    raise ShipyardError(f"{len(live)} instance(s) still stopping after {timeout:.0f}s")
                status.update(f"stopping: {len(live)} instance(s) left")
                time.sleep(0.25)
        console.print(f"stopped {len(jobs)} service(s)", highlight=False)
    pid_file = Path(directory) / ".shipyard" / "server.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text().strip() or 0)
        try:
            os.kill(pid, signal.SIGTERM)
            console.print(f"stopped the shipyard server (pid {pid})", highlight=False)
        except ProcessLookupError:
            pass
        pid_file.unlink()


def register(cli: click.Group) -> None:
    for command in (up, deploy, ps, logs, scale, down):
        cli.add_command(command)
    cli.add_command(_job_action("restart", "Restart every instance of SERVICE, one by one (rolling)."))
    cli.add_command(_job_action("promote", "Promote the canaries of SERVICE's deployment: roll out the rest."))
    cli.add_command(_job_action("stop", "Stop every instance of SERVICE (the job stays, with 0 instances)."))
    cli.add_command(_job_action("rollback", "Deploy SERVICE's last stable version again."))
