"""UsageMeter on real processes: a busy process's CPU share and RSS, readings closer than the interval shared, a
restarted run (same allocation, new process) measured from its own start, a process gone read as None."""

from __future__ import annotations

import subprocess
import sys
import time

from shipyard.agent.state import proc_start_time
from shipyard.agent.usage import Usage, UsageMeter


def test_readings_of_a_busy_process_then_of_its_restart() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(["sleep", "30"])
    try:
        meter = UsageMeter(min_interval=0.2)
        start = proc_start_time(busy.pid)
        assert start is not None

        def read() -> Usage | None:
            return meter.read("web.0", busy.pid, busy.pid, start)

        first = read()
        assert first is not None and first.rss_bytes > 0 and first.processes == 1
        assert read() is first  # within min_interval: the previous reading, no /proc pass
        deadline = time.monotonic() + 10
        # A tenth of a second of CPU more: clearly above what the idle process below ever used (a tick or two).
        while (later := read()) is None or later.cpu_seconds < first.cpu_seconds + 0.1:
            assert time.monotonic() < deadline, "the busy process's CPU time never grew"
            time.sleep(0.05)
        assert later.cpu_percent > 0

        # The allocation's next run is another process: measured over its own life, not against the busy one.
        idle_start = proc_start_time(idle.pid)
        assert idle_start is not None
        restarted = meter.read("web.0", idle.pid, idle.pid, idle_start)
        assert restarted is not None and restarted.cpu_seconds < later.cpu_seconds

        busy.kill()
        busy.wait()
        meter.forget("web.0")
        assert read() is None  # exited: no reading
        assert meter.read("web.0", idle.pid, idle.pid, idle_start + 1) is None  # not the process that started then
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
