"""The exec driver against real processes: environment, logs, stop semantics, exit records, no orphans."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from agent_support import PYTHON, alive, exists, read_pid_file, wait_until, write_script
from shipyard.agent.drivers.exec import ExecDriver, InstanceStartError
from shipyard.agent.limits import CgroupSupport
from shipyard.agent.ports import PortAllocator
from shipyard.agent.task import LogLimits, TaskSpec
from shipyard.errors import Conflict


@pytest.fixture
def driver(tmp_path: Path) -> ExecDriver:
    return ExecDriver(tmp_path / "agent", cgroups=CgroupSupport(False, "not needed by these tests"))


async def test_environment_has_ports_identity_and_spec_env(driver: ExecDriver, tmp_path: Path) -> None:
    script = write_script(
        tmp_path, "env.py",
        """
        import json, os
        print(json.dumps(dict(os.environ)), flush=True)
        """,
    )  # fmt: skip
    spec = TaskSpec(
        service="web", alloc_id="alloc-env", instance=2, args=(PYTHON, str(script)),
        env={"GREETING": "hello", "PORT": "1"}, ports=("http", "admin-api"),
    )  # fmt: skip
    ports = PortAllocator().allocate(spec.port_names)
    instance = await driver.start(spec, ports)
    record = await instance.wait()
    assert record.exit_code == 0, record
    env = json.loads(instance.stdout_log.read_text())
    http, admin = ports["http"], ports["admin-api"]
    assert http != admin
    assert env["PORT"] == str(http)  # the platform's PORT wins over the spec's
    assert env["PORT0"] == str(http) and env["PORT1"] == str(admin)
    assert env["PORT_HTTP"] == str(http) and env["PORT_ADMIN_API"] == str(admin)
    assert env["HOST"] == "127.0.0.1"
    assert env["SHIPYARD_SERVICE"] == "web"
    assert env["SHIPYARD_ALLOC_ID"] == "alloc-env"
    assert env["SHIPYARD_INSTANCE"] == "2"
    assert env["GREETING"] == "hello"
    assert "PYTHONPATH" not in env or env["PYTHONPATH"] == os.environ.get("PYTHONPATH")


async def test_own_process_group_and_session(driver: ExecDriver) -> None:
    spec = TaskSpec(service="s", alloc_id="pg", args=("sleep", "30"), stop_grace=2)
    instance = await driver.start(spec, {})
    try:
        assert os.getpgid(instance.pid) == instance.pid == instance.pgid
        assert os.getsid(instance.pid) == instance.pid
        assert os.getpgid(instance.pid) != os.getpgid(0)
        assert instance.shim_pid != os.getpid()
        with pytest.raises(Conflict):
            await driver.start(spec, {})  # one live instance per alloc id
    finally:
        record = await instance.stop()
    assert record.signal == signal.SIGTERM and record.reason == "stopped"
    assert not exists(instance.pid) and not exists(instance.shim_pid)  # reaped, not zombies


async def test_exit_code_and_last_stderr_lines(driver: ExecDriver) -> None:
    spec = TaskSpec(
        service="s", alloc_id="fail",
        cmd="for i in $(seq 1 40); do echo line $i >&2; done; echo out; printf 'no newline' >&2; exit 3",
    )  # fmt: skip
    instance = await driver.start(spec, {})
    record = await instance.wait()
    assert record.exit_code == 3 and record.signal is None
    assert record.reason == "exited"
    assert record.stderr_tail[-1] == "no newline"
    assert record.stderr_tail[-2] == "line 40"
    assert len(record.stderr_tail) == 20
    assert instance.stdout_log.read_text() == "out\n"
    assert (await instance.stderr_tail(2)) == ["line 40", "no newline"]


async def test_start_failure_is_reported(driver: ExecDriver, tmp_path: Path) -> None:
    with pytest.raises(InstanceStartError, match="such-binary"):
        await driver.start(TaskSpec(service="s", alloc_id="nobin", args=("/no/such-binary",)), {})
    with pytest.raises(InstanceStartError):
        await driver.start(TaskSpec(service="s", alloc_id="nodir", args=("true",), workdir=str(tmp_path / "no")), {})
    assert driver.running == {}


async def test_logs_rotate_by_size_and_count(driver: ExecDriver) -> None:
    # 300 numbered lines of 100 bytes = 30 kB through 4 kB files, 3 kept: the newest ~12 kB survive, in order.
    spec = TaskSpec(
        service="s", alloc_id="logs", logs=LogLimits(max_bytes=4096, max_files=3),
        args=(PYTHON, "-c", "import sys\nfor i in range(300): sys.stdout.write(f'{i:05d}' + 'x' * 94 + '\\n')"),
    )  # fmt: skip
    instance = await driver.start(spec, {})
    assert (await instance.wait()).exit_code == 0
    log = instance.stdout_log
    files = sorted(p.name for p in log.parent.glob("stdout.log*"))
    assert files == ["stdout.log", "stdout.log.1", "stdout.log.2"]
    for name in files:
        size = (log.parent / name).stat().st_size
        assert 0 < size <= 4096
    text = "".join((log.parent / n).read_text() for n in ["stdout.log.2", "stdout.log.1", "stdout.log"])
    numbers = [int(line[:5]) for line in text.splitlines()]
    assert numbers == list(range(numbers[0], 300))  # contiguous, newest kept, no line split
    assert len(numbers) >= 100


async def test_stop_kills_grandchild_ignoring_sigterm_and_one_that_left_the_group(
    driver: ExecDriver, tmp_path: Path
) -> None:
    script = write_script(
        tmp_path, "family.py",
        """
        import os, signal, sys, time
        here = sys.argv[1]
        if os.fork() == 0:                      # grandchild 1: stays in the group, ignores SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open(here + "/stubborn.pid", "w").write(str(os.getpid()))
            while True: time.sleep(1)
        if os.fork() == 0:                      # grandchild 2: new session, then double-fork away from us
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                open(here + "/escaped.pid", "w").write(str(os.getpid()))
                while True: time.sleep(1)
            os._exit(0)
        while True: time.sleep(1)
        """,
    )  # fmt: skip
    spec = TaskSpec(service="s", alloc_id="family", args=(PYTHON, str(script), str(tmp_path)), stop_grace=0.5)
    instance = await driver.start(spec, {})
    stubborn = await wait_until(lambda: read_pid_file(tmp_path / "stubborn.pid"), what="grandchild 1")
    escaped = await wait_until(lambda: read_pid_file(tmp_path / "escaped.pid"), what="grandchild 2")
    assert os.getpgid(stubborn) == instance.pgid
    assert os.getpgid(escaped) != instance.pgid
    # The escaped one was re-parented to the shim (subreaper), not to init.
    await wait_until(lambda: open(f"/proc/{escaped}/stat").read().rsplit(")", 1)[1].split()[1] == str(
        instance.shim_pid), what="re-parenting to the shim")  # fmt: skip
    record = await instance.stop()
    assert record.signal == signal.SIGTERM  # the main process obeyed SIGTERM
    for pid in (instance.pid, stubborn, escaped, instance.shim_pid):
        assert not exists(pid), f"pid {pid} survived the stop (or is a zombie)"


async def test_sigkill_after_grace_for_child_ignoring_sigterm(driver: ExecDriver, tmp_path: Path) -> None:
    script = write_script(
        tmp_path, "stubborn.py",
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True: time.sleep(1)
        """,
    )  # fmt: skip
    spec = TaskSpec(service="s", alloc_id="stubborn", args=(PYTHON, str(script)), stop_grace=0.5)
    instance = await driver.start(spec, {})
    await wait_until(lambda: instance.stdout_log.read_text() == "ready\n", what="handler installed")
    began = time.monotonic()
    record = await instance.stop()
    took = time.monotonic() - began
    assert record.signal == signal.SIGKILL and record.reason == "stopped"
    assert 0.5 <= took < 10  # not before the grace period, and not forever
    assert not exists(instance.pid)


async def test_leftovers_are_cleaned_when_main_process_exits(driver: ExecDriver, tmp_path: Path) -> None:
    spec = TaskSpec(
        service="s", alloc_id="leftover", stop_grace=0.3,
        cmd=f"(trap '' TERM; sleep 60) & echo $! > {tmp_path}/bg.pid; exit 7",
    )  # fmt: skip
    instance = await driver.start(spec, {})
    record = await instance.wait()
    assert record.exit_code == 7
    background = read_pid_file(tmp_path / "bg.pid")
    assert background is not None and not alive(background)


async def test_health_command_runs_with_instance_env(driver: ExecDriver) -> None:
    spec = TaskSpec(
        service="s", alloc_id="health", args=("sleep", "30"), ports=("http",), stop_grace=1,
        health_cmd='test "$PORT" = "$PORT_HTTP" && echo "ok $SHIPYARD_ALLOC_ID"',
    )  # fmt: skip
    instance = await driver.start(spec, {"http": 23456})
    try:
        result = await instance.run_health_command(timeout=10)
        assert result.ok and result.output.strip() == "ok health"
    finally:
        await instance.stop()
