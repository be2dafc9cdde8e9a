"""CLI commands that bring a project up and down: up, deploy, down (and the local server `up` starts for them).

They speak the server's /api/v1 jobs API; the only processes they touch are a local server `up` started (its pid
is in DIRECTORY/.shipyard/server.pid) — never an instance directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from shipyard.cli.deploy_plan import plan_lines, plan_project
from shipyard.cli.http import ApiClient, ServerUnreachable
from shipyard.cli.project_files import load_locally, project_file, resolve_project
from shipyard.cli.rollout import DEFAULT_CRASH_LIMIT, Target, wait_rolled_out
from shipyard.cli.vault_setup import apply_vault_folder, logged_address
from shipyard.errors import ShipyardError
from shipyard.script_checks import runs_command
from shipyard.spec import ProjectSpec

console = Console()

STATE_DIR = ".shipyard"  # next to shipyard.yaml: server.pid, server.log and the server's data dir
SERVER_START_SECONDS = 30.0
SERVER_STOP_SECONDS = 30.0

crash_limit_option = click.option(
    "--crash-limit", default=DEFAULT_CRASH_LIMIT, show_default=True, type=click.IntRange(0, 1000),
    help="Give up once a new instance has exited this many times without ever being healthy (0: never).")


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def server_is_up(api: ApiClient) -> bool:
    try:
        api.request("GET", "/v1/status/leader")
        return True
    except ServerUnreachable:
        return False


def _local_port(api: ApiClient) -> str:
    host, _, port = api.base_url.split("://", 1)[1].rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ShipyardError(f"no server at {api.base_url}, and only a local one can be started here")
    return port


def start_server(api: ApiClient, state_dir: Path, extra: list[str], data_dir: Path | None = None) -> int:
    """Starts `shipyard server` in the background (log and pid in state_dir, data in state_dir/data unless
    data_dir is given); returns its pid."""
    port = _local_port(api)
    state_dir = state_dir.absolute()  # the server and its shims run elsewhere: nothing relative leaves the CLI
    state_dir.mkdir(parents=True, exist_ok=True)
    data = (data_dir or state_dir / "data").absolute()
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(data), "--http-port", port, *extra]
    if os.environ.get("SHIPYARD_DNS_PORT") and "--dns-port" not in extra:
        cmd += ["--dns-port", os.environ["SHIPYARD_DNS_PORT"]]
    with open(state_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (state_dir / "server.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
            (state_dir / "server.pid").unlink(missing_ok=True)
            why = " ".join(tail).removeprefix("error: ")  # the server's own one-line error, without a second prefix
            raise ShipyardError(f"the server exited at start: {why}")
        if server_is_up(api):
            return proc.pid
        time.sleep(0.1)
    raise ShipyardError(f"the server did not answer within {SERVER_START_SECONDS:.0f}s "
                        f"(see {state_dir / 'server.log'})")


def _send(api: ApiClient, project: ProjectSpec, force: bool) -> list[dict[str, Any]]:
    response = api.request("POST", "/api/v1/jobs", params={"force": "true"} if force else None,
                           json=project.to_dict(), ok_statuses=(200, 201))
    return list(response.json()["deployed"])


def _deploy_with_plan(api: ApiClient, project: ProjectSpec, force: bool) -> list[Target]:
    """Says what changes (fields, files, rollout) per service, sends the project, returns what to wait for."""
    for line in plan_lines(plan_project(project, api.get_json("/api/v1/jobs")["jobs"])):
        console.print(line, highlight=False, soft_wrap=True)
    return [Target.of(item["job"]) for item in _send(api, project, force)]


def _log_size(state_dir: Path) -> int:
    try:
        return (state_dir / "server.log").stat().st_size
    except OSError:
        return 0


def vault_dev_note(state_dir: Path, port: int, log_from: int = 0) -> str:
    """What `up` says of the secrets engine it started in dev mode: where, and its root token (as vault -dev).
    The control API answers before the engine has started: the server's "ready" line comes after it. The log is
    appended to by every server started here: only what this one wrote (from `log_from` on) counts."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(state_dir / "server.log", "rb") as log:
                log.seek(log_from)
                if b"shipyard server ready" in log.read():
                    break
        except OSError:
            pass
        time.sleep(0.05)
    data_dir = state_dir / "data"
    try:
        saved = json.loads((data_dir / "vault-dev.json").read_text())
    except (OSError, ValueError):
        return f"secrets engine: not started (port {port} taken? see the server log)"
    addr = logged_address(state_dir) or f"http://127.0.0.1:{port}"
    return (f"secrets engine in DEV MODE (unsealed automatically; not for production): "
            f"VAULT_ADDR={addr} VAULT_TOKEN={saved.get('root_token', '')}")


