"""The shim fork server against real processes: concurrent launches matched to their requests, a killed fork
server replaced without losing a start or an instance, no zombies, and the direct-spawn fallback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_support import PYTHON, alive, exists, stop_leftover_shims, wait_until, write_script
from shipyard.agent.adopt import adopt_instances
from shipyard.agent.drivers.exec import FORK_SERVER_GIVE_UP, ExecDriver, ExecInstance, InstanceStartError
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.state import STATE_FILE, InstanceState, proc_stat, read_json
from shipyard.agent.task import TaskSpec

RUN = uuid.uuid4().hex[:8]
SLEEPER = 'trap "exit 0" TERM; echo "I am $SHIPYARD_ALLOC_ID"; while true; do sleep 0.1; done'


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[ExecDriver]:
    driver = ExecDriver(tmp_path / "agent", cgroups=CgroupSupport(False, "not needed by these tests"))
    try:
        yield driver
    finally:
        await asyncio.gather(*(i.stop() for i in list(driver.running.values())), return_exceptions=True)
        await driver.close()
        stop_leftover_shims(tmp_path / "agent")


def spec(alloc_id: str) -> TaskSpec:
    return TaskSpec(service="web", alloc_id=alloc_id, cmd=SLEEPER, stop_grace=1)


def parent_of(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `pid`, zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append((int(entry), stat[0]))
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def assert_matched(driver: ExecDriver, instance: ExecInstance, alloc_id: str) -> None:
    """The handle, the state file and the real processes all belong to the same launch."""
    assert instance.alloc_id == alloc_id
    state = InstanceState.from_dict(read_json(driver.instance_dir(alloc_id) / STATE_FILE))
    assert (state.shim_pid, state.pid) == (instance.shim_pid, instance.pid)
    assert environ_of(instance.pid)["SHIPYARD_ALLOC_ID"] == alloc_id
    assert parent_of(instance.pid) == instance.shim_pid
    assert os.getsid(instance.shim_pid) == instance.shim_pid  # a session leader, like a spawned shim
    assert b"shipyard.agent.shim" in Path(f"/proc/{instance.shim_pid}/cmdline").read_bytes().split(b"\0")


async def test_many_concurrent_starts_are_matched_to_their_requests(driver: ExecDriver) -> None:
    allocs = [f"many-{n:02d}-{RUN}" for n in range(40)]
    instances = await asyncio.gather(*(driver.start(spec(alloc), {}) for alloc in allocs))
    fork_server = driver.fork_server.pid
    assert fork_server is not None and driver.fork_server.generation == 1  # one fork server served them all
    for alloc, instance in zip(allocs, instances, strict=True):
        assert_matched(driver, instance, alloc)
        assert parent_of(instance.shim_pid) == fork_server
        assert not instance.adopted and instance.running
    assert len({i.shim_pid for i in instances}) == len({i.pid for i in instances}) == len(allocs)
    for instance in instances:
        await wait_until(lambda i=instance: i.stdout_log.read_text() == f"I am {i.alloc_id}\n", what="output")
    records = await asyncio.gather(*(i.stop() for i in instances))
    assert all(r.reason == "stopped" and r.exit_code == 0 for r in records)
    assert all(not exists(i.shim_pid) and not exists(i.pid) for i in instances)  # exited and reaped


async def test_fork_server_killed_mid_operation_is_replaced(driver: ExecDriver) -> None:
    before = await driver.start(spec(f"before-{RUN}"), {})
    old = driver.fork_server.pid
    assert old is not None and parent_of(before.shim_pid) == old
    # Stopped, it takes requests into its socket but forks nothing; killed then, it drops them unanswered.
    os.kill(old, signal.SIGSTOP)
    allocs = [f"inflight-{n}-{RUN}" for n in range(8)]
    starts = [asyncio.ensure_future(driver.start(spec(alloc), {})) for alloc in allocs]
    await asyncio.sleep(0.2)
    assert not any(s.done() for s in starts)
    os.kill(old, signal.SIGKILL)
    instances = await asyncio.gather(*starts)  # none fails: retried on a fresh fork server
    new = driver.fork_server.pid
    assert new not in (None, old) and not exists(old)  # the dead one was reaped by us, its parent
    for alloc, instance in zip(allocs, instances, strict=True):
        assert_matched(driver, instance, alloc)
        assert parent_of(instance.shim_pid) == new
    # The shim forked by the dead fork server was orphaned, and runs on as a shim orphaned by a dead server would.
    assert before.running and alive(before.shim_pid) and alive(before.pid)
    assert parent_of(before.shim_pid) != old
    record = await before.stop()
    assert record.reason == "stopped" and not alive(before.pid)
    # Killed while idle, it is replaced on the next start just the same.
    os.kill(new, signal.SIGKILL)
    await wait_until(lambda: not exists(new), what="idle fork server reaped")
    again = await driver.start(spec(f"after-{RUN}"), {})
    assert_matched(driver, again, f"after-{RUN}")
    assert parent_of(again.shim_pid) == driver.fork_server.pid not in (old, new)


async def test_fork_server_leaves_no_zombies(driver: ExecDriver) -> None:
    crashers = [
        TaskSpec(service="s", alloc_id=f"crash-{n}-{RUN}", cmd=f"sleep 0.{n}; exit {n}", stop_grace=1) for n in range(5)
    ]
    sleepers = [spec(f"stopped-{n}-{RUN}") for n in range(5)]
    instances = await asyncio.gather(*(driver.start(s, {}) for s in crashers + sleepers))
    fork_server = driver.fork_server.pid
    assert fork_server is not None
    records = await asyncio.gather(*(i.wait() for i in instances[:5]), *(i.stop() for i in instances[5:]))
    assert [r.exit_code for r in records[:5]] == [0, 1, 2, 3, 4]
    # Shims that exited by themselves and shims that were stopped: all reaped by the fork server.
    assert children_of(fork_server) == []
    # A shim whose instance cannot start reports it and exits: reaped as well.
    with pytest.raises(InstanceStartError, match="such-binary"):
        await driver.start(TaskSpec(service="s", alloc_id=f"nobin-{RUN}", args=("/no/such-binary",)), {})
    await wait_until(lambda: children_of(fork_server) == [], what="failed shim reaped")
    assert alive(fork_server) and driver.fork_server.pid == fork_server
    await driver.close()
    assert not exists(fork_server)  # exited on the closed channel, and reaped


async def test_unusable_fork_server_falls_back_to_spawning_the_shim(tmp_path: Path) -> None:
    # An interpreter whose fork server dies at once, as a broken install would make it.
    python = write_script(
        tmp_path, "python.sh",
        f"""#!/bin/sh
        [ "$2" = "shipyard.agent.forkserver" ] && exit 3
        exec {PYTHON} "$@"
        """,
    )  # fmt: skip
    python.write_text("\n".join(line.strip() for line in python.read_text().splitlines()) + "\n")
    python.chmod(0o755)
    driver = ExecDriver(tmp_path / "agent", cgroups=CgroupSupport(False, "test"), python=str(python))
    try:
        allocs = [f"fallback-{n}-{RUN}" for n in range(FORK_SERVER_GIVE_UP + 1)]
        instances = [await driver.start(spec(alloc), {}) for alloc in allocs]
        for alloc, instance in zip(allocs, instances, strict=True):
            assert_matched(driver, instance, alloc)
            assert parent_of(instance.shim_pid) == os.getpid()  # spawned by us, not forked
        assert not driver.fork_server.usable
        assert (tmp_path / "agent" / "forkserver.log").exists()
        for instance in instances:
            assert (await instance.stop()).reason == "stopped"
    finally:
        await driver.close()
        stop_leftover_shims(tmp_path / "agent")


AGENT = """
import asyncio, json, sys
from shipyard.agent.drivers.exec import ExecDriver
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.task import TaskSpec

