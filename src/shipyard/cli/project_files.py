"""A project as the CLI sends it: shipyard.yaml found and validated locally, every path made absolute against the
caller's working directory, each service stamped with its working directory's content.

It reads the caller's files only; it never talks to a server and never starts anything.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from shipyard.cli.source_tree import read_source_tree, source_record
from shipyard.errors import NotFound
from shipyard.spec import ProjectSpec, SpecError, TaskSpec, load_project

err_console = Console(stderr=True)


def project_file(path: str) -> Path:
    """DIRECTORY or DIRECTORY/shipyard.yaml, absolute: it is used from other directories (the server's, a shim's)."""
    target = Path(path).absolute()
    if target.is_dir():
        target = target / "shipyard.yaml"
    if not target.is_file():
        raise NotFound(f"no shipyard.yaml at {target}")
    return target


def load_locally(spec_file: Path) -> ProjectSpec:
    """Shows every spec problem with file:line before anything is sent or started."""
    try:
        return load_project(str(spec_file))
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(f"[red]error:[/red] {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def resolve_project(project: ProjectSpec, base: Path) -> ProjectSpec:
    """Commands run where shipyard.yaml is (or in its `workdir`, resolved against that directory); each service
    carries its working directory's files, so a code change is a new version."""
    trees: dict[str, dict[str, str]] = {}  # services often share one directory: read it once

    def resolve(task: TaskSpec) -> TaskSpec:
        workdir = str((base / (task.workdir or ".")).resolve())
        if not Path(workdir).is_dir():  # every instance would fail to start in it, so say it here
            raise NotFound(f"{task.name}: workdir {task.workdir!r} is not a directory ({workdir})")
        if workdir not in trees:
            trees[workdir] = source_record(read_source_tree(Path(workdir)))
        return replace(task, workdir=workdir, source=trees[workdir])

    return replace(
        project,
        services={name: resolve(t) for name, t in project.services.items()},
        workers={name: resolve(t) for name, t in project.workers.items()},
    )
