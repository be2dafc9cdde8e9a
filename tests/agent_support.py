"""Helpers for the agent tests: scripts written to temp dirs, polling until a condition holds, /proc checks."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from shipyard.agent.state import proc_stat

PYTHON = sys.executable


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


async def wait_until(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    """Poll `condition` until truthy; the timeout is a generous bound, not a measurement."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def exists(pid: int) -> bool:
    """Present in /proc at all, zombies included."""
    return proc_stat(pid) is not None


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value (how tests find an instance's processes)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and alive(int(entry)):
            found.append(int(entry))
    return found


def process_groups_with_env(name: str, value: str) -> set[int]:
    """The process groups of the live processes whose environment has name=value.

    A short-lived child (a shell's `sleep`) may exit between the listing and the question: it is skipped, not an
    error, since its group is the same as its parent's.
    """
    groups = set()
    for pid in processes_with_env(name, value):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    return groups


def read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def stop_leftover_shims(data_dir: Path) -> None:
    """After a failed test: SIGTERM every shim still running from `data_dir` (they stop their instances)."""
    import json
    import signal

    for state_file in data_dir.glob("instances/*/state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        stat = proc_stat(state["shim_pid"])
        if stat is not None and stat[3] == state["shim_start_time"] and stat[0] != "Z":
            os.kill(state["shim_pid"], signal.SIGTERM)
