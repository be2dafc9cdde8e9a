"""`shipyard logs SERVICE`: stdout and stderr of its instances interleaved in time order (or one stream), the
last N lines, optionally followed for every instance at once.

It only reads the logs API; it never touches an instance or its files.
"""

from __future__ import annotations

import threading
from typing import Any

import click

from shipyard.agent.logfiles import split_timeline_line
from shipyard.cli.http import ApiClient
from shipyard.errors import NotFound, ShipyardError


def _instances(api: ApiClient, service: str, instance: int | None) -> list[dict[str, Any]]:
    allocs = api.request("GET", "/api/v1/allocs", params={"job": service}).json()["allocations"]
    allocs = [a for a in allocs if a["desired"] == "run" and (instance is None or a["index"] == instance)]
    if not allocs:
        raise NotFound(f"no running instance of {service!r}" + (f" with index {instance}" if instance is not None
                                                                  else ""))
    return sorted(allocs, key=lambda a: a["index"])


def _path(alloc: dict[str, Any]) -> str:
    return f"/api/v1/allocs/{alloc['id']}/logs"


def _print_merged(api: ApiClient, service: str, allocs: list[dict[str, Any]], tail: int) -> None:
    """Every instance's last lines, merged by time; each line prefixed with its instance when there are several."""
    lines: list[tuple[float, int, str]] = []
    for alloc in allocs:
        response = api.request("GET", _path(alloc), params={"stream": "all", "tail": str(tail), "timestamps": "1"})
        prefix = f"[{service}.{alloc['index']}] " if len(allocs) > 1 else ""
        for n, raw in enumerate(response.text.splitlines()):
            parsed = split_timeline_line(raw)
            stamp, text = (parsed[0], parsed[2]) if parsed is not None else (0.0, raw)
            lines.append((stamp, n, prefix + text))
    for _, _, text in sorted(lines, key=lambda item: (item[0], item[1]))[-tail:] if tail else []:
        click.echo(text)


def _print_stream(api: ApiClient, service: str, allocs: list[dict[str, Any]], params: dict[str, str]) -> None:
    for alloc in allocs:
        prefix = f"[{service}.{alloc['index']}] " if len(allocs) > 1 else ""
        for line in api.request("GET", _path(alloc), params=params).text.splitlines():
            click.echo(prefix + line)


def _follow(api: ApiClient, service: str, allocs: list[dict[str, Any]], params: dict[str, str]) -> None:
    """One streamed request per instance; lines are printed as they arrive, until Ctrl-C or every instance ends."""
    lock = threading.Lock()
    failures: list[ShipyardError] = []

    def pump(alloc: dict[str, Any]) -> None:
        prefix = f"[{service}.{alloc['index']}] " if len(allocs) > 1 else ""
        try:
            with api.stream("GET", _path(alloc), params={**params, "follow": "1"}) as response:
                for line in response.iter_lines():
                    with lock:
                        click.echo(prefix + line)
        except ShipyardError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=pump, args=(alloc,), daemon=True) for alloc in allocs]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        return
    if failures:
        raise failures[0]


@click.command()
@click.argument("service")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (of every instance) until Ctrl-C.")
@click.option("--instance", type=int, default=None, help="Only this instance index (default: all, each line "
                                                          "prefixed with its instance).")
@click.option("--stdout", "stream", flag_value="stdout", help="Only stdout.")
@click.option("--stderr", "stream", flag_value="stderr", help="Only stderr.")
@click.option("--tail", default=100, show_default=True, type=click.IntRange(0, 100_000),
              help="Start with the last N lines (0: only new ones, with -f).")
@click.pass_context
def logs(ctx: click.Context, service: str, follow: bool, instance: int | None, stream: str | None,
         tail: int) -> None:
    """Print SERVICE's logs: stdout and stderr interleaved in time order (Python logs to stderr), or --stdout or
    --stderr only; -f follows."""
    api = ApiClient(ctx.obj["http_addr"])
    allocs = _instances(api, service, instance)
    params = {"stream": stream or "all", "tail": str(tail)}
    if follow:
        _follow(api, service, allocs, params)
    elif stream is None:
        _print_merged(api, service, allocs, tail)
    else:
        _print_stream(api, service, allocs, params)
