"""State and secrets on disk are the server's user's alone: its data dir is 0700 and everything it creates is 0600/0700
(store.db and its -wal/-shm, bus.db, node-id, LOCK, instance logs, gateway counters), through the process umask.

The operator's own umask is kept for the processes the agent starts (their files are theirs); it never changes the
mode of anything outside a data dir.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_UMASK = 0o077
# Files a data dir of an older version may hold with wider modes; SQLite gives -wal/-shm the mode of the db file.
KNOWN_FILES = ("store.db", "store.db-wal", "store.db-shm", "bus.db", "bus.db-wal", "bus.db-shm", "node-id", "LOCK")

_operator_umask: int | None = None


OPERATOR_UMASK_ENV = "SHIPYARD_OPERATOR_UMASK"  # a server tells its node agent process the operator's umask


def make_process_private() -> None:
    """From now on this process creates files 0600 and directories 0700 (idempotent). A server's node agent
    process inherits the server's private umask: the operator's own comes in OPERATOR_UMASK_ENV (octal)."""
    global _operator_umask
    previous = os.umask(PRIVATE_UMASK)
    given = os.environ.pop(OPERATOR_UMASK_ENV, "")
    if _operator_umask is None:
        _operator_umask = int(given, 8) if given.isdigit() else previous


def operator_umask() -> int:
    """The umask the server was started with, for the processes it starts on the operator's behalf."""
    if _operator_umask is not None:
        return _operator_umask
    current = os.umask(0)
    os.umask(current)
    return current


def make_data_dir_private(data_dir: str) -> None:
    """Creates the data dir 0700, and narrows one an older version left open (0755 dir, 0644 files)."""
    path = Path(data_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for name in KNOWN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path / name, 0o600)
