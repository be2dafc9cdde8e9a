"""`shipyard ps`: one line per instance (fits 100 columns), the notes they share once below the table, the
crash-loop stderr lines, a row per job whose record cannot be read; `-o wide` and `--json` for everything.

It only reads the jobs and allocs API; it never changes anything.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shipyard.cli.http import ApiClient
from shipyard.cli.rollout import exit_text, stderr_tail
from shipyard.errors import NotFound

console = Console()

_STATE_STYLE = {"healthy": "green", "running": "cyan", "pending": "yellow", "waiting": "yellow", "unhealthy": "red",
                "unplaceable": "red", "failed": "red", "crash-loop": "red", "stopping": "dim"}


def _unreadable(api: ApiClient, listing: dict[str, Any], service: str | None) -> list[dict[str, Any]]:
    """Job records the scheduler cannot decode (it leaves their instances alone). For one such SERVICE the
    server's own 409 is the answer: raised here as the CLI's one-line error."""
    unreadable = [u for u in listing.get("unreadable", []) if not service or u["id"] == service]
    if service and unreadable:
        api.get_json(f"/api/v1/jobs/{quote(service, safe='')}")  # 409 while the record is still unreadable
        return []  # readable again since the listing: shown as usual
    return unreadable


def _rows(api: ApiClient, service: str | None, usage: bool = False
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # usage: each instance's real CPU and memory, which the server reads from /proc (only for --json: the table
    # has no room left in 100 columns)
    params = {**({"job": service} if service else {}), **({"usage": "1"} if usage else {})}
    allocs = api.request("GET", "/api/v1/allocs", params=params or None).json()["allocations"]
    listing = api.get_json("/api/v1/jobs")
    jobs = listing["jobs"]
    unreadable = _unreadable(api, listing, service)
    if service and service not in {job["id"] for job in jobs} | {u["id"] for u in listing.get("unreadable", [])}:
        raise NotFound(f"no service {service!r} (see `shipyard ps`)")
    # Instances held back by depends_on, or that fit on no node, have no allocation yet: they show as waiting or
    # unplaceable, with what for (the placement reason counts nodes per rule and node class).
    for job in jobs:
        if service and job["id"] != service:
            continue
        for state in ("waiting", "unplaceable"):
            held = job.get(state)
            for index in (held or {}).get("indexes", []):
                allocs.append({"job": job["id"], "index": index, "id": "-", "version": job["version"],
                               "desired": "run", "node": "-",
                               "status": {"client": state, "message": (held or {}).get("reason", "")}})
    return sorted(allocs, key=lambda a: (a["job"], a["index"], a["desired"])), unreadable


def _state(alloc: dict[str, Any]) -> str:
    status = alloc.get("status") or {}
    if alloc["desired"] == "stop":
        return "stopping"
    if status.get("crash_looping"):
        return "crash-loop"
    return str(status.get("client") or alloc.get("client") or "pending")


def _age(since: float | None) -> str:
    if not since:
        return ""
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(alloc: dict[str, Any], wide: bool) -> list[str]:
    status = alloc.get("status") or {}
    state = _state(alloc)
    style = _STATE_STYLE.get(state, "")
    last_exit = status.get("last_exit") or {}
    ports = ",".join(f"{k}={v}" for k, v in (status.get("ports") or {}).items())
    row = [f"{alloc['job']}.{alloc['index']}", str(alloc["version"]), f"[{style}]{state}[/{style}]" if style else state,
           ports, str(status.get("pid") or ""), str(status.get("restarts") or 0),
           escape(exit_text(last_exit)) if last_exit else ""]
    if wide:
        row += [alloc["id"], str(alloc.get("node", "")), _age(status.get("healthy_since")),
                escape(status.get("message") or "")]
    return row


def _notes(allocs: list[dict[str, Any]], detailed: bool) -> list[str]:
    """Said once for all rows: how limits are enforced; per troubled instance: why, and its last stderr lines."""
    notes: list[str] = []
    limits = sorted({(a.get("status") or {}).get("limits", "") for a in allocs} - {""})
    notes += [f"limits: {escape(text)}" for text in limits if "not enforced" in text or detailed]
    held: dict[tuple[str, str, str], list[str]] = {}  # unplaceable: one note per job and reason
    for alloc in allocs:
        status = alloc.get("status") or {}
        state = _state(alloc)
        if state in ("healthy", "running", "stopping") and not (detailed and status.get("last_exit")):
            continue
        name = f"{alloc['job']}.{alloc['index']}"
        if state == "unplaceable" and alloc["id"] == "-":
            held.setdefault((alloc["job"], state, status.get("message") or ""), []).append(str(alloc["index"]))
            continue
        if status.get("message"):
            notes.append(f"{name}: {escape(status['message'])}")
        for line in stderr_tail(status, 5 if detailed else 3):
            notes.append(f"    [dim]{escape(line)}[/dim]")
    for (job, state, message), indexes in held.items():
        notes.append(f"{escape(job)}.{','.join(indexes)} {state}: {escape(message)}")
    return notes


def _unreadable_row(entry: dict[str, Any], wide: bool) -> list[str]:
    """One row per job whose record cannot be read; the why and the way out are a note (too long for a row)."""
    return [escape(entry["id"]), "-", "[red]UNREADABLE[/red]", "", "", "", "record cannot be read (see below)",
            *(["-", "-", "", ""] if wide else [])]


def _unreadable_note(api: ApiClient, entry: dict[str, Any]) -> str:
    # No CLI command deletes one job (`shipyard stop` keeps it, and must read it), so the way out is the API's.
    error = " ".join(str(entry.get("error", "")).split())
    url = f"{api.base_url}/api/v1/jobs/{quote(entry['id'], safe='')}"
    return (f"[red]{escape(entry['id'])}[/red]: record cannot be read ({escape(error)}); instances left as they "
            f"are — delete the job (curl -X DELETE {escape(url)}) and deploy again")


def _table(allocs: list[dict[str, Any]], unreadable: list[dict[str, Any]], wide: bool) -> Table:
    headers = ["INSTANCE", "VER", "STATE", "PORTS", "PID", "RESTARTS", "LAST EXIT"]
    table = Table(*headers, *(["ALLOC", "NODE", "HEALTHY", "MESSAGE"] if wide else []), box=None, pad_edge=False)
    for column in table.columns:
        column.no_wrap = not wide
        column.overflow = "fold" if wide else "ellipsis"
    # An unreadable job's row comes just before its instances' rows (they are still there, left alone).
    keyed = [((a["job"], 0), _row(a, wide)) for a in allocs] + [((u["id"], -1), _unreadable_row(u, wide))
                                                                 for u in unreadable]
    for _, row in sorted(keyed, key=lambda pair: pair[0]):
        table.add_row(*row)
    return table


@click.command()
@click.argument("service", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "wide"]), default="table", show_default=True,
              help="wide: also the allocation id, node, healthy-for and the agent's message.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the allocations as JSON (everything the API has, with each instance's CPU and memory use).")
@click.pass_context
def ps(ctx: click.Context, service: str | None, output: str, as_json: bool) -> None:
    """List instances (of SERVICE): state, ports, pid, restarts, last exit; below the table, why an instance is
    not healthy with its last stderr lines, and how limits are enforced."""
    api = ApiClient(ctx.obj["http_addr"])
    allocs, unreadable = _rows(api, service, usage=as_json)
    if as_json:
        click.echo(json.dumps({"allocations": allocs, "unreadable": unreadable}, indent=2, sort_keys=True))
        return
    if not allocs and not unreadable:
        console.print("no instances" + (f" of {service}" if service else "") + " (deploy with `shipyard up`)",
                      highlight=False)
        return
    wide = output == "wide"
    console.print(_table(allocs, unreadable, wide), soft_wrap=wide)
    notes = [_unreadable_note(api, u) for u in unreadable] + _notes(allocs, detailed=bool(service) or wide)
    if notes:
        console.print()
    for note in notes:
        console.print(note, highlight=False)  # wrapped at the terminal's width, like the table
