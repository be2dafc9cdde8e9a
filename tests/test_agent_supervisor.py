"""Supervisor against real processes: fast first restart, exponential backoff, reset after a stable run,
restart on request (failing health), crash loops visible as state, clean final stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from agent_support import alive, exists, wait_until, write_script
from shipyard.agent.drivers.exec import ExecDriver
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.supervisor import Supervisor
from shipyard.agent.task import RestartPolicy, TaskSpec


@pytest.fixture
def driver(tmp_path: Path) -> ExecDriver:
    return ExecDriver(tmp_path / "agent", cgroups=CgroupSupport(False, "not needed by these tests"))


async def test_kill9_instance_is_back_at_once(driver: ExecDriver) -> None:
    spec = TaskSpec(
        service="web", alloc_id="k9", args=("sleep", "60"), stop_grace=1,
        restart=RestartPolicy(initial=30, factor=2, max=60, reset_after=30),  # backoff would be obvious
    )  # fmt: skip
    supervisor = Supervisor(driver, spec, {})
    await supervisor.start()
    try:
        first = supervisor.status.pid
        assert first and alive(first) and supervisor.status.state == "running"
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: supervisor.status.state == "running" and supervisor.status.pid not in (None, first),
                         timeout=10, what="a new instance")  # fmt: skip
        assert time.monotonic() - killed_at < 5  # generous; the first restart has no backoff
        status = supervisor.status
        assert status.restarts == 1
        assert status.recent_restarts[-1].delay == 0
        assert status.last_exit is not None and status.last_exit.signal == signal.SIGKILL
        assert not status.crash_looping
        assert alive(status.pid)
    finally:
        record = await supervisor.stop()
    assert record is not None and record.reason == "stopped"
    assert supervisor.status.state == "stopped" and supervisor.status.pid is None
    assert not exists(first)


async def test_crash_loop_backs_off_exponentially_and_resets_after_stable_run(
    driver: ExecDriver, tmp_path: Path
) -> None:
    # Runs 1-5 crash at once, run 6 is stable (longer than reset_after) then crashes, run 7 crashes, run 8 stays.
    counter = tmp_path / "runs"
    script = write_script(
        tmp_path, "flaky.sh",
        f"""
        n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 ))
        echo $n > {counter}
        echo "crash number $n" >&2
        case $n in
          6) sleep 2.5; exit 4 ;;
          8) exec sleep 60 ;;
          *) exit 1 ;;
        esac
        """,
    )  # fmt: skip
    policy = RestartPolicy(initial=0.2, factor=2, max=0.8, reset_after=1.5)
    spec = TaskSpec(service="flaky", alloc_id="loop", args=("/bin/sh", str(script)), restart=policy, stop_grace=1)
    supervisor = Supervisor(driver, spec, {})
    seen_backoff = []

    def settled() -> bool:
        status = supervisor.status
        if status.state == "backoff":
            seen_backoff.append(status)
        return status.restarts == 7 and status.state == "running"

    await supervisor.start()
    try:
        await wait_until(settled, timeout=40, what="7 restarts")
        status = supervisor.status
        assert [event.delay for event in status.recent_restarts] == [0, 0.2, 0.4, 0.8, 0.8, 0, 0.2]
        assert [event.exit.exit_code for event in status.recent_restarts] == [1, 1, 1, 1, 1, 4, 1]
        assert status.recent_restarts[5].exit.stderr_tail == ["crash number 6"]
        assert status.last_exit is not None and status.last_exit.stderr_tail == ["crash number 7"]
        # While backing off the loop was visible as such, with the next restart time.
        looping = [s for s in seen_backoff if s.crash_looping]
        assert looping, "never saw the crash loop in the status"
        assert all(s.next_restart_at is not None and s.last_exit.exit_code == 1 for s in looping)
        assert max(s.consecutive_failures for s in looping) >= 4
    finally:
        await supervisor.stop()


async def test_restart_on_request_and_health_command(driver: ExecDriver) -> None:
    spec = TaskSpec(service="api", alloc_id="health", args=("sleep", "60"), stop_grace=1, health_cmd="exit 1")
    supervisor = Supervisor(driver, spec, {"http": 24001})
    await supervisor.start()
    try:
        first = supervisor.status.pid
        assert supervisor.instance is not None
        result = await supervisor.instance.run_health_command(timeout=10)
        assert not result.ok and result.exit_code == 1
        await supervisor.restart("health check failing")
        await wait_until(lambda: supervisor.status.state == "running" and supervisor.status.pid != first,
                         what="restart")  # fmt: skip
        status = supervisor.status
        assert status.last_exit is not None and status.last_exit.reason == "restarted: health check failing"
        assert status.recent_restarts[-1].delay == 0
        assert status.ports == {"http": 24001}  # an instance keeps its ports across restarts
        assert not exists(first)
    finally:
        await supervisor.stop()


async def test_start_failure_goes_into_backoff_not_an_exception(driver: ExecDriver) -> None:
    spec = TaskSpec(
        service="broken", alloc_id="nobin", args=("/no/such/binary",),
        restart=RestartPolicy(initial=0.1, factor=2, max=0.2, reset_after=10),
    )  # fmt: skip
    supervisor = Supervisor(driver, spec, {})
    await supervisor.start()
    try:
        await wait_until(lambda: supervisor.status.restarts >= 3, what="restart attempts")
        status = supervisor.status
        assert status.last_exit is not None and status.last_exit.reason == "start failed"
        assert "/no/such/binary" in status.last_exit.stderr_tail[0]
        assert status.crash_looping
    finally:
        await supervisor.stop()
    assert supervisor.status.state == "stopped"


async def test_detach_leaves_instance_running(driver: ExecDriver) -> None:
    spec = TaskSpec(service="keep", alloc_id="detach", args=("sleep", "60"), stop_grace=1)
    supervisor = Supervisor(driver, spec, {})
    await supervisor.start()
    instance = supervisor.instance
    assert instance is not None
    await supervisor.detach()
    assert alive(instance.pid) and supervisor.status.state == "detached"
    await instance.stop()
    assert not alive(instance.pid)
