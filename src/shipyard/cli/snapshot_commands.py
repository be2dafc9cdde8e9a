"""`shipyard snapshot save|restore|inspect FILE`: the whole store to one file and back, over /v1/snapshot.

Talks to the server's Consul-compatible API like `consul snapshot` does; inspect reads a file and never a server.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from shipyard.cli.http import ApiClient
from shipyard.errors import ShipyardError
from shipyard.registry.snapshot import read_snapshot


class SnapshotFileError(ShipyardError):
    """A snapshot file that cannot be read or written here (the CLI says so in one line)."""

    status = 400


@click.group()
def snapshot() -> None:
    """Save the server's whole state to a file, or restore it from one."""


@snapshot.command("save")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def snapshot_save(ctx: click.Context, file: Path) -> None:
    """Write a snapshot of every key in the store to FILE (mode 0600: it holds secrets such as the CA's key)."""
    response = ApiClient(ctx.obj["http_addr"]).request("GET", "/v1/snapshot")
    data = response.content
    partial = file.with_name(f".{file.name}.partial")
    try:
        # Written beside FILE and renamed over it, so an interrupted save never leaves half a snapshot as FILE.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, file)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise SnapshotFileError(f"cannot write {file}: {exc.strerror}") from None
    index = response.headers.get("X-Consul-Index", "?")
    click.echo(f"Saved and verified snapshot to index {index}: {file} ({len(data)} bytes)")


@snapshot.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def snapshot_restore(ctx: click.Context, file: Path) -> None:
    """Replace the server's whole state with the snapshot in FILE (one transaction: all of it or nothing)."""
    data = _read(file)
    read_snapshot(data)  # a damaged file is one line here, before the server is asked
    ApiClient(ctx.obj["http_addr"]).request("PUT", "/v1/snapshot", content=data)
    click.echo(f"Restored snapshot {file}")


@snapshot.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def snapshot_inspect(file: Path) -> None:
    """Print what a snapshot file holds (its revision, datacenter, node, key count), after verifying it."""
    meta, entries, leases = read_snapshot(_read(file))
    for label, value in (("Revision", meta.get("Revision")), ("Datacenter", meta.get("Datacenter")),
                         ("Node", meta.get("Node")), ("Created", meta.get("CreatedAt")), ("Keys", len(entries)),
                         ("Leases", len(leases))):
        click.echo(f"{label:<11}{value}")


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise SnapshotFileError(f"cannot read {file}: {exc.strerror}") from None


def register(cli: click.Group) -> None:
    cli.add_command(snapshot)
