"""The shim fork server: one long-lived process per ExecDriver that forks a ready shim per launch request.

It must never decide anything about an instance (it only forks `shim.main` for the launch file it is given), and it
must never outlive its request channel: when the driver's end closes, it exits and leaves running shims alone.

Why: a fresh `python -m shipyard.agent.shim` costs ~60 ms of CPU in interpreter start-up and imports, as much as a
small service. This process pays that once (it is started with a fresh interpreter, so it holds none of the
server's memory or descriptors) and then forks a child per launch, which runs exactly what the shim command runs.

Protocol. fd 0 is a SOCK_SEQPACKET unix socket to the driver. Each request is one message: a JSON object
{"launch": path, "cwd": dir} carrying two descriptors with SCM_RIGHTS: the write end of a socketpair made for this
one launch, and the shim log opened for appending. The child becomes a session leader (setsid), puts that socket
on its stdout and the log on its stderr, writes `{"shim_pid": N, "shim_start_time": T}` and then runs the shim,
whose own handshake line follows on the same socket; then it `_exit`s. A private socket per launch, rather than
one shared reply pipe, is what matches concurrent launches to their requests: nothing to demultiplex, no
interleaving, and no line-length limit. It also tells the driver what happened: EOF before the pid line means no
shim was started for that request (the fork server died or could not fork), so the driver may restart the fork
server and retry without risking a duplicate; EOF after it means the shim itself failed, as a spawned one could.

The fork server reaps its exited children on SIGCHLD (waitpid WNOHANG) so no shim is left a zombie. Shims are in
sessions of their own and are subreapers of their instances, so kill -9 of the fork server (or of the server)
changes nothing for them: they are re-parented to the nearest subreaper or init, as shims of a dead server are.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import shipyard.agent.shim as shim
from shipyard.agent.state import proc_start_time

MAX_REQUEST = 65536
FDS_PER_REQUEST = 2  # the reply socket and the shim log; a third, the secret env pipe, when the instance has one


def _reap_children(signum: int = 0, frame: object = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(channel: socket.socket) -> tuple[dict, list[int]] | None:
    """One request, or None when the driver closed its end."""
    fd_size = array.array("i").itemsize
    data, ancdata, _flags, _addr = channel.recvmsg(MAX_REQUEST, socket.CMSG_SPACE((FDS_PER_REQUEST + 1) * fd_size))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fds.extend(received)
    if not data and not fds:
        return None
    try:
        request = json.loads(data)
    except ValueError:
        request = None
    return (request if isinstance(request, dict) else {}), fds


def _say(fd: int, data: dict) -> None:
    try:
        os.write(fd, json.dumps(data).encode() + b"\n")
    except OSError:
        pass


def _retitle_as_shim() -> None:
    """Make ps and /proc/<pid>/cmdline show a forked shim as what it is, `python -m shipyard.agent.shim`.

    The argv area is inherited from the fork server's command line, which is longer; rewritten in place through
    /proc/self/mem (as setproctitle does). Where the kernel refuses that, the child keeps the fork server's title.
    """
    try:
        raw = Path("/proc/self/stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of stat
        title = b"\0".join([os.fsencode(sys.executable), b"-m", b"shipyard.agent.shim"]) + b"\0"
        if len(title) > end - start:
            return
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(title.ljust(end - start, b"\0"))
    except (OSError, ValueError, IndexError):
        pass


def _run_shim_in_child(request: dict, reply_fd: int, log_fd: int, secret_fd: int | None = None) -> int:
    """In the forked child: become what `python -m shipyard.agent.shim LAUNCH` would be, and run it (with the
    secret env pipe, when there is one, on stdin, as a spawned shim has it)."""
    os.setsid()
    # The dispositions a fresh interpreter has (SIGPIPE stays ignored, as Python sets it; Popen restores it).
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull if secret_fd is None else secret_fd, 0)  # also drops our copy of the request channel
    os.dup2(reply_fd, 1)
    os.dup2(log_fd, 2)
    for fd in {devnull, reply_fd, log_fd, secret_fd or devnull} - {0, 1, 2}:
        os.close(fd)
    _retitle_as_shim()
    _say(1, {"shim_pid": os.getpid(), "shim_start_time": proc_start_time(os.getpid())})
    try:
        os.chdir(request["cwd"])
        shim.main([request["launch"]])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def serve(channel: socket.socket) -> None:
    """Fork a shim per request until the driver closes the channel."""
    while True:
        received = _receive(channel)
        if received is None:
            return
        request, fds = received
        if len(fds) not in (FDS_PER_REQUEST, FDS_PER_REQUEST + 1) or not isinstance(request.get("launch"), str):
            for fd in fds[:1]:
                _say(fd, {"ok": False, "error": "fork server: malformed launch request"})
            for fd in fds:
                os.close(fd)
            continue
        reply_fd, log_fd = fds[:2]
        secret_fd = fds[2] if len(fds) > FDS_PER_REQUEST else None
        try:
            pid = os.fork()
        except OSError as exc:
            _say(reply_fd, {"ok": False, "error": f"fork server: cannot fork a shim: {exc.strerror}"})
            pid = -1
        if pid == 0:
            code = 1
            try:
                channel.detach()  # fd 0 is about to become /dev/null; the child must not close that later
                code = _run_shim_in_child(request, reply_fd, log_fd, secret_fd)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        for fd in fds:
            os.close(fd)
        _reap_children()  # a SIGCHLD can arrive while this loop is busy, not only while blocked in recvmsg


def main() -> None:
    signal.signal(signal.SIGCHLD, _reap_children)
    # Own session, no terminal: these would only come from someone aiming at us; the driver ends us by EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=0)
    try:
        serve(channel)
    except KeyboardInterrupt:
        pass
    # Running shims are left alone: they are not ours to stop, and whoever reaps orphans reaps them.


if __name__ == "__main__":
    main()
