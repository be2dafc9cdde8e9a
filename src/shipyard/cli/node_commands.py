"""`shipyard node status|eligibility|drain|force-leave`: the cluster's nodes, what runs on them, and taking one out
of service (or out of the cluster, once it is gone).

They speak only the server's /api/v1/nodes API and Consul's /v1/agent/members and force-leave (and read jobs for why
an instance waits); the scheduler moves the instances, this only asks for it and follows the drain until it is
complete.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.cli.http import ApiClient
from shipyard.errors import ShipyardError
from shipyard.spec import parse_duration

console = Console()
err_console = Console(stderr=True)
POLL_SECONDS = 0.25
DEADLINE_GRACE = 60.0  # the CLI waits this long past the deadline for the forced stops to finish


def _path(node: str, *rest: str) -> str:
    return "/".join(["/api/v1/nodes", quote(node, safe=""), *rest])


@click.group()
def node() -> None:
    """The cluster's nodes: status, eligibility for new instances, drain, force-leave."""


# ---- status -----------------------------------------------------------------------------------------------------


def _drain_text(n: dict[str, Any]) -> str:
    drain = n.get("drain")
    if not drain:
        return "-"
    if drain["complete"]:
        return "complete"
    left = drain.get("deadline_in")
    return f"{drain['remaining']} left" + (f", deadline in {left:.0f}s" if left is not None else "")


def _resources(n: dict[str, Any], units: bool = True) -> tuple[str, str]:
    r = n["resources"]
    mhz, mb = (" MHz", " MB") if units else ("", "")
    return f"{r['cpu_used']}/{r['cpu']}{mhz}", f"{r['memory_used']}/{r['memory']}{mb}"


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table("NAME", "STATUS", "CLASS", "ADDRESS", "ELIGIBILITY", "DRAIN", "ALLOCS", "CPU MHZ", "MEMORY MB",
                  box=None, pad_edge=False)
    for column in table.columns:
        column.no_wrap = column.header != "DRAIN"  # the drain's deadline text may wrap; names and figures never
    for n in nodes:
        status = "[green]ready[/green]" if n["status"] == "ready" else "[red]down[/red]"
        eligibility = n["eligibility"] if n["eligibility"] == "eligible" else f"[yellow]{n['eligibility']}[/yellow]"
        table.add_row(escape(n["name"]), status, escape(n["class"] or "-"), escape(n["address"] or "-"), eligibility,
                      _drain_text(n), str(n["allocs"]), *_resources(n, units=False))
    return table


def _show_node(n: dict[str, Any]) -> None:
    cpu, memory = _resources(n)
    lines = [("Name", n["name"]), ("Status", n["status"]), ("Class", n["class"] or "-"),
             ("Address", n["address"] or "-"), ("Datacenter", n["datacenter"] or "-"),
             ("Eligibility", n["eligibility"]), ("Drain", _drain_text(n)), ("Allocs", str(n["allocs"])),
             ("CPU", cpu), ("Memory", memory)]
    for key, value in lines:
        console.print(f"{key:<12} {escape(value)}", highlight=False)
    for title, values in (("Meta", n["meta"]), ("Attributes", n["attributes"])):
        if values:
            console.print(f"\n{title}", highlight=False)
            for key, value in sorted(values.items()):
                console.print(f"  {escape(key)} = {escape(str(value))}", highlight=False)
    if n["allocations"]:
        console.print("\nAllocations", highlight=False)
        table = Table("INSTANCE", "VER", "DESIRED", "ALLOC", box=None, pad_edge=True)
        for a in n["allocations"]:
            table.add_row(escape(f"{a['job']}.{a['index']}"), str(a["version"]), a["desired"], escape(a["id"]))
        console.print(table)


