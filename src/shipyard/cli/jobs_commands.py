"""CLI commands that change one running service: restart, scale, rollback (each followed until done unless
--detach), promote and stop; `register` adds these and the project, ps and logs commands to the CLI.

They speak only the server's /api/v1 jobs API; nothing here touches processes or the store directly.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from shipyard.cli import lifecycle_commands, logs_command, ps_command
from shipyard.cli.http import ApiClient
from shipyard.cli.rollout import Target, wait_rolled_out

console = Console()

FOLLOWED = {  # the actions whose rollout the CLI follows, and what it says while it does
    "restart": "Restart every instance of SERVICE, one by one (rolling), without a new version (they start from "
               "the files as they are now).",
    "rollback": "Deploy SERVICE's last stable version again (as a new version), rolling.",
}
REQUESTED = {
    "promote": "Promote the canaries of SERVICE's deployment: roll out the rest.",
    "stop": "Stop every instance of SERVICE (the job stays, with 0 instances).",
}
detach_option = click.option("--detach", is_flag=True, help="Return once the change is accepted; don't wait.")
timeout_option = click.option("--timeout", default=120.0, show_default=True,
                              help="Seconds to wait until every instance is replaced and healthy.")


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def _follow(api: ApiClient, job: dict[str, Any], what: str, detach: bool, timeout: float) -> None:
    if detach:
        console.print(f"{job['id']}: {what} requested", highlight=False)
        return
    wait_rolled_out(api, [Target.of(job)], timeout)
    console.print(f"[green]{job['id']}: {what} done[/green]", highlight=False)


def _followed_action(name: str, help_text: str) -> click.Command:
    @click.command(name=name, help=help_text)
    @click.argument("service")
    @click.option("--force", is_flag=True, help="Override a deployment that is still running.")
    @detach_option
    @timeout_option
    @click.pass_context
    def command(ctx: click.Context, service: str, force: bool, detach: bool, timeout: float) -> None:
        api = _client(ctx)
        job = api.request("POST", f"/api/v1/jobs/{service}/{name}", json={"force": True} if force else {}).json()
        _follow(api, job["job"], name, detach, timeout)

    return command


def _requested_action(name: str, help_text: str) -> click.Command:
    @click.command(name=name, help=help_text)
    @click.argument("service")
    @click.option("--force", is_flag=True, help="Override a deployment that is still running.")
    @click.pass_context
    def command(ctx: click.Context, service: str, force: bool) -> None:
        _client(ctx).request("POST", f"/api/v1/jobs/{service}/{name}", json={"force": True} if force else {})
        console.print(f"{service}: {name} requested", highlight=False)

    return command


@click.command()
@click.argument("service")
@click.argument("instances", type=click.IntRange(0, 100_000))
@click.option("--force", is_flag=True, help="Override a deployment that is still running.")
@detach_option
@timeout_option
@click.pass_context
def scale(ctx: click.Context, service: str, instances: int, force: bool, detach: bool, timeout: float) -> None:
    """Set the number of instances of SERVICE; waits until that many are healthy (or --detach)."""
    api = _client(ctx)
    job = api.request("POST", f"/api/v1/jobs/{service}/scale", json={"instances": instances, "force": force}).json()
    _follow(api, job["job"], f"scale to {instances}", detach, timeout)


def register(cli: click.Group) -> None:
    for command in (lifecycle_commands.up, lifecycle_commands.deploy, ps_command.ps, logs_command.logs, scale,
                    lifecycle_commands.down):
        cli.add_command(command)
    for name, help_text in FOLLOWED.items():
        cli.add_command(_followed_action(name, help_text))
    for name, help_text in REQUESTED.items():
        cli.add_command(_requested_action(name, help_text))
