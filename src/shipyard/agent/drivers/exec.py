"""The exec driver: runs an instance as a process group under a per-instance shim, and stops it.

It owns instance processes, their environment and their files; it must never decide placement or restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import shipyard
from shipyard.agent.limits import CgroupSupport, create_instance_cgroup, detect_cgroup_support
from shipyard.agent.logfiles import read_tail
from shipyard.agent.state import (
    EXIT_FILE,
    LAUNCH_FILE,
    SHIM_LOG,
    STATE_FILE,
    STDERR_LOG,
    STDOUT_LOG,
    ExitRecord,
    InstanceState,
    is_same_live_process,
    read_json,
    write_json_atomic,
)
from shipyard.agent.task import TaskSpec
from shipyard.errors import Conflict, ShipyardError

INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
HANDSHAKE_TIMEOUT = 30.0
# How long past stop_grace we trust the shim before killing the instance's group ourselves.
SHIM_STOP_MARGIN = 5.0


class InstanceStartError(ShipyardError):
    """The instance's command could not be started (missing binary, bad workdir, shim failure)."""

    status = 500


@dataclass(frozen=True)
class HealthCommandResult:
    ok: bool
    exit_code: int | None
    output: str


def instance_env(spec: TaskSpec, ports: dict[str, int]) -> dict[str, str]:
    """The instance's environment: a few host basics, the spec's env, then the platform's variables.

    Platform variables win over the spec's env so that what the instance binds is what the registry announces.
    """
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(spec.env)
    for index, (name, port) in enumerate(ports.items()):
        if index == 0:
            env["PORT"] = str(port)
        env[f"PORT{index}"] = str(port)
        env["PORT_" + "".join(c if c.isalnum() else "_" for c in name.upper())] = str(port)
    env["HOST"] = "127.0.0.1"
    env["SHIPYARD_SERVICE"] = spec.service
    env["SHIPYARD_ALLOC_ID"] = spec.alloc_id
    env["SHIPYARD_INSTANCE"] = str(spec.instance)
    return env


