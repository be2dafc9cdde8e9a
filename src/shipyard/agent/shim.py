"""The per-instance shim process: parent and subreaper of one instance, writer of its logs, its stopper.

It outlives the server on purpose (so `kill -9` of the server leaves every instance managed); it must never
decide whether the instance should run, it only runs, logs, limits, stops and reports it.

Run as `python -m shipyard.agent.shim LAUNCH.json`. On start it prints one JSON handshake line on stdout.
SIGTERM asks it to stop the instance: SIGTERM to the instance's group and every descendant, SIGKILL after
stop_grace, reap, write exit.json, exit. When the instance exits by itself the same sweep cleans up what it
left behind. Being a subreaper (PR_SET_CHILD_SUBREAPER) means grandchildren that double-fork or setsid away
from the group are re-parented to the shim, so they are found, killed and reaped rather than orphaned.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shipyard.agent.limits import (
    cgroup_oom_killed,
    descendant_pids,
    instance_pids,
    kill_cgroup,
    remove_instance_cgroup,
    rss_bytes,
)
from shipyard.agent.logfiles import LineTail, RotatingLogFile, TimelineWriter
from shipyard.agent.state import ExitRecord, InstanceState, proc_start_time, write_json_atomic

PR_SET_CHILD_SUBREAPER = 36
STDERR_TAIL_LINES = 20

RUNNING, TERMINATING, KILLING = "running", "terminating", "killing"


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _signal_all(pids: set[int], pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _read_secret_env(launch: dict[str, Any]) -> dict[str, str]:
    """The instance's secret env, sent by the agent over a pipe on our stdin (never in the launch file); kept in
    this process's memory only, for the one start it makes."""
    if not launch.get("secret_env"):
        return {}
    chunks = []
    while chunk := os.read(0, 65536):
        chunks.append(chunk)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    data = json.loads(b"".join(chunks) or b"{}")
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _start_error(launch: dict[str, Any], exc: BaseException) -> str:
    if launch.get("cwd") and not os.path.isdir(launch["cwd"]):  # Popen would blame the program for a lost cwd
        return f"cannot start: its working directory {launch['cwd']} is gone"
    return f"cannot start {launch['argv'][0]!r}: {getattr(exc, 'strerror', None) or exc}"


