"""CLI commands of the message bus: `shipyard queues` (figures, dead letters) and `shipyard worker MODULE:APP`.

`queues` talks only to the server's /api/v1/bus over HTTP; `worker` runs an SDK app against the bus URL it is given.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table

from shipyard.cli.http import ApiClient
from shipyard.errors import BadRequest, ShipyardError

console = Console()
if not console.is_terminal:  # piped or captured: don't squeeze queue names into 80 columns
    console = Console(width=max(160, int(os.environ.get("COLUMNS", "0") or 0)))
BUS = "/api/v1/bus"


class BusUnreachable(ShipyardError):
    status = 503


def _client(ctx: click.Context) -> ApiClient:
    return ApiClient(ctx.obj["http_addr"])


def format_age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def format_rate(per_second: float) -> str:
    return "0" if per_second <= 0 else (f"{per_second:.2f}" if per_second < 10 else f"{per_second:.0f}")


def bus_state_line(state: dict[str, Any], now: float) -> str:
    """`bus: rabbitmq at host:5672/: up`, or unreachable with since when and why."""
    where = f" at {state['address']}" if state.get("address") else ""
    line = f"bus: {state['backend']}{where}: {state['state']}"
    if state["state"] != "up":
        since = format_age(now - float(state.get("since") or now))
        line += f" for {since}" if since != "-" else ""
        line += f" ({state['error']})" if state.get("error") else ""
        line += "; the server keeps retrying"
    return line


def _check_bus_state(api: ApiClient) -> str:
    """Where the bus is (a line for below the table, "" for the embedded one); when it is not up, says so and
    stops (exit 1) instead of an empty table."""
    response = api.request("GET", f"{BUS}/status", ok_statuses=(200, 404))
    if response.status_code == 404:  # a server from before /status: nothing to show
        return ""
    state = response.json()
    line = bus_state_line(state, time.time())
    if state["state"] != "up":
        raise BusUnreachable(line)
    return "" if state["backend"] == "embedded" else line


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def queues(ctx: click.Context, as_json: bool) -> None:
    """Queues and subscriptions of the bus: depth, age of the oldest message, rates, dead letters, consumers."""
    if ctx.invoked_subcommand is not None:
        return
    api = _client(ctx)
    bus_line = _check_bus_state(api)
    stats = api.get_json(f"{BUS}/queues")
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    if not stats:
        console.print("no queues yet (they appear when a worker, publisher or subscriber first uses them)")
    else:
        _print_table(stats)
    if bus_line:
        console.print(bus_line, highlight=False, soft_wrap=True)


def _print_table(stats: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("queue", "kind", "depth", "ready", "in flight", "delayed", "dead letters", "oldest age",
                   "in/s", "acked/s", "consumers"):
        table.add_column(column, justify="left" if column in ("queue", "kind") else "right")
    for s in stats:
        dead = str(s["dead_letters"])
        table.add_row(
            s["queue"], s["kind"], str(s["depth"]), str(s["ready"]), str(s["in_flight"]), str(s["delayed"]),
            f"[red]{dead}[/red]" if s["dead_letters"] else dead, format_age(s["oldest_age"]),
            format_rate(s["publish_rate"]), format_rate(s["ack_rate"]),
            str(s["consumers"]) if s["consumers"] else "[yellow]0[/yellow]",
        )
    console.print(table)


@queues.command("dead-letters")
@click.argument("queue")
@click.option("--retry", is_flag=True, help="Put the dead letters (all, or --id ones) back in the queue.")
@click.option("--purge", is_flag=True, help="Delete the dead letters (all, or --id ones).")
@click.option("--id", "ids", multiple=True, help="Only this message (repeatable).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000), help="How many to list.")
@click.option("--json", "as_json", is_flag=True, help="List them as JSON (bodies base64).")
@click.pass_context
def dead_letters(ctx: click.Context, queue: str, retry: bool, purge: bool, ids: tuple[str, ...], limit: int,
                 as_json: bool) -> None:
    """List, retry or purge the dead letters of QUEUE."""
    if retry and purge:
        raise BadRequest("choose one of --retry and --purge")
    api = _client(ctx)
    path = f"{BUS}/queues/{quote(queue, safe='')}/dead-letters"
    body = {"ids": list(ids)} if ids else {}
    if retry:
        n = api.request("POST", f"{path}/retry", json=body).json()["retried"]
        console.print(f"retried {n} dead letter{'s' if n != 1 else ''} of {queue}", highlight=False)
        return
    if purge:
        n = api.request("POST", f"{path}/purge", json=body).json()["purged"]
        console.print(f"purged {n} dead letter{'s' if n != 1 else ''} of {queue}", highlight=False)
        return
    items = [api.get_json(f"{path}/{quote(i, safe='')}") for i in ids] if ids else api.get_json(path, limit=limit)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        console.print(f"no dead letters in {queue}", highlight=False)
        return
    now = time.time()
    table = Table(box=None, header_style="bold")
    for column in ("id", "attempts", "failed", "error", "topic", "body"):
        table.add_column(column, overflow="fold")
    for m in items:
        raw = base64.b64decode(m["body"])
        preview = raw[:80].decode(errors="replace") + ("…" if len(raw) > 80 else "")
        failed = f"{format_age(now - m['failed_at'])} ago" if m.get("failed_at") else "-"
        table.add_row(str(m["id"]), str(m["attempts"]), failed, m.get("error") or "-", m.get("topic") or "-",
                      preview)
    console.print(table)


def load_app(spec: str) -> Any:
    """`module:attr` (attr may be dotted), or `module` holding exactly one BusApp."""
    from shipyard.sdk.bus import BusApp

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise BadRequest(f"{spec!r} is not MODULE:APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadRequest(f"cannot import {module_name!r}: {exc}") from None
    if attr:
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise BadRequest(f"module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    else:
        apps = [v for v in vars(module).values() if isinstance(v, BusApp)]
        if len(apps) != 1:
            raise BadRequest(f"module {module_name!r} has {len(apps)} BusApp objects: name one as {module_name}:APP")
        obj = apps[0]
    if not isinstance(obj, BusApp):
        raise BadRequest(f"{spec} is a {type(obj).__name__}, not a shipyard.sdk.bus.BusApp")
    return obj


@click.command()
@click.argument("app", metavar="MODULE:APP")
@click.option("--bus", "bus_url", default=None, envvar="SHIPYARD_BUS_URL", show_envvar=True,
              help="Bus URL (default: $SHIPYARD_BUS_URL, else the server at --http-addr).")
@click.option("--stop-grace", default=5.0, show_default=True, envvar="SHIPYARD_STOP_GRACE", show_envvar=True,
              type=click.FloatRange(0, 3600), help="Seconds to finish in-flight work after SIGTERM.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="How much the worker logs to stderr.")
@click.pass_context
def worker(ctx: click.Context, app: str, bus_url: str | None, stop_grace: float, log_level: str) -> None:
    """Run the @task and @subscribe handlers of a BusApp until SIGTERM/SIGINT."""
    from shipyard.sdk.bus import Worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    bus_app = load_app(app)
    http_addr = ctx.obj["http_addr"]
    url = bus_url or bus_app.url or f"http://{http_addr}"
    runtime = Worker(bus_app, url=url, stop_grace=stop_grace, server_addr=http_addr)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runtime.run(stop)

    import uvloop

    uvloop.run(run())
    if runtime.sync_running:
        # A handler thread can't be interrupted; its message is already given back, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def register(cli: click.Group) -> None:
    cli.add_command(queues)
    cli.add_command(worker)
