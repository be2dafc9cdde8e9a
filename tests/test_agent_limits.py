"""Memory limits against real processes: cgroup v2 where this host allows it, RSS polling everywhere."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent_support import PYTHON, exists, wait_until, write_script
from shipyard.agent.drivers.exec import ExecDriver
from shipyard.agent.limits import CgroupSupport, detect_cgroup_support, instance_pids, rss_bytes
from shipyard.agent.supervisor import Supervisor
from shipyard.agent.task import RestartPolicy, TaskSpec

HOG = """
import sys, time
chunks = []
for i in range(40):                      # up to 400 MB, 10 MB at a time, touched so it is resident
    chunks.append(b"x" * (10 * 1024 * 1024))
    print(f"{(i + 1) * 10} MB", flush=True)
    time.sleep(0.05)
print("survived", flush=True)
time.sleep(60)
"""


def test_detection_gives_a_reason_when_unavailable() -> None:
    support = detect_cgroup_support()
    assert isinstance(support.available, bool) and support.reason
    note = support.describe(memory=True, cpu=True)
    if support.available:
        assert note.startswith("memory: cgroup v2")
    else:
        assert "memory: RSS polling" in note and "cpu: not enforced" in note and support.reason in note
    assert support.describe(memory=False, cpu=False) == ""


async def test_rss_polling_kills_instance_over_its_memory_limit(tmp_path: Path) -> None:
    driver = ExecDriver(
        tmp_path / "agent", cgroups=CgroupSupport(False, "forced off by the test"), memory_poll_interval=0.05
    )
    script = write_script(tmp_path, "hog.py", HOG)
    spec = TaskSpec(service="hog", alloc_id="hog", args=(PYTHON, str(script)), memory_mb=60)
    instance = await driver.start(spec, {})
    record = await instance.wait()
    assert record.signal == signal.SIGKILL
    assert record.reason.startswith("memory limit exceeded: RSS"), record
    assert "> 60 MB" in record.reason
    assert "survived" not in instance.stdout_log.read_text()
    assert not exists(instance.pid)


async def test_supervised_instance_over_limit_is_restarted_and_says_why(tmp_path: Path) -> None:
    driver = ExecDriver(
        tmp_path / "agent", cgroups=CgroupSupport(False, "forced off by the test"), memory_poll_interval=0.05
    )
    script = write_script(tmp_path, "hog.py", HOG)
    spec = TaskSpec(
        service="hog", alloc_id="hog2", args=(PYTHON, str(script)), memory_mb=60, cpus=0.5,
        restart=RestartPolicy(initial=5, factor=2, max=10, reset_after=60),
    )  # fmt: skip
    supervisor = Supervisor(driver, spec, {})
    await supervisor.start()
    try:
        await wait_until(lambda: supervisor.status.restarts >= 1, what="a memory kill")
        status = supervisor.status
        assert status.last_exit is not None and status.last_exit.reason.startswith("memory limit exceeded")
        assert status.limits == "memory: RSS polling; cpu: not enforced; cgroup v2 unavailable: forced off by the test"
    finally:
        await supervisor.stop()


async def test_process_tree_rss_counts_children(tmp_path: Path) -> None:
    driver = ExecDriver(tmp_path / "agent", cgroups=CgroupSupport(False, "off"))
    spec = TaskSpec(service="s", alloc_id="tree", cmd="sleep 60 & sleep 60 & sleep 60", stop_grace=1)
    instance = await driver.start(spec, {})
    try:
        pids = await wait_until(lambda: (p := instance_pids(instance.shim_pid, instance.pgid)) and len(p) >= 3 and p,
                                what="three sleeps")  # fmt: skip
        assert instance.pid in pids
        assert rss_bytes(pids) > 0
    finally:
        await instance.stop()


async def test_cgroup_v2_memory_limit(tmp_path: Path) -> None:
    support = detect_cgroup_support(base_name="shipyard-test")
    if not support.available:
        pytest.skip(f"cgroup v2 with a writable memory controller is not available here: {support.reason}")
    driver = ExecDriver(tmp_path / "agent", cgroups=support)
    script = write_script(tmp_path, "hog.py", HOG)
    spec = TaskSpec(service="hog", alloc_id="cg-hog", args=(PYTHON, str(script)), memory_mb=60, cpus=0.5)
    instance = await driver.start(spec, {})
    assert support.base is not None
    cgroup = support.base / "cg-hog"
    assert (cgroup / "memory.max").read_text().strip() == str(60 * 1024 * 1024)
    record = await instance.wait()
    assert record.signal == signal.SIGKILL and record.reason.startswith("out of memory"), record
    assert not cgroup.exists()