MANAGEMENT_TOKEN_FILE = "acl-management-token"  # in the data dir of the server `up` started, 0600


def bootstrap_acl(api: ApiClient, data_dir: Path) -> str:
    """With --acl: bootstraps the server `up` just started and keeps the management token in its data dir,
    readable by the owner only; says it once. A data dir bootstrapped before keeps (and reuses) its token."""
    path = data_dir / MANAGEMENT_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = str(api.request("PUT", "/v1/acl/bootstrap").json()["SecretID"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    console.print(f"ACL management token (shown once; kept in {path}, readable by you only): {token}\n"
                  f"  export SHIPYARD_HTTP_TOKEN=$(cat {path})", highlight=False, soft_wrap=True)
    return token


def apply_service_policies(api: ApiClient, project_dir: Path) -> None:
    """DIRECTORY/acl/<service>.hcl: what the project grants a service's instances beyond their own token's defaults
    (service identity, KV prefix, bus), kept as the policy service-<service> that their tokens carry (docs/acl.md).
    Only for a server with ACLs (the management token of `up --acl`, or one from the environment)."""
    files = sorted((project_dir / "acl").glob("*.hcl"))
    if not files or not api.has_token:
        return
    for path in files:
        name, rules = f"service-{path.stem}", path.read_text()
        found = api.request("GET", f"/v1/acl/policy/name/{name}", ok_statuses=(200, 401, 403, 404))
        if found.status_code == 401:
            return  # the server has no ACLs: nothing to grant
        current = found.json() if found.status_code == 200 else None
        if current is not None and current.get("Rules") == rules:
            continue
        where = f"/v1/acl/policy/{current['ID']}" if current is not None else "/v1/acl/policy"
        api.request("PUT", where, json={"Name": name, "Rules": rules,
                                        "Description": f"{path.name} of the project in {project_dir}"})
        console.print(f"ACL policy {name}: {'updated' if current else 'created'} from {path}", highlight=False)


def use_saved_token(api: ApiClient, state_dir: Path) -> None:
    """No token in the environment: the management token of the server an earlier `up --acl` started here."""
    saved = state_dir / "data" / MANAGEMENT_TOKEN_FILE
    if not api.has_token and saved.exists():
        api.use_token(saved.read_text().strip())


def _server_options(gateway_port: int | None, dns_port: int | None) -> list[str]:
    extra = []
    if gateway_port is not None:
        extra += ["--gateway-port", str(gateway_port)]
    if dns_port is not None:
        extra += ["--dns-port", str(dns_port)]
    return extra


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--force", is_flag=True, help="Replace a deployment that is still running.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for all services healthy.")
@crash_limit_option
@click.option("--http-port", type=click.IntRange(1, 65535), default=None,
              help="Control API port of the server `up` starts (default: the port of --http-addr).")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=None, envvar="SHIPYARD_GATEWAY_PORT",
              show_envvar=True,
              help="Gateway port of the server `up` starts (default 8080; 0: no gateway).")
@click.option("--dns-port", type=click.IntRange(0, 65535), default=None, envvar="SHIPYARD_DNS_PORT",
              show_envvar=True,
              help="DNS port of the server `up` starts (default 8600; 0: no DNS).")
@click.option("--vault-port", type=click.IntRange(1, 65535), default=None,
              help="Port of the secrets engine (dev mode) of the server `up` starts (default 8200).")
@click.option("--acl", is_flag=True,
              help="The server `up` starts enforces ACLs (default deny); its management token is printed once and "
                   "kept in .shipyard/data/acl-management-token (0600).")
@click.pass_context
def up(ctx: click.Context, directory: str, force: bool, timeout: float, crash_limit: int, http_port: int | None,
       gateway_port: int | None, dns_port: int | None, vault_port: int | None, acl: bool) -> None:
    """Start a server if none is running, deploy DIRECTORY/shipyard.yaml, wait until all is healthy.

    The server it starts keeps its state in DIRECTORY/.shipyard (server.log, data/); `shipyard down DIRECTORY`
    stops it.
    """
    started = time.monotonic()
    spec_file = project_file(directory)
    project = resolve_project(load_locally(spec_file), spec_file.parent)
    api = ApiClient(f"127.0.0.1:{http_port}") if http_port else _client(ctx)
    if not server_is_up(api):
        state_dir = spec_file.parent / STATE_DIR
        extra = _server_options(gateway_port, dns_port)
        if any(runs_command(spec) for spec in project.tasks.values()):
            # The operator's own project asks for command health checks: the server `up` starts for it allows them.
            extra.append("--enable-script-checks")
        # A laptop's platform: the secrets engine unseals itself (and says so).
        extra += ["--vault-dev", *(["--vault-port", str(vault_port)] if vault_port else [])]
        extra += ["--acl"] if acl else []
        log_from = _log_size(state_dir)
        with console.status(f"starting shipyard server at {api.base_url}"):
            pid = start_server(api, state_dir, extra)
        console.print(f"started shipyard server (pid {pid}, logs in {state_dir})", highlight=False)
        console.print(vault_dev_note(state_dir, vault_port or 8200, log_from), highlight=False, soft_wrap=True)
        if acl:
            api.use_token(bootstrap_acl(api, state_dir / "data"))
    else:
        use_saved_token(api, spec_file.parent / STATE_DIR)
    apply_service_policies(api, spec_file.parent)
    # DIRECTORY/vault/: the engine policies the services' tokens carry and the secrets they read, made when absent.
    for line in apply_vault_folder(spec_file.parent, spec_file.parent / STATE_DIR):
        console.print(line, highlight=False, soft_wrap=True)
    targets = _deploy_with_plan(api, project, force)
    wait_rolled_out(api, targets, timeout, crash_limit)
    console.print(f"[green]all services healthy[/green] ({len(targets)} jobs) in "
                  f"{time.monotonic() - started:.1f}s", highlight=False)


@click.command()
@click.argument("path", default=".", type=click.Path())
@click.option("--force", is_flag=True, help="Replace a deployment that is still running.")
@click.option("--detach", is_flag=True, help="Don't wait for the services to be healthy.")
@click.option("--dry-run", is_flag=True, help="Only show what would change (fields, files, rollout); send nothing.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for all services healthy.")
@crash_limit_option
@click.pass_context
def deploy(ctx: click.Context, path: str, force: bool, detach: bool, dry_run: bool, timeout: float,
           crash_limit: int) -> None:
    """Deploy PATH's shipyard.yaml to a running server: a new version of every service whose spec or files
    (its working directory, minus __pycache__, .git, .shipyard, data dirs and .shipyardignore globs) changed,
    rolled out by its update policy."""
    spec_file = project_file(path)
    project = resolve_project(load_locally(spec_file), spec_file.parent)
    api = _client(ctx)
    if dry_run:
        for line in plan_lines(plan_project(project, api.get_json("/api/v1/jobs")["jobs"])):
            console.print(line, highlight=False, soft_wrap=True)
        console.print("dry run: nothing was sent", highlight=False)
        return
    targets = _deploy_with_plan(api, project, force)
    if not detach:
        wait_rolled_out(api, targets, timeout, crash_limit)
        console.print("[green]all services healthy[/green]")


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _stop_jobs(api: ApiClient, timeout: float) -> None:
    listing = api.get_json("/api/v1/jobs")
    # A quarantined (unreadable) job still has instances: it is deleted like any other, or they would outlive `down`.
    jobs = listing["jobs"] + listing.get("unreadable", [])
    for job in jobs:
        api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    deadline = time.monotonic() + timeout
    with console.status(f"stopping {len(jobs)} service(s)") as status:
        while live := api.get_json("/api/v1/allocs")["allocations"]:
            if time.monotonic() > deadline:
                raise ShipyardError(f"{len(live)} instance(s) still stopping after {timeout:.0f}s")
            names = sorted({f"{a['job']}.{a['index']}" for a in live})
            status.update(f"stopping: {len(live)} instance(s) left ({', '.join(names[:6])})")
            time.sleep(0.25)
    console.print(f"stopped {len(jobs)} service(s)", highlight=False)


def _stop_server(api: ApiClient, pid_file: Path) -> None:
    """SIGTERM the server `up` started; returns once its process is gone and its port no longer answers."""
    pid = int(pid_file.read_text().strip() or 0)
    if pid and _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + SERVER_STOP_SECONDS
        with console.status(f"stopping the shipyard server (pid {pid})"):
            while _pid_alive(pid) or server_is_up(api):
                if time.monotonic() > deadline:
                    raise ShipyardError(f"the server (pid {pid}) did not exit within {SERVER_STOP_SECONDS:.0f}s")
                time.sleep(0.1)
        console.print(f"stopped the shipyard server (pid {pid})", highlight=False)
    pid_file.unlink(missing_ok=True)


def _left_instances(data_dir: Path) -> int:
    """Instances whose shim still runs (state.json names it); a stopped one leaves its files behind."""
    count = 0
    for state_file in (data_dir / "agent" / "instances").glob("*/state.json"):
        try:
            shim_pid = int(json.loads(state_file.read_text())["shim_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        count += _pid_alive(shim_pid) and not (state_file.parent / "exit.json").exists()
    return count


@click.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for instances to stop.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="With no server running: start one on this data dir (default DIRECTORY/.shipyard/data) so that "
                   "the instances a stopped server left running are stopped too.")
@click.argument("directory", default=".", type=click.Path())
@click.pass_context
def down(ctx: click.Context, timeout: float, data_dir: str | None, directory: str) -> None:
    """Stop every service, then the server `shipyard up` started for DIRECTORY; returns once all are gone."""
    api = _client(ctx)
    state_dir = Path(directory).absolute() / STATE_DIR
    pid_file = state_dir / "server.pid"
    use_saved_token(api, state_dir)
    if not server_is_up(api):
        # `up`'s data dir, or `shipyard server`'s default one in this directory
        candidates = [Path(data_dir)] if data_dir else [state_dir / "data", Path(directory) / "shipyard-data"]
        left = next((c.absolute() for c in candidates if _left_instances(c.absolute())), None)
        if left is None:
            console.print(f"no shipyard server at {api.base_url} and no instance left running: nothing to stop",
                          highlight=False)
            pid_file.unlink(missing_ok=True)
            return
        # Instances outlive their server (for adoption): a server on their data dir adopts them, then stops them.
        own = state_dir if left == state_dir / "data" else left  # where its server.log and server.pid go
        with console.status(f"starting a server on {left} to stop the {_left_instances(left)} instance(s) left"):
            start_server(api, own, [], left)
        pid_file = own / "server.pid"
    _stop_jobs(api, timeout)
    if pid_file.is_file():
        _stop_server(api, pid_file)
    else:
        console.print(f"the server at {api.base_url} was not started by `shipyard up` in {Path(directory).absolute()}; "
                      "it keeps running", highlight=False)
