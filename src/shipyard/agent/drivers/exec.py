"""The exec driver: runs an instance as a process group under a per-instance shim, and stops it.

It owns instance processes, their environment and their files; it must never decide placement or restarts.

Shims are forked by the driver's fork server (agent/forkserver.py: its docstring has the protocol), which saves
each instance an interpreter start-up; when the fork server is lost it is replaced, and when that keeps failing
the shim is spawned as `python -m shipyard.agent.shim` instead, so a start never fails because of it.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
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
    TIMELINE_LOG,
    ExitRecord,
    InstanceState,
    is_same_live_process,
    proc_stat,
    read_json,
    write_json_atomic,
)
from shipyard.agent.task import TaskSpec
from shipyard.agent.usage import Usage, UsageMeter
from shipyard.errors import Conflict, ShipyardError
from shipyard.private_files import operator_umask

INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
HANDSHAKE_TIMEOUT = 30.0
# How long past stop_grace we trust the shim before killing the instance's group ourselves.
SHIM_STOP_MARGIN = 5.0
# Tries through the fork server per start (a lost one is replaced in between) before spawning the shim directly.
FORK_SERVER_ATTEMPTS = 2
# Consecutive fork servers lost before launching a single shim: something is wrong with them, stop using one.
FORK_SERVER_GIVE_UP = 3
FORK_SERVER_LOG = "forkserver.log"
# A forked shim is reaped by the fork server, a moment after we see it exit; how long we wait to see it gone.
REAP_WAIT = 1.0

log = logging.getLogger("shipyard.agent")


class InstanceStartError(ShipyardError):
    """The instance's command could not be started (missing binary, bad workdir, shim failure)."""

    status = 500


@dataclass(frozen=True)
class HealthCommandResult:
    ok: bool
    exit_code: int | None
    output: str


def instance_env(spec: TaskSpec, ports: dict[str, int], *, secrets: bool = True) -> dict[str, str]:
    """The instance's environment: its secret env (unless `secrets` is False: what may be written to its launch
    file; the shim adds it under the rest, the same way), a few host basics, the spec's env, then the platform's
    variables.

    Platform variables win over the spec's env so that what the instance binds is what the registry announces.
    """
    env = dict(spec.secret_env) if secrets else {}
    env.update({name: os.environ[name] for name in INHERITED_ENV if name in os.environ})
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(spec.env)
    for index, (name, port) in enumerate(ports.items()):
        if index == 0:
            env["PORT"] = str(port)
        env[f"PORT{index}"] = str(port)
        env["PORT_" + "".join(c if c.isalnum() else "_" for c in name.upper())] = str(port)
    # The node's address (an agent's --advertise, a server's --bind): where the catalog says the instance is.
    env["HOST"] = spec.env.get("SHIPYARD_NODE_ADDRESS") or "127.0.0.1"
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
        loop.add_reader(fd, lambda: None if exited.done() else exited.set_result(None))
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