async def main():
    driver = ExecDriver(sys.argv[1], cgroups=CgroupSupport(False, "test"))
    instances = await asyncio.gather(*(
        driver.start(TaskSpec(service="web", alloc_id=alloc, cmd=sys.argv[3], stop_grace=1), {})
        for alloc in json.loads(sys.argv[2])
    ))
    print(json.dumps({"fork_server": driver.fork_server.pid, "pids": {i.alloc_id: i.pid for i in instances}}),
          flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_kill9_of_agent_ends_fork_server_and_leaves_instances_adoptable(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    allocs = [f"k9-{n}-{RUN}" for n in range(3)]
    script = write_script(tmp_path, "agent.py", AGENT)
    agent = subprocess.Popen([PYTHON, str(script), str(data_dir), json.dumps(allocs), SLEEPER], stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None
        started = json.loads(agent.stdout.readline())
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    try:
        # Its request channel closed with the agent: the fork server exits, the instances run on.
        await wait_until(lambda: not alive(started["fork_server"]), what="fork server to exit")
        assert all(alive(pid) for pid in started["pids"].values())
        driver = ExecDriver(data_dir, cgroups=CgroupSupport(False, "test"))
        report = await adopt_instances(driver, wanted=set(allocs))
        assert {i.alloc_id: i.pid for i in report.adopted} == started["pids"]
        records = [await i.stop() for i in report.adopted]
        assert all(r.reason == "stopped" for r in records)
        assert not any(alive(pid) for pid in started["pids"].values())
        await driver.close()
    finally:
        stop_leftover_shims(data_dir)