class ShimRun:
    """One run of one instance, from spawn to exit record."""

    def __init__(self, launch: dict[str, Any]) -> None:
        self.launch = launch
        self.stop_requested = False
        self.phase = RUNNING
        self.kill_deadline: float | None = None
        self.kill_reason: str | None = None
        self.child_status: int | None = None
        self.tail = LineTail(STDERR_TAIL_LINES)
        self.cgroup = Path(launch["cgroup"]) if launch.get("cgroup") else None
        self.timeline: TimelineWriter | None = None

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _handshake(self, data: dict[str, Any]) -> None:
        try:
            os.write(1, json.dumps(data).encode() + b"\n")
        except OSError:
            pass  # the agent went away; the instance is still ours to run
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def _join_cgroup(self) -> None:
        # Runs in the child between fork and exec, so the instance never runs a single instruction outside it.
        assert self.cgroup is not None
        with open(self.cgroup / "cgroup.procs", "w") as fh:
            fh.write(str(os.getpid()))

    def _write_exit(self, record: ExitRecord) -> None:
        write_json_atomic(Path(self.launch["exit_file"]), record.to_dict())

    def _open_logs(self) -> tuple[RotatingLogFile, RotatingLogFile]:
        launch, logs = self.launch, self.launch["logs"]
        if launch.get("timeline_log"):  # launches written before the timeline existed have none
            self.timeline = TimelineWriter(
                RotatingLogFile(Path(launch["timeline_log"]), 2 * logs["max_bytes"], logs["max_files"]))
        return (RotatingLogFile(Path(launch["stdout_log"]), logs["max_bytes"], logs["max_files"]),
                RotatingLogFile(Path(launch["stderr_log"]), logs["max_bytes"], logs["max_files"]))

    def _close_timeline(self, last_stderr: bytes = b"") -> None:
        if self.timeline is not None:
            if last_stderr:
                self.timeline.feed(b"e", last_stderr)
            self.timeline.close()

    def run(self) -> int:
        launch = self.launch
        _set_subreaper()
        wake_r, wake_w = os.pipe()
        _nonblocking(wake_r)
        _nonblocking(wake_w)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD wakes the select loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

        out_log, err_log = self._open_logs()
        try:
            env = {**_read_secret_env(launch), **launch["env"]}  # as instance_env(): the secret env lies under the rest
            proc = subprocess.Popen(
                launch["argv"],
                env=env,
                cwd=launch["cwd"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=self._join_cgroup if self.cgroup else None,
                umask=launch.get("umask", -1),  # the operator's, not the server's private one
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            message = _start_error(launch, exc)
            err_log.write(message.encode() + b"\n")
            self._close_timeline(message.encode() + b"\n")
            self._write_exit(ExitRecord(127, None, "start failed", [message], time.time()))
            self._handshake({"ok": False, "error": message})
            if self.cgroup:
                remove_instance_cgroup(self.cgroup)
            return 0

        pid = pgid = proc.pid
        start_time = proc_start_time(pid) or 0
        state = InstanceState(
            alloc_id=launch["alloc_id"],
            service=launch["service"],
            instance=launch["instance"],
            shim_pid=os.getpid(),
            shim_start_time=proc_start_time(os.getpid()) or 0,
            pid=pid,
            pgid=pgid,
            start_time=start_time,
            started_at=time.time(),
            ports=launch["ports"],
            stdout_log=launch["stdout_log"],
            stderr_log=launch["stderr_log"],
            cgroup=launch.get("cgroup"),
            spec=launch["spec"],
        )
        write_json_atomic(Path(launch["state_file"]), state.to_dict())
        self._handshake({"ok": True, "pid": pid, "start_time": start_time})

        assert proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): out_log, proc.stderr.fileno(): err_log}
        selector = selectors.DefaultSelector()
        selector.register(wake_r, selectors.EVENT_READ)
        for fd in streams:
            _nonblocking(fd)
            selector.register(fd, selectors.EVENT_READ)

        memory_limit = launch.get("memory_limit_bytes")
        poll_interval = float(launch.get("poll_interval", 0.5))
        next_memory_check = 0.0
        while True:
            now = time.monotonic()
            timeout = poll_interval if memory_limit else 1.0
            if self.phase != RUNNING:
                timeout = min(timeout, 0.1)
            for key, _ in selector.select(timeout):
                if key.fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._pump(key.fd, streams, selector)
            self._reap(pid)
            now = time.monotonic()

            if self.phase == RUNNING:
                if self.stop_requested:
                    self._terminate(pid, pgid, "stopped")
                elif self.child_status is not None:
                    self._terminate(pid, pgid, None)
                elif memory_limit and now >= next_memory_check:
                    next_memory_check = now + poll_interval
                    # The shim is the instance's subreaper: every process of it is a descendant.
                    used = rss_bytes(descendant_pids(os.getpid()))
                    if used > memory_limit:
                        mb = 1024 * 1024
                        self.kill_reason = f"memory limit exceeded: RSS {used // mb} MB > {memory_limit // mb} MB"
                        self._kill(pgid)
            elif self.phase == TERMINATING and self.kill_deadline is not None and now >= self.kill_deadline:
                self._kill(pgid)

            if self.phase != RUNNING:
                remaining = instance_pids(os.getpid(), pgid)
                if self.child_status is not None and not remaining:
                    break
                if self.phase == KILLING and remaining:
                    _signal_all(remaining, pgid, signal.SIGKILL)  # catches anything forked mid-sweep

        # Everything left is a zombie now (killed processes re-parented to us); reap them all, or they would
        # be handed to init when we exit, and not every init reaps.
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        for fd in list(streams):
            self._drain(fd, streams, selector)
        out_log.close()
        err_log.close()
        self._close_timeline()
        self._write_exit(self._exit_record())
        if self.cgroup:
            remove_instance_cgroup(self.cgroup)
        return 0

    def _pump(self, fd: int, streams: dict[int, RotatingLogFile], selector: selectors.BaseSelector) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            selector.unregister(fd)
            os.close(fd)
            del streams[fd]
            return
        streams[fd].write(data)
        is_stderr = streams[fd].path.name == Path(self.launch["stderr_log"]).name
        if is_stderr:
            self.tail.feed(data)
        if self.timeline is not None:
            self.timeline.feed(b"e" if is_stderr else b"o", data)

    def _drain(self, fd: int, streams: dict[int, RotatingLogFile], selector: selectors.BaseSelector) -> None:
        # Every writer is gone by now, so reads end in EOF promptly.
        while fd in streams:
            try:
                self._pump(fd, streams, selector)
            except OSError:
                selector.unregister(fd)
                os.close(fd)
                del streams[fd]

    def _reap(self, pid: int) -> None:
        while True:
            try:
                reaped, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped == 0:
                return
            if reaped == pid:
                self.child_status = status

    def _terminate(self, pid: int, pgid: int, reason: str | None) -> None:
        self.phase = TERMINATING
        if reason and not self.kill_reason:
            self.kill_reason = reason
        self.kill_deadline = time.monotonic() + float(self.launch["stop_grace"])
        _signal_all(instance_pids(os.getpid(), pgid), pgid, signal.SIGTERM)

    def _kill(self, pgid: int) -> None:
        self.phase = KILLING
        if self.cgroup:
            kill_cgroup(self.cgroup)
        _signal_all(instance_pids(os.getpid(), pgid), pgid, signal.SIGKILL)

    def _exit_record(self) -> ExitRecord:
        status = self.child_status if self.child_status is not None else 0
        code = os.waitstatus_to_exitcode(status)
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        reason = self.kill_reason
        if self.cgroup and cgroup_oom_killed(self.cgroup):
            reason = "out of memory (cgroup memory.max)"
        if reason is None:
            reason = "exited" if sig is None else "killed by signal"
        return ExitRecord(exit_code, sig, reason, self.tail.snapshot(), time.time())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    launch = json.loads(Path(args[0]).read_bytes())
    sys.exit(ShimRun(launch).run())


if __name__ == "__main__":
    main()