async def wait_until_reaped(pid: int, start_time: int | None, timeout: float = REAP_WAIT) -> None:
    """After `pid` exited: wait (briefly, bounded) until its parent has reaped it, so no caller sees a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = proc_stat(pid)
        if stat is None or (start_time is not None and stat[3] != start_time):
            return
        await asyncio.sleep(0.005)


class ExecInstance:
    """A running instance: its shim, process group and files. Started by ExecDriver.start or adopted."""

    def __init__(
        self,
        driver: ExecDriver,
        state: InstanceState,
        process: asyncio.subprocess.Process | None = None,
        *,
        adopted: bool | None = None,
    ) -> None:
        self.driver = driver
        self.state = state
        # A shim from our fork server is not our child either, but it is ours, not adopted.
        self.adopted = process is None if adopted is None else adopted
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
            # The operator's umask, not the server's private one (uvloop's subprocess has no umask argument).
            "/bin/sh", "-c", f"umask {operator_umask():04o}; {self.spec.health_cmd}",
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
                if not self.adopted:
                    await wait_until_reaped(self.state.shim_pid, self.state.shim_start_time)
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
    """Starts instances under shims in `<data_dir>/instances/<alloc_id>/`; one live instance per alloc id.
    Implements drivers/base.py's TaskDriver (checked by mypy below)."""

    name = "exec"

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
        self.fork_server = ShimForkServer(python, self.data_dir)
        self.meter = UsageMeter()  # each running instance's previous reading, which stats() measures CPU against

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
            "env": instance_env(spec, ports, secrets=False),
            "secret_env": bool(spec.secret_env),  # the shim reads it from its stdin: never in this file
            "cwd": spec.workdir or str(directory),
            "ports": ports,
            "stop_grace": spec.stop_grace,
            "logs": {"max_bytes": spec.logs.max_bytes, "max_files": spec.logs.max_files},
            "stdout_log": str(directory / STDOUT_LOG),
            "stderr_log": str(directory / STDERR_LOG),
            "timeline_log": str(directory / TIMELINE_LOG),
            "state_file": str(directory / STATE_FILE),
            "exit_file": str(directory / EXIT_FILE),
            "memory_limit_bytes": None,
            "poll_interval": self.memory_poll_interval,
            "cgroup": None,
            "spec": spec.to_dict(),
            "umask": operator_umask(),  # the shim and its logs stay private; the instance gets the operator's umask
        }
        shim_log = await asyncio.to_thread(self._prepare_run, spec, directory, launch)
        try:
            secret_fd, secret_writer = _secret_pipe(spec)
            try:
                launched = await self._launch_shim(spec.alloc_id, directory, launch_path, shim_log, secret_fd)
            finally:
                if secret_fd is not None:
                    os.close(secret_fd)
        finally:
            shim_log.close()
        try:
            line = await asyncio.wait_for(launched.reader.readline(), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            await launched.kill()
            raise InstanceStartError(f"shim for {spec.alloc_id} did not start within {HANDSHAKE_TIMEOUT:g}s") from None
        finally:
            launched.close()
            if secret_writer is not None:
                await secret_writer
        handshake = _parse_handshake(line)
        if not handshake.get("ok"):
            await launched.wait()
            shim_errors = await read_tail(directory / SHIM_LOG, 5)
            raise InstanceStartError(handshake.get("error") or "shim failed: " + " | ".join(shim_errors))
        data = await asyncio.to_thread(read_json, directory / STATE_FILE)
        if data is None:
            raise InstanceStartError(f"shim for {spec.alloc_id} wrote no state file")
        instance = ExecInstance(self, InstanceState.from_dict(data), launched.process, adopted=False)
        instance.spec = spec  # with its secret env (the state file's copy has none), for health commands
        self.running[spec.alloc_id] = instance
        return instance

    async def close(self) -> None:
        """Let the fork server go (it exits; running shims and instances are not touched)."""
        await self.fork_server.close()

    # ---- the rest of the driver interface (drivers/base.py: TaskDriver) ------------------------------------------

    async def stop(self, instance: ExecInstance) -> ExitRecord:
        return await instance.stop()

    def signal(self, instance: ExecInstance, sig: int) -> None:
        instance.signal_group(sig)

    async def wait(self, instance: ExecInstance) -> ExitRecord:
        return await instance.wait()

    async def stats(self, instance: ExecInstance) -> Usage | None:
        """CPU and resident memory of the instance's process tree under its shim (agent/usage.py: read from /proc,
        off the loop); None once it has exited."""
        if not instance.running:
            return None
        state = instance.state
        return await asyncio.to_thread(self.meter.read, state.alloc_id, state.shim_pid, state.pid, state.start_time)

    def logs(self, alloc_id: str, stream: str) -> Path:
        if stream not in ("stdout", "stderr"):
            raise ShipyardError(f"stream must be stdout or stderr, not {stream!r}", status=400)
        return self.instance_dir(alloc_id) / (STDOUT_LOG if stream == "stdout" else STDERR_LOG)

    def adopt(self, state: InstanceState) -> ExecInstance:
        return self.attach(state)

    async def _launch_shim(self, alloc_id: str, directory: Path, launch_path: Path, shim_log: BinaryIO,
                           secret_fd: int | None = None) -> LaunchedShim:
        for _ in range(FORK_SERVER_ATTEMPTS):
            if not self.fork_server.usable:
                break
            try:
                return await self.fork_server.launch(launch_path, directory, shim_log.fileno(), secret_fd)
            except ForkServerLost as exc:
                log.warning("fork server could not launch the shim for %s: %s", alloc_id, exc)
        return await self._spawn_shim(directory, launch_path, shim_log, secret_fd)

    async def _spawn_shim(self, directory: Path, launch_path: Path, shim_log: BinaryIO,
                          secret_fd: int | None = None) -> LaunchedShim:
        """The way without a fork server: a fresh interpreter running the shim module."""
        process = await asyncio.create_subprocess_exec(
            self.python, "-m", "shipyard.agent.shim", str(launch_path),
            stdin=asyncio.subprocess.DEVNULL if secret_fd is None else secret_fd,
            stdout=asyncio.subprocess.PIPE,
            stderr=shim_log,
            start_new_session=True,  # the server's signals and terminal never reach the shim
            env=shim_environment(),
            cwd=str(directory),
        )  # fmt: skip
        assert process.stdout is not None
        return LaunchedShim(process.stdout, process=process)

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
            self.meter.forget(instance.alloc_id)


def shim_environment() -> dict[str, str]:
    """The server's environment, plus what it takes for a fresh interpreter to import this very package."""
    env = dict(os.environ)
    package_root = str(Path(shipyard.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


class ForkServerLost(Exception):
    """No shim was started for this request: the fork server is gone, stuck, or could not fork."""


class LaunchedShim:
    """A shim that exists and is about to send its handshake line: our child, or the fork server's."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        process: asyncio.subprocess.Process | None = None,
        writer: asyncio.StreamWriter | None = None,
        shim_pid: int = 0,
        shim_start_time: int | None = None,
    ) -> None:
        self.reader = reader
        self.process = process
        self._writer = writer
        self.shim_pid = process.pid if process is not None else shim_pid
        self.shim_start_time = shim_start_time

    async def wait(self) -> None:
        if self.process is not None:
            await self.process.wait()
        else:
            await wait_for_pid_exit(self.shim_pid, self.shim_start_time)

    async def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
        elif is_same_live_process(self.shim_pid, self.shim_start_time):
            os.kill(self.shim_pid, signal.SIGKILL)
        await self.wait()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class ShimForkServer:
    """The driver's handle on its fork server (agent/forkserver.py): started on first use, replaced when lost.

    It is started with a fresh interpreter (close_fds, own session), so it holds neither the server's memory nor
    its descriptors. Its exit is watched with a pidfd, so it is reaped at once whenever it dies.
    """

    def __init__(self, python: str, data_dir: Path) -> None:
        self.python = python
        self.data_dir = data_dir
        self.generation = 0
        self.lost_in_a_row = 0  # consecutive generations lost before they launched anything
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._pidfd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._launched = False
        self._lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()

    @property
    def usable(self) -> bool:
        return self.lost_in_a_row < FORK_SERVER_GIVE_UP

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def launch(self, launch_path: Path, cwd: Path, shim_log_fd: int,
                     secret_fd: int | None = None) -> LaunchedShim:
        """Have a shim forked for `launch_path`; returns once it exists. Raises ForkServerLost if none was.
        `secret_fd` (the read end of the instance's secret env pipe) becomes the shim's stdin."""
        channel, generation = await self._ensure_running()
        ours, theirs = socket.socketpair()
        try:
            request = json.dumps({"launch": str(launch_path), "cwd": str(cwd)}).encode()
            try:
                fds = [theirs.fileno(), shim_log_fd] + ([] if secret_fd is None else [secret_fd])
                await self._send(channel, request, fds)
            except OSError as exc:
                await self._replace(generation)
                raise ForkServerLost(f"request not delivered: {exc}") from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # from now on only the fork server or its child hold the other end
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            writer.close()
            await self._replace(generation)
            raise ForkServerLost(f"no answer within {HANDSHAKE_TIMEOUT:g}s") from None
        except BaseException:
            writer.close()
            raise
        data = _parse_handshake(line)
        if not isinstance(data.get("shim_pid"), int):
            writer.close()
            if not line:  # EOF before a child existed: the fork server died with our request
                await self._replace(generation)
                raise ForkServerLost("the fork server exited")
            raise ForkServerLost(str(data.get("error") or "unexpected answer"))
        self._launched = True
        self.lost_in_a_row = 0
        return LaunchedShim(
            reader, writer=writer, shim_pid=data["shim_pid"], shim_start_time=data.get("shim_start_time")
        )

    async def close(self) -> None:
        """Close the request channel (the fork server exits by itself) and reap it."""
        process = self._process
        self._forget()
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def _ensure_running(self) -> tuple[socket.socket, int]:
        async with self._lock:
            if self._channel is not None and self._process is not None and self._process.poll() is None:
                return self._channel, self.generation
            if self._channel is not None:
                self._lost()
            try:
                await self._start()
            except OSError as exc:
                self.lost_in_a_row += 1
                raise ForkServerLost(f"cannot start: {exc}") from None
            assert self._channel is not None
            return self._channel, self.generation

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await asyncio.to_thread(self._popen, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._channel = ours
        self._launched = False
        self.generation += 1
        try:
            self._pidfd = os.pidfd_open(self._process.pid)
        except OSError:
            return  # reaped on the next launch or at close instead
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._pidfd, self._on_exit, self.generation)

    def _popen(self, channel: socket.socket) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / FORK_SERVER_LOG, "ab") as errors:
            return subprocess.Popen(
                [self.python, "-m", "shipyard.agent.forkserver"],
                stdin=channel.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=errors,
                close_fds=True,
                start_new_session=True,  # the server's signals and terminal never reach it, nor its shims
                env=shim_environment(),
                cwd=str(self.data_dir),
            )

    def _on_exit(self, generation: int) -> None:
        if generation == self.generation:
            self._lost()

    async def _replace(self, generation: int) -> None:
        """A request to `generation` failed: make sure the next one goes to a fresh fork server."""
        async with self._lock:
            if generation == self.generation and self._channel is not None:
                self._lost()

    def _lost(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # stuck rather than dead: its children (shims) are in their own sessions, unharmed
            process.wait()
        self.lost_in_a_row = 0 if self._launched else self.lost_in_a_row + 1
        if process is not None:
            log.warning("shim fork server (pid %d) lost with exit status %s; starting another on next use",
                        process.pid, process.returncode)  # fmt: skip
        self._forget()

    def _forget(self) -> None:
        if self._pidfd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._process is not None:
            self._process.poll()
            self._process = None

    async def _send(self, channel: socket.socket, data: bytes, fds: list[int]) -> None:
        # One sender at a time: add_writer keeps one callback per fd, so concurrent waiters would lose wake-ups.
        async with self._send_lock:
            loop = asyncio.get_running_loop()
            while True:
                try:
                    channel.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    return
                except BlockingIOError:
                    pass
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(channel.fileno(), _resolve, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(channel.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _parse_handshake(line: bytes) -> dict:
    try:
        data = json.loads(line)
    except ValueError:
        return {"ok": False}
    return data if isinstance(data, dict) else {"ok": False}


def _secret_pipe(spec: TaskSpec) -> tuple[int | None, asyncio.Future[None] | None]:
    """The instance's secret env for its shim, through a pipe (its read end, and the write under way in a thread):
    in memory only, never in a file. A pipe holds 64 KiB, so the write runs while the shim starts and reads it."""
    if not spec.secret_env:
        return None, None
    payload = json.dumps({k: v for k, v in spec.secret_env.items() if k not in spec.env}).encode()
    read_fd, write_fd = os.pipe()
    return read_fd, asyncio.ensure_future(asyncio.to_thread(_write_and_close, write_fd, payload))


def _write_and_close(fd: int, payload: bytes) -> None:
    try:
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(payload)
    except BrokenPipeError:
        pass  # the shim failed before reading: its handshake says why


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


if TYPE_CHECKING:
    from shipyard.agent.drivers.base import TaskDriver

    def _implements_task_driver(driver: ExecDriver) -> TaskDriver[ExecInstance]:
        return driver  # mypy checks ExecDriver against the TaskDriver protocol here
