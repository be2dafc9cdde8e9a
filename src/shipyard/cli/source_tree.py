"""The content of a service's working directory as the CLI sees it: a digest per file, minus what never ships.

It only reads the caller's files (so `deploy` notices a code change and can say which files changed); it never
writes anything, and never follows a symlinked directory out of the tree.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Directories that are build output, tool caches, virtualenvs or Shipyard's own state: never the service. So is every
# hidden directory (.git, .venv, .shipyard, tool caches, a service's own .data): code does not live in those.
IGNORED_DIRS = frozenset({"__pycache__", "shipyard-data", "venv", "node_modules"})
IGNORED_FILES = ("*.pyc", "*.pyo", "*.swp", "*~", ".DS_Store", "shipyard.yaml", ".shipyardignore",
                 # what a running service writes next to its code: logs, pid files, sockets, SQLite databases
                 "*.log", "*.pid", "*.sock", "*.db", "*.db-wal", "*.db-shm", "*.db-journal", "*.sqlite", "*.sqlite3")
IGNORE_FILE = ".shipyardignore"  # one glob per line, relative to the working directory (gitignore-like, simpler)
MAX_FILES = 5000  # past this the tree is probably not one service's code: hash it, but list no files
DIGEST_CHARS = 12


@dataclass(frozen=True)
class SourceTree:
    """{relative path: short sha256} of every file that counts, and a digest of the whole."""

    files: Mapping[str, str]

    @property
    def digest(self) -> str:
        whole = hashlib.sha256("\n".join(f"{p}\0{d}" for p, d in sorted(self.files.items())).encode())
        return whole.hexdigest()[:16]


def _is_data_dir(path: Path) -> bool:
    # A server's data dir, whatever its name (its node-id is written first, its agent/ once instances run).
    return (path / "node-id").is_file() or (path / "agent" / "instances").is_dir()


def _patterns(root: Path) -> list[str]:
    try:
        lines = (root / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relative: str, name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk(root: Path, patterns: list[str]) -> Iterator[tuple[str, Path]]:
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        keep = []
        for name in sorted(dirnames):
            relative = (here / name).relative_to(root).as_posix()
            hidden = name.startswith(".")
            if hidden or name in IGNORED_DIRS or _ignored(relative, name, patterns) or _is_data_dir(here / name):
                continue
            keep.append(name)
        dirnames[:] = keep  # os.walk does not follow symlinked directories by default
        for name in sorted(filenames):
            relative = (here / name).relative_to(root).as_posix()
            if not _ignored(relative, name, [*IGNORED_FILES, *patterns]):
                yield relative, here / name


def _file_digest(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:  # a socket, a dangling link, a file removed while we walk: not part of the code
        return None
    return digest.hexdigest()[:DIGEST_CHARS]


def read_source_tree(root: Path) -> SourceTree:
    files: dict[str, str] = {}
    for relative, path in _walk(root, _patterns(root)):
        digest = _file_digest(path)
        if digest is not None:
            files[relative] = digest
    return SourceTree(files)


def source_record(tree: SourceTree) -> dict[str, str]:
    """What goes into the job spec: every file's digest (so the next deploy can say what changed), or only the
    whole tree's digest when the tree is too large to list."""
    if len(tree.files) > MAX_FILES:
        return {"*": tree.digest}
    return dict(tree.files)


def changed_files(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Human lines: `M path`, `A path`, `D path` (or one line when either side only has the whole digest)."""
    if "*" in old or "*" in new:
        return [] if old == new else ["M (too many files to list)"]
    lines = [f"A {p}" for p in sorted(new.keys() - old.keys())]
    lines += [f"D {p}" for p in sorted(old.keys() - new.keys())]
    lines += [f"M {p}" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
    return sorted(lines, key=lambda line: line[2:])
