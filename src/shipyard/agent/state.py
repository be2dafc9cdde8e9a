"""On-disk records of one instance: the launch file, the state file written once it runs, the exit record.

Every write is atomic (temp file, fsync, rename); this module must never start or signal a process.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAUNCH_FILE = "launch.json"
STATE_FILE = "state.json"
EXIT_FILE = "exit.json"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
TIMELINE_LOG = "timeline.log"  # both streams, each line stamped with its time (for `shipyard logs`)
SHIM_LOG = "shim.log"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=True).encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def proc_stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat from the state on (field 3 of proc(5) is [0]), or None when the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses; the fields start after the last ')'.
    return raw[raw.rindex(b")") + 2 :].split()


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, starttime ticks) from /proc/<pid>/stat, or None when the pid is gone."""
    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def proc_start_time(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[3] if stat else None


def is_same_live_process(pid: int, start_time: int | None) -> bool:
    """True when `pid` runs, is not a zombie, and is the process that had `start_time` (no pid reuse)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (start_time is None or stat[3] == start_time)


@dataclass
class InstanceState:
    """What the shim records once the instance's process runs; enough to adopt it after a server restart."""

    alloc_id: str
    service: str
    instance: int
    shim_pid: int
    shim_start_time: int
    pid: int
    pgid: int
    start_time: int
    started_at: float
    ports: dict[str, int]
    stdout_log: str
    stderr_log: str
    cgroup: str | None
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ExitRecord:
    """How a run ended: exit code or signal, why, and the last stderr lines."""

    exit_code: int | None
    signal: int | None = None
    reason: str = "exited"
    stderr_tail: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def describe(self) -> str:
        if self.signal is not None:
            return f"{self.reason} (signal {self.signal})"
        if self.exit_code is not None:
            return f"{self.reason} (exit code {self.exit_code})"
        return self.reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