@node.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print what the API says, as JSON.")
@click.pass_context
def status(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """List the nodes (status, eligibility, drain, allocations, resources), or show NAME in detail."""
    api = ApiClient(ctx.obj["http_addr"])
    data = api.get_json(_path(name)) if name else api.get_json("/api/v1/nodes")
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif name:
        _show_node(data["node"])
    elif not data["nodes"]:
        console.print("no nodes", highlight=False)
    else:
        console.print(_nodes_table(data["nodes"]))


# ---- eligibility ------------------------------------------------------------------------------------------------


@node.command()
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off", "enable", "disable", "eligible", "ineligible"]))
@click.pass_context
def eligibility(ctx: click.Context, name: str, state: str) -> None:
    """Let NAME take new instances (on) or not (off); the instances it runs stay either way."""
    eligible = state in ("on", "enable", "eligible")
    api = ApiClient(ctx.obj["http_addr"])
    n = api.request("POST", _path(name, "eligibility"), json={"eligible": eligible}).json()["node"]
    if eligible:
        console.print(f"node {escape(name)}: eligible (takes new instances)", highlight=False)
    else:
        console.print(f"node {escape(name)}: ineligible (keeps its {n['allocs']} instance(s), gets no new ones)",
                      highlight=False)


# ---- drain ------------------------------------------------------------------------------------------------------


class DrainFollower:
    """Follows a drain until its node is empty: a bar of instances moved, a line per instance as it goes, and once
    per job why its replacement cannot be placed (if it cannot)."""

    def __init__(self, api: ApiClient, name: str) -> None:
        self.api = api
        self.name = name
        self.seen: dict[str, dict[str, Any]] = {}  # alloc id -> allocation, while it runs on the node
        self.said_unplaceable: dict[str, str] = {}

    def poll(self) -> dict[str, Any]:
        n = self.api.get_json(_path(self.name))["node"]
        for a in n["allocations"]:
            if a["desired"] == "run":
                self.seen.setdefault(a["id"], a)
        return dict(n)

    def moved(self, n: dict[str, Any]) -> list[dict[str, Any]]:
        """Instances that left the node (stopped there) since the last call."""
        still = {a["id"] for a in n["allocations"] if a["desired"] == "run"}
        gone = [a for alloc_id, a in self.seen.items() if alloc_id not in still and not a.get("reported")]
        for a in gone:
            a["reported"] = True
        return gone

    def where(self, alloc: dict[str, Any]) -> str:
        allocs = self.api.get_json("/api/v1/allocs", job=alloc["job"])["allocations"]
        nodes = [a["node"] for a in allocs if a["index"] == alloc["index"] and a["desired"] == "run"
                 and a["node"] != self.name]
        return f"now on {nodes[0]}" if nodes else "stopped"

    def unplaceable_notes(self, n: dict[str, Any]) -> list[str]:
        notes = []
        for job in sorted({a["job"] for a in n["allocations"] if a["desired"] == "run"}):
            record = self.api.get_json(f"/api/v1/jobs/{quote(job, safe='')}").get("unplaceable")
            reason = (record or {}).get("reason", "")
            if reason and self.said_unplaceable.get(job) != reason:
                self.said_unplaceable[job] = reason
                notes.append(f"[yellow]{escape(job)}: replacement cannot be placed:[/yellow] {escape(reason)}")
        return notes


def _follow_drain(follower: DrainFollower, timeout: float | None) -> None:
    name = follower.name
    n = follower.poll()
    total = max(len(follower.seen), 1)
    started = time.monotonic()
    last_notes = 0.0
    columns = (SpinnerColumn(), TextColumn("draining {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} moved"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(name, total=total)
        while True:
            for a in follower.moved(n):
                bar.console.print(f"  {escape(a['job'])}.{a['index']} ({escape(a['id'])}): "
                                  f"{follower.where(a)}", highlight=False)
            total = max(len(follower.seen), 1)
            bar.update(task, total=total, completed=sum(1 for a in follower.seen.values() if a.get("reported")))
            drain = n.get("drain")
            if not drain:
                raise ShipyardError(f"the drain of node {name} was stopped (shipyard node drain {name} --disable?)")
            if drain["complete"]:
                break
            if time.monotonic() - last_notes > 2.0:  # the jobs API is read every 2 s, not on every poll
                last_notes = time.monotonic()
                for note in follower.unplaceable_notes(n):
                    bar.console.print(f"  {note}", highlight=False)
            if timeout is not None and time.monotonic() - started > timeout:
                left = ", ".join(f"{a['job']}.{a['index']}" for a in n["allocations"] if a["desired"] == "run")
                raise ShipyardError(f"node {name} still runs {drain['remaining']} instance(s) after {timeout:.0f}s "
                                    f"({left or 'stopping'}); the drain goes on at the server "
                                    f"(shipyard node status {name})")
            time.sleep(POLL_SECONDS)
            n = follower.poll()
    console.print(f"[green]node {escape(name)}: drain complete[/green] ({len(follower.seen)} instance(s) moved off; "
                  "it stays ineligible: `shipyard node eligibility " + escape(name) + " on` to use it again)",
                  highlight=False)


def _deadline(text: str) -> float:
    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)  # "0": now
    except ValueError:
        raise click.BadParameter(f'expected a duration like "1m", "30s" or "1h", got {text!r}') from None


@node.command()
@click.argument("name")
@click.option("--deadline", default="1h", show_default=True,
              help="After this long, instances still on the node are stopped (and placed elsewhere) whatever the "
                   "update rules say; 0 stops them all now.")
@click.option("--no-deadline", is_flag=True, help="Never force: wait for every instance to move by the rules.")
@click.option("--disable", is_flag=True, help="Stop draining NAME; it takes new instances again.")
@click.option("--keep-ineligible", is_flag=True, help="With --disable: keep NAME ineligible.")
@click.option("--detach", is_flag=True, help="Return once the drain is accepted; don't follow it.")
@click.option("--timeout", type=float, default=None,
              help="Seconds to follow the drain (default: the deadline plus a minute; none without a deadline).")
@click.pass_context
def drain(ctx: click.Context, name: str, deadline: str, no_deadline: bool, disable: bool, keep_ineligible: bool,
          detach: bool, timeout: float | None) -> None:
    """Move every instance off NAME as a rolling update would (each replacement healthy elsewhere before the old one
    stops, max_parallel at a time), mark it ineligible, and follow until it is empty."""
    api = ApiClient(ctx.obj["http_addr"])
    if disable:
        api.request("POST", _path(name, "drain"), json={"disable": True, "keep_ineligible": keep_ineligible})
        state = "ineligible" if keep_ineligible else "eligible"
        console.print(f"node {escape(name)}: drain stopped ({state})", highlight=False)
        return
    seconds = None if no_deadline else _deadline(deadline)
    follower = DrainFollower(api, name)
    with contextlib.suppress(ShipyardError):  # an unknown node is said by the drain request itself
        follower.poll()  # what runs there now: with --deadline 0 it may all be stopped before the next look
    n = api.request("POST", _path(name, "drain"), json={"deadline": seconds}).json()["node"]
    if detach:
        console.print(f"node {escape(name)}: drain started ({n['allocs']} instance(s) to move)", highlight=False)
        return
    if timeout is None and seconds is not None:
        timeout = seconds + DEADLINE_GRACE
    _follow_drain(follower, timeout)


# ---- force-leave ------------------------------------------------------------------------------------------------

MEMBER_STATUS = {1: "alive", 2: "leaving", 3: "left", 4: "failed"}


@node.command("force-leave")
@click.argument("name")
@click.option("--prune", is_flag=True, help="Remove NAME from the members at once too (else: listed as left until "
                                            "the servers' --reconnect-timeout).")
@click.pass_context
def force_leave(ctx: click.Context, name: str, prune: bool) -> None:
    """A failed node is gone for good: left at once, out of the catalog and placement (its instances are placed
    elsewhere), as `consul force-leave`. A live node is left alone. Needs operator:write with ACLs."""
    api = ApiClient(ctx.obj["http_addr"])
    members = {m.get("Name"): m.get("Status") for m in api.request("GET", "/v1/agent/members").json()}
    status = MEMBER_STATUS.get(members.get(name, 0), "")  # "" when the token may not read it: the server decides
    api.request("PUT", "/v1/agent/force-leave/" + quote(name, safe=""), params={"prune": ""} if prune else None)
    was = f" (was {status})" if status else ""
    if status == "alive":
        console.print(f"node {escape(name)} is alive: nothing changed (force-leave removes failed or left nodes; "
                      "stop its agent first)", highlight=False)
    elif prune:
        console.print(f"node {escape(name)}{was}: removed from the members, the catalog and placement",
                      highlight=False)
    else:
        console.print(f"node {escape(name)}{was}: left; out of the catalog and placement, its instances placed "
                      "elsewhere", highlight=False)


def register(cli: click.Group) -> None:
    cli.add_command(node)
