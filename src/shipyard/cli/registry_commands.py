"""CLI commands that read and write the registry over HTTP: kv, services, health, members.

Talks only to the server's Consul-compatible API, like any other client would.
"""

from __future__ import annotations

import base64
import sys

import click
from rich.console import Console
from rich.table import Table

from shipyard.cli.http import ApiClient
from shipyard.errors import BadRequest, NotFound

console = Console()

_STATUS_STYLE = {"passing": "green", "warning": "yellow", "critical": "red", "maintenance": "magenta"}


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def _kv_path(key: str) -> str:
    if key.startswith("/"):
        key = key.lstrip("/")
    return "/v1/kv/" + key


@click.group()
def kv() -> None:
    """Read and write the key/value config store."""


@kv.command("get")
@click.argument("key")
@click.option("--recurse", is_flag=True, help="Print every key under KEY as `key:value`.")
@click.option("--no-newline", "-n", is_flag=True, help="Print the value's bytes exactly (no newline added).")
@click.pass_context
def kv_get(ctx: click.Context, key: str, recurse: bool, no_newline: bool) -> None:
    """Print the value of KEY (followed by a newline unless it ends with one, or with -n)."""
    api = _client(ctx)
    if recurse:
        response = api.request("GET", _kv_path(key), params={"recurse": ""}, ok_statuses=(200, 404))
        for entry in response.json() if response.status_code == 200 else []:
            value = base64.b64decode(entry["Value"] or b"").decode(errors="replace")
            click.echo(f"{entry['Key']}:{value}")
        return
    response = api.request("GET", _kv_path(key), params={"raw": ""}, ok_statuses=(200, 404))
    if response.status_code == 404:
        raise NotFound(f"no key at {key!r}")
    sys.stdout.buffer.write(response.content)
    if not no_newline and not response.content.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")


@kv.command("put")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--flags", type=int, default=None, help="Opaque 64-bit flags stored with the value.")
@click.option("--cas", type=int, default=None, help="Write only if the key's ModifyIndex is this (0: absent).")
@click.pass_context
def kv_put(ctx: click.Context, key: str, value: str | None, flags: int | None, cas: int | None) -> None:
    """Set KEY to VALUE (`-` or no VALUE: read standard input; `@FILE`: the file's bytes)."""
    if value is None or value == "-":
        data = sys.stdin.buffer.read()
    elif value.startswith("@"):
        try:
            with open(value[1:], "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BadRequest(f"cannot read {value[1:]}: {exc.strerror}") from None
    else:
        data = value.encode()
    params: dict[str, object] = {}
    if flags is not None:
        params["flags"] = flags
    if cas is not None:
        params["cas"] = cas
    response = _client(ctx).request("PUT", _kv_path(key), params=params or None, content=data)
    if response.json() is not True:
        raise BadRequest(f"write to {key!r} was not applied (check-and-set index {cas} did not match)")
    console.print(f"Success! Data written to: {key}", highlight=False)


@kv.command("delete")
@click.argument("key")
@click.option("--recurse", is_flag=True, help="Delete every key under KEY.")
@click.pass_context
def kv_delete(ctx: click.Context, key: str, recurse: bool) -> None:
    """Delete KEY (or everything under it with --recurse)."""
    params = {"recurse": ""} if recurse else None
    _client(ctx).request("DELETE", _kv_path(key), params=params)
    console.print(f"Success! Deleted key{'s under' if recurse else ''}: {key}", highlight=False)


@kv.command("list")
@click.argument("prefix", default="")
@click.option("--separator", default="", help="List only up to this separator (like directories).")
@click.pass_context
def kv_list(ctx: click.Context, prefix: str, separator: str) -> None:
    """List the keys under PREFIX."""
    params = {"keys": ""}
    if separator:
        params["separator"] = separator
    response = _client(ctx).request("GET", _kv_path(prefix), params=params, ok_statuses=(200, 404))
    for key in response.json() if response.status_code == 200 else []:
        click.echo(key)


@click.command()
@click.pass_context
def services(ctx: click.Context) -> None:
    """List registered services with their tags and healthy instance counts."""
    api = _client(ctx)
    names = api.get_json("/v1/catalog/services")
    table = Table("SERVICE", "INSTANCES", "PASSING", "TAGS", box=None)
    for name in sorted(names):
        entries = api.get_json(f"/v1/health/service/{name}")
        passing = sum(all(c["Status"] == "passing" for c in e["Checks"]) for e in entries)
        table.add_row(name, str(len(entries)), str(passing), ",".join(sorted(names[name] or [])))
    console.print(table)


@click.command()
@click.argument("service")
@click.pass_context
def health(ctx: click.Context, service: str) -> None:
    """Show every instance of SERVICE and the state of its checks."""
    entries = _client(ctx).get_json(f"/v1/health/service/{service}")
    if not entries:
        raise NotFound(f"no instances of service {service!r} are registered")
    table = Table("NODE", "ID", "ADDRESS", "STATUS", "CHECKS", box=None)
    for entry in entries:
        svc = entry["Service"]
        checks = entry["Checks"]
        worst = _aggregate(c["Status"] for c in checks)
        address = f"{svc.get('Address') or entry['Node']['Address']}:{svc.get('Port')}"
        detail = ", ".join(f"{c['Name'] or c['CheckID']}={c['Status']}" for c in checks)
        style = _STATUS_STYLE.get(worst, "")
        table.add_row(entry["Node"]["Node"], svc["ID"], address, f"[{style}]{worst}[/{style}]", detail)
    console.print(table)


def _aggregate(statuses: object) -> str:
    order = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}
    worst = "passing"
    for status in statuses:  # type: ignore[attr-defined]
        if order.get(status, 2) > order[worst]:
            worst = status
    return worst


@click.command()
@click.pass_context
def members(ctx: click.Context) -> None:
    """List the members of the cluster."""
    table = Table("NODE", "ADDRESS", "STATUS", "TYPE", "DC", box=None)
    for member in _client(ctx).get_json("/v1/agent/members"):
        status = {1: "alive", 2: "leaving", 3: "left", 4: "failed"}.get(member.get("Status"), "unknown")
        tags = member.get("Tags") or {}
        kind = "server" if tags.get("role") == "consul" else "client"
        table.add_row(member["Name"], f"{member['Addr']}:{member['Port']}", status, kind, tags.get("dc", ""))
    console.print(table)


def register(cli: click.Group) -> None:
    cli.add_command(kv)
    cli.add_command(services)
    cli.add_command(health)
    cli.add_command(members)
