"""Real CPU and memory use of running instances, read from /proc: the instance's process tree under its shim.

It only reads /proc (blocking: callers run it off the event loop); it must never signal, limit or change a process.

CPU is a share of one core (100 = one core busy), averaged over the time since the previous reading of the same
run; the first reading of a run averages over the run's life so far. Memory is the resident set (RSS) summed over
the tree. Readings closer together than MIN_INTERVAL return the previous one, so many viewers cost one /proc pass.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shipyard.agent.limits import PAGE_SIZE, descendant_pids
from shipyard.agent.state import proc_stat_fields

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIN_INTERVAL = 1.0  # seconds: below this a CPU share is mostly rounding of clock ticks


@dataclass(frozen=True)
class Usage:
    """One reading of an instance's process tree."""

    cpu_percent: float
    cpu_seconds: float  # user + system time of the live processes, and of the children they waited for
    rss_bytes: int
    processes: int
    sampled_at: float  # wall clock, seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Sample:
    pid: int
    start_time: int
    cpu_seconds: float
    monotonic: float
    usage: Usage


def _tree_totals(pids: set[int]) -> tuple[float, int, int]:
    """(cpu seconds, rss bytes, live processes) over `pids`; a process gone meanwhile counts for nothing."""
    ticks = rss_pages = count = 0
    for pid in pids:
        fields = proc_stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        # utime, stime, cutime, cstime (fields 14-17 of proc(5)); rss in pages (field 24)
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        rss_pages += int(fields[21])
        count += 1
    return ticks / CLOCK_TICKS, rss_pages * PAGE_SIZE, count


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


class UsageMeter:
    """Keeps each instance's previous reading, which a CPU share is measured against; thread-safe."""

    def __init__(self, min_interval: float = MIN_INTERVAL) -> None:
        self.min_interval = min_interval
        self._last: dict[str, _Sample] = {}
        self._lock = threading.Lock()

    def read(self, alloc_id: str, shim_pid: int, pid: int, start_time: int) -> Usage | None:
        """The instance `pid` (started at `start_time` ticks after boot) and its descendants under `shim_pid`;
        None when that process is gone."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(alloc_id)
        if last is not None and (last.pid, last.start_time) != (pid, start_time):
            last = None  # the allocation's previous run: this one is measured on its own
        if last is not None and now - last.monotonic < self.min_interval:
            return last.usage
        fields = proc_stat_fields(pid)
        if fields is None or int(fields[19]) != start_time or fields[0] in (b"Z", b"X"):
            return None  # exited, or the pid was reused by another process
        cpu, rss, count = _tree_totals(descendant_pids(shim_pid) | {pid})
        if last is not None:
            elapsed, used = now - last.monotonic, cpu - last.cpu_seconds
        else:  # a new run (first reading, or restarted): its life so far
            elapsed, used = _uptime() - start_time / CLOCK_TICKS, cpu
        percent = round(100.0 * max(0.0, used) / elapsed, 1) if elapsed > 0 else 0.0
        usage = Usage(percent, round(cpu, 2), rss, count, time.time())
        with self._lock:
            self._last[alloc_id] = _Sample(pid, start_time, cpu, now, usage)
        return usage

    def forget(self, alloc_id: str) -> None:
        """The instance's run ended: its reading goes (a next run is measured on its own anyway)."""
        with self._lock:
            self._last.pop(alloc_id, None)
