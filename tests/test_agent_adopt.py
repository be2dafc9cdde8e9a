"""Adoption after the agent's process is killed with SIGKILL: instances keep running under their shims,
a new agent adopts each exactly once, reaps the ones no longer wanted and reports the missing ones."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_support import (
    PYTHON,
    alive,
    exists,
    process_groups_with_env,
    processes_with_env,
    stop_leftover_shims,
    wait_until,
    write_script,
)
from shipyard.agent.adopt import adopt_instances
from shipyard.agent.drivers.exec import ExecDriver
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.ports import PortAllocator
from shipyard.agent.state import STATE_FILE, InstanceState, proc_start_time, read_json, write_json_atomic
from shipyard.agent.supervisor import Supervisor
from shipyard.agent.task import TaskSpec
from shipyard.errors import Conflict

PR_SET_CHILD_SUBREAPER = 36

AGENT = """
import asyncio, json, sys
from shipyard.agent.drivers.exec import ExecDriver
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.ports import PortAllocator
from shipyard.agent.supervisor import Supervisor
from shipyard.agent.task import TaskSpec

async def main():
    driver = ExecDriver(sys.argv[1], cgroups=CgroupSupport(False, "test"))
    ports = PortAllocator()
    supervisors = []
    for alloc, cmd in json.loads(sys.argv[2]).items():
        spec = TaskSpec(service="web", alloc_id=alloc, cmd=cmd, ports=("http",), stop_grace=1)
        supervisor = Supervisor(driver, spec, ports.allocate(spec.port_names))
        await supervisor.start()
        supervisors.append(supervisor)
    print(json.dumps({s.spec.alloc_id: s.status.pid for s in supervisors}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

RUN = uuid.uuid4().hex[:8]  # alloc ids unique to this run: tests find processes by SHIPYARD_ALLOC_ID
A1, A2 = f"a1-{RUN}", f"a2-{RUN}"
KEEP, DELETED, LOST, CRASHED = (f"{n}-{RUN}" for n in ("keep", "deleted", "lost-shim", "crashed"))

TICKER = 'trap "exit 0" TERM; while true; do echo "tick $SHIPYARD_ALLOC_ID"; sleep 0.05; done'


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    # Shims orphaned by the killed agent are re-parented to this test process rather than to PID 1 (which, in
    # some containers, never reaps): so the test can check that nothing is left, zombies included.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agent"
    yield path
    stop_leftover_shims(path)


def run_agent_then_kill9(tmp_path: Path, data_dir: Path, commands: dict[str, str]) -> dict[str, int]:
    script = write_script(tmp_path, "agent.py", AGENT)
    agent = subprocess.Popen([PYTHON, str(script), str(data_dir), json.dumps(commands)], stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None
        pids = json.loads(agent.stdout.readline())
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    return pids


async def test_kill9_of_agent_then_adopt_without_duplicates(tmp_path: Path, data_dir: Path) -> None:
    pids = run_agent_then_kill9(tmp_path, data_dir, {A1: TICKER, A2: TICKER})
    assert all(alive(pid) for pid in pids.values())
    # Nobody from the old server is around, yet the instances are managed: logs keep flowing through the shims.
    log = data_dir / "instances" / A1 / "stdout.log"
    size = log.stat().st_size
    await wait_until(lambda: log.stat().st_size > size, what="logs still written after the agent died")

    driver = ExecDriver(data_dir, cgroups=CgroupSupport(False, "test"))
    ports = PortAllocator()
    report = await adopt_instances(driver, ports, wanted={A1, A2})
    assert {i.alloc_id: i.pid for i in report.adopted} == pids
    assert report.missing == [] and report.reaped == []
    assert all(i.adopted for i in report.adopted)
    held = {port for i in report.adopted for port in i.ports.values()}
    assert len(held) == 2 and held <= ports.allocated

    again = await adopt_instances(driver, ports, wanted={A1, A2})
    assert [id(i) for i in again.adopted] == [id(i) for i in report.adopted]  # same handles, not new ones
    with pytest.raises(Conflict):
        await driver.start(TaskSpec(service="web", alloc_id=A1, cmd=TICKER), {})
    for alloc in (A1, A2):
        # One instance per alloc id (the sh and its sleeps share one process group).
        assert process_groups_with_env("SHIPYARD_ALLOC_ID", alloc) == {pids[alloc]}

    supervisors = [Supervisor.for_adopted(driver, instance) for instance in report.adopted]
    for supervisor in supervisors:
        await supervisor.start()
    try:
        first = supervisors[0]
        old_pid, old_shim = first.status.pid, report.adopted[0].shim_pid
        assert first.status.adopted and first.status.ports == report.adopted[0].ports
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: first.status.state == "running" and first.status.pid not in (None, old_pid),
                         what="restart of an adopted instance")  # fmt: skip
        assert first.status.restarts == 1 and first.status.ports == report.adopted[0].ports
        await wait_until(lambda: not exists(old_shim), what="old shim reaped")
    finally:
        stopped = [await s.stop() for s in supervisors]
    assert all(record is not None for record in stopped)
    for alloc, pid in pids.items():
        assert not exists(pid)
        assert processes_with_env("SHIPYARD_ALLOC_ID", alloc) == []
        assert not (data_dir / "instances" / alloc / STATE_FILE).exists()


async def test_adopt_reaps_unwanted_and_reports_missing(tmp_path: Path, data_dir: Path) -> None:
    pids = run_agent_then_kill9(
        tmp_path, data_dir, {KEEP: TICKER, DELETED: TICKER, LOST: "exec sleep 60", CRASHED: "sleep 0.3; exit 5"}
    )
    states = {a: InstanceState.from_dict(read_json(data_dir / "instances" / a / STATE_FILE)) for a in pids}
    os.kill(states[LOST].shim_pid, signal.SIGKILL)  # its instance (silent, so no SIGPIPE) runs on alone
    await wait_until(lambda: not alive(states[LOST].shim_pid), what="shim killed")
    await wait_until(lambda: not alive(states[CRASHED].shim_pid), what="crashing instance gone")
    assert alive(pids[LOST])

    driver = ExecDriver(data_dir, cgroups=CgroupSupport(False, "test"))
    report = await adopt_instances(driver, wanted={KEEP, LOST, CRASHED})
    try:
        assert [i.alloc_id for i in report.adopted] == [KEEP]
        assert report.reaped_alloc_ids == [DELETED] and report.reaped[0].reason == "stopped"
        assert not exists(pids[DELETED]) and processes_with_env("SHIPYARD_ALLOC_ID", DELETED) == []
        missing = {m.state.alloc_id: m for m in report.missing}
        assert set(missing) == {LOST, CRASHED}
        assert "orphaned process group was killed" in missing[LOST].reason
        await wait_until(lambda: not alive(pids[LOST]), what="orphan killed")
        assert missing[CRASHED].exit is not None and missing[CRASHED].exit.exit_code == 5
    finally:
        for instance in report.adopted:
            await instance.stop()


async def test_pid_reuse_is_not_mistaken_for_an_instance(data_dir: Path) -> None:
    decoy = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        directory = data_dir / "instances" / "reused"
        directory.mkdir(parents=True)
        start = proc_start_time(decoy.pid)
        assert start is not None
        state = InstanceState(
            alloc_id="reused", service="web", instance=0, shim_pid=decoy.pid, shim_start_time=start + 1,
            pid=decoy.pid, pgid=decoy.pid, start_time=start + 1, started_at=time.time(), ports={},
            stdout_log=str(directory / "stdout.log"), stderr_log=str(directory / "stderr.log"), cgroup=None,
            spec=TaskSpec(service="web", alloc_id="reused", args=("sleep", "60")).to_dict(),
        )  # fmt: skip
        write_json_atomic(directory / STATE_FILE, state.to_dict())
        report = await adopt_instances(ExecDriver(data_dir, cgroups=CgroupSupport(False, "test")))
        assert report.adopted == [] and [m.reason for m in report.missing] == ["not running"]
        await asyncio.sleep(0.2)
        assert decoy.poll() is None  # a stranger with a recycled pid is neither adopted nor killed
    finally:
        decoy.kill()
        decoy.wait()


def test_shim_is_small() -> None:
    # Each instance pays for one shim: it must not drag asyncio or the whole agent in.
    code = "import sys, shipyard.agent.shim; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "asyncio" not in out and "shipyard.agent.drivers" not in out
