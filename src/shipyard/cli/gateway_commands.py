"""CLI commands of the gateway: `shipyard gateway apply gateway.yaml` (diff first, then apply) and
`shipyard gateway routes`.

Talks only to the server's /api/gateway over HTTP; never writes the store itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from shipyard.cli.http import ApiClient
from shipyard.errors import BadRequest, ShipyardError

console = Console()
if not console.is_terminal:
    console = Console(width=max(160, int(os.environ.get("COLUMNS", "0") or 0)))
GATEWAY = "/api/gateway"
STYLE = {"create": ("+", "green"), "update": ("~", "yellow"), "delete": ("-", "red")}


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def load_gateway_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest(f"{path}: expected a mapping at the top level")
    return data


def _post_config(client: ApiClient, config: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    response = client.request("POST", f"{GATEWAY}/config", json={"config": config, "dry_run": dry_run},
                              ok_statuses=(200, 400, 409))
    body = response.json()
    if response.status_code != 200:
        raise ShipyardError(str(body.get("message") or body), status=response.status_code)
    return body


def print_changes(changes: list[dict[str, Any]]) -> None:
    for change in changes:
        sign, color = STYLE.get(change["action"], ("?", "white"))
        fields = f" ({', '.join(change['fields'])})" if change.get("fields") else ""
        console.print(f"[{color}]{sign} {change['action']} {change['kind']} {change['name']}{fields}[/{color}]",
                      highlight=False, soft_wrap=True)
    counts = {a: sum(1 for c in changes if c["action"] == a) for a in ("create", "update", "delete")}
    console.print(f"{counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete",
                  highlight=False)


@click.group()
def gateway() -> None:
    """The API gateway: declarative config and routes."""


@gateway.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Show the diff only.")
@click.option("--yes", "-y", is_flag=True, help="Apply without asking.")
@click.pass_context
def apply(ctx: click.Context, path: str, dry_run: bool, yes: bool) -> None:
    """Make the gateway config equal to PATH (services, routes, consumers, plugins, upstreams), showing the diff."""
    config = load_gateway_file(path)
    client = _client(ctx)
    plan = _post_config(client, config, dry_run=True)
    changes = plan["changes"]
    if not changes:
        console.print("no changes")
        return
    print_changes(changes)
    if dry_run:
        return
    if not yes and not click.confirm("Apply these changes?", default=False):
        console.print("nothing applied")
        return
    result = _post_config(client, config, dry_run=False)
    console.print(f"[green]applied[/green] {len(result['changes'])} changes", highlight=False)


@gateway.command("routes")
@click.option("--json", "as_json", is_flag=True, help="Print the routes as JSON.")
@click.pass_context
def list_routes(ctx: click.Context, as_json: bool) -> None:
    """Routes configured on the gateway, with their service and plugins."""
    client = _client(ctx)
    routes = client.get_json(f"{GATEWAY}/routes", size=1000)["data"]
    services = {s["name"]: s for s in client.get_json(f"{GATEWAY}/services", size=1000)["data"]}
    plugins = client.get_json(f"{GATEWAY}/plugins", size=1000)["data"]
    if as_json:
        click.echo(__import__("json").dumps(routes, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("ROUTE", "HOSTS", "PATHS", "METHODS", "SERVICE", "UPSTREAM", "PLUGINS"):
        table.add_column(column)
    for route in sorted(routes, key=lambda r: (r.get("name") or r["id"])):
        service = services.get(route.get("service"), {})
        names = sorted({p["name"] for p in plugins if p.get("route") == route["id"]
                        or (p.get("service") and p.get("service") == route.get("service") and not p.get("route"))
                        or not (p.get("route") or p.get("service") or p.get("consumer"))})
        paths = list(route.get("paths") or []) + ["~" + r["pattern"] for r in route.get("regex_paths") or []]
        upstream = f"{service.get('host', route.get('service'))}" + (f":{service['port']}" if service.get("port")
                                                                     else "")
        table.add_row(route.get("name") or route["id"], ",".join(route.get("hosts") or []) or "*",
                      ",".join(paths) or "/", ",".join(route.get("methods") or []) or "*", str(route.get("service")),
                      upstream + (service.get("path") or ""), ",".join(names) or "-")
    console.print(table)


def register(cli: click.Group) -> None:
    cli.add_command(gateway)