async def wait_for_pid_exit(pid: int, start_time: int | None) -> None:
    """Wait until a process that is not necessarily our child exits (pidfd; no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Checked after pidfd_open: the fd pins this exact process, so a reused pid cannot fool us later.
        if not is_same_live_process(pid, start_time):
            return
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if we happen to be its parent (a subreaper)
    except ChildProcessError:
        pass


class ExecInstance:
    """A running instance: its shim, process group and files. Started by ExecDriver.start or adopted."""

    def __init__(
        self, driver: ExecDriver, state: InstanceState, process: asyncio.subprocess.Process | None = None
    ) -> None:
        self.driver = driver
        self.state = state
        self.adopted = process is None
        self.spec = TaskSpec.from_dict(state.spec)
        self._process = process
        self._exit: asyncio.Future[ExitRecord] = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_shim())

    alloc_id = property(lambda self: self.state.alloc_id)
    pid = property(lambda self: self.state.pid)
    pgid = property(lambda self: self.state.pgid)
    shim_pid = property(lambda self: self.state.shim_pid)
    ports = property(lambda self: dict(self.state.ports))
    started_at = property(lambda self: self.state.started_at)
    stdout_log = property(lambda self: Path(self.state.stdout_log))
    stderr_log = property(lambda self: Path(self.state.stderr_log))

    @property
    def running(self) -> bool:
        return not self._exit.done()

    @property
    def exit_record(self) -> ExitRecord | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> ExitRecord:
        return await asyncio.shield(self._exit)

    async def stop(self) -> ExitRecord:
        """SIGTERM to the group and all descendants, SIGKILL after stop_grace, reap (done by the shim)."""
        if self._exit.done():
            return self._exit.result()
        if is_same_live_process(self.state.shim_pid, self.state.shim_start_time):
            try:
                os.kill(self.state.shim_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return await asyncio.wait_for(asyncio.shield(self._exit), self.spec.stop_grace + SHIM_STOP_MARGIN)
        except TimeoutError:
            # The shim is stuck (stopped with SIGSTOP, or worse): take the instance down without it.
            self._kill_group_directly()
            if is_same_live_process(self.state.shim_pid, self.state.shim_start_time):
                os.kill(self.state.shim_pid, signal.SIGKILL)
            return await asyncio.shield(self._exit)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the instance's process group (e.g. SIGHUP to reload); not a stop."""
        if self.running and is_same_live_process(self.state.pid, self.state.start_time):
            try:
                os.killpg(self.state.pgid, sig)
            except ProcessLookupError:
                pass

    async def stderr_tail(self, count: int = 20) -> list[str]:
        return await read_tail(self.stderr_log, count)

    async def run_health_command(self, timeout: float = 5.0) -> HealthCommandResult:
        """Run the spec's health command with the instance's environment; exit 0 within `timeout` is healthy."""
        if not self.spec.health_cmd:
            raise ValueError(f"instance {self.alloc_id} has no health command")
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", self.spec.health_cmd,
            env=instance_env(self.spec, self.ports),
            cwd=self.spec.workdir or str(self.driver.instance_dir(self.alloc_id)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            return HealthCommandResult(False, None, f"timed out after {timeout:g}s")
        return HealthCommandResult(proc.returncode == 0, proc.returncode, output.decode(errors="replace")[-4096:])

    def _kill_group_directly(self) -> None:
        if is_same_live_process(self.state.pid, self.state.start_time):
            try:
                os.killpg(self.state.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _watch_shim(self) -> None:
        try:
            if self._process is not None:
                await self._process.wait()
            else:
                await wait_for_pid_exit(self.state.shim_pid, self.state.shim_start_time)
            exit_file = self.driver.instance_dir(self.alloc_id) / EXIT_FILE
            data = await asyncio.to_thread(read_json, exit_file)
            if data is not None:
                record = ExitRecord.from_dict(data)
            else:
                # The shim died without reporting (SIGKILL): nothing manages the group now, so end it.
                self._kill_group_directly()
                tail = await read_tail(self.stderr_log, 20)
                record = ExitRecord(None, signal.SIGKILL, "shim lost; instance killed", tail, time.time())
        except Exception as exc:  # never leave waiters hanging
            record = ExitRecord(None, None, f"lost track of instance: {exc!r}", [], time.time())
        self.driver._forget_running(self)
        self._exit.set_result(record)


class ExecDriver:
    """Starts instances under shims in `<data_dir>/instances/<alloc_id>/`; one live instance per alloc id."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        cgroups: CgroupSupport | None = None,
        memory_poll_interval: float = 0.5,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.instances_dir = self.data_dir / "instances"
        self.cgroups = cgroups if cgroups is not None else detect_cgroup_support()
        self.memory_poll_interval = memory_poll_interval
        self.python = python
        self.running: dict[str, ExecInstance] = {}

    def instance_dir(self, alloc_id: str) -> Path:
        return self.instances_dir / quote(alloc_id, safe="")

    def limits_note(self, spec: TaskSpec) -> str:
        return self.cgroups.describe(memory=spec.memory_mb is not None, cpu=spec.cpus is not None)

    async def start(self, spec: TaskSpec, ports: dict[str, int]) -> ExecInstance:
        """Start one run of `spec`; returns once its process exists. Raises InstanceStartError if it cannot."""
        if spec.alloc_id in self.running:
            raise Conflict(f"instance {spec.alloc_id} is already running (pid {self.running[spec.alloc_id].pid})")
        directory = self.instance_dir(spec.alloc_id)
        launch_path = directory / LAUNCH_FILE
        launch = {
            "alloc_id": spec.alloc_id,
            "service": spec.service,
            "instance": spec.instance,
            "argv": spec.argv,
            "env": instance_env(spec, ports),
            "cwd": spec.workdir or str(directory),
            "ports": ports,
            "stop_grace": spec.stop_grace,
            "logs": {"max_bytes": spec.logs.max_bytes, "max_files": spec.logs.max_files},
            "stdout_log": str(directory / STDOUT_LOG),
            "stderr_log": str(directory / STDERR_LOG),
            "state_file": str(directory / STATE_FILE),
            "exit_file": str(directory / EXIT_FILE),
            "memory_limit_bytes": None,
            "poll_interval": self.memory_poll_interval,
            "cgroup": None,
            "spec": spec.to_dict(),
        }
        shim_log = await asyncio.to_thread(self._prepare_run, spec, directory, launch)
        env = dict(os.environ)
        # The shim must import this very package, however the server itself was put on sys.path.
        package_root = str(Path(shipyard.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            process = await asyncio.create_subprocess_exec(
                self.python, "-m", "shipyard.agent.shim", str(launch_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=shim_log,
                start_new_session=True,  # the server's signals and terminal never reach the shim
                env=env,
                cwd=str(directory),
            )  # fmt: skip
        finally:
            shim_log.close()
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise InstanceStartError(f"shim for {spec.alloc_id} did not start within {HANDSHAKE_TIMEOUT:g}s") from None
        handshake = _parse_handshake(line)
        if not handshake.get("ok"):
            await process.wait()
            shim_errors = await read_tail(directory / SHIM_LOG, 5)
            raise InstanceStartError(handshake.get("error") or "shim failed: " + " | ".join(shim_errors))
        data = await asyncio.to_thread(read_json, directory / STATE_FILE)
        if data is None:
            raise InstanceStartError(f"shim for {spec.alloc_id} wrote no state file")
        instance = ExecInstance(self, InstanceState.from_dict(data), process)
        self.running[spec.alloc_id] = instance
        return instance

    def attach(self, state: InstanceState) -> ExecInstance:
        """Take over a still-running instance from its state file (adoption); idempotent per alloc id."""
        existing = self.running.get(state.alloc_id)
        if existing is not None and existing.state.shim_pid == state.shim_pid:
            return existing
        if existing is not None:
            raise Conflict(f"instance {state.alloc_id} already runs under another shim (pid {existing.shim_pid})")
        instance = ExecInstance(self, state)
        self.running[state.alloc_id] = instance
        return instance

    async def forget(self, alloc_id: str) -> None:
        """Drop the state of an instance that is stopped for good (its logs stay)."""
        directory = self.instance_dir(alloc_id)
        for name in (STATE_FILE, LAUNCH_FILE, EXIT_FILE):
            await asyncio.to_thread(_unlink, directory / name)

    def _prepare_run(self, spec: TaskSpec, directory: Path, launch: dict) -> BinaryIO:
        directory.mkdir(parents=True, exist_ok=True)
        _unlink(directory / EXIT_FILE)
        _unlink(directory / STATE_FILE)
        if spec.memory_mb is not None or spec.cpus is not None:
            if self.cgroups.available:
                name = quote(spec.alloc_id, safe="").replace("%", "_")
                launch["cgroup"] = str(create_instance_cgroup(self.cgroups, name, spec.memory_mb, spec.cpus))
            elif spec.memory_mb is not None:
                launch["memory_limit_bytes"] = spec.memory_mb * 1024 * 1024
        write_json_atomic(directory / LAUNCH_FILE, launch)
        return open(directory / SHIM_LOG, "ab")

    def _forget_running(self, instance: ExecInstance) -> None:
        if self.running.get(instance.alloc_id) is instance:
            del self.running[instance.alloc_id]


def _parse_handshake(line: bytes) -> dict:
    try:
        data = json.loads(line)
    except ValueError:
        return {"ok": False}
    return data if isinstance(data, dict) else {"ok": False}


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
