"""Checks, before the server starts anything, that every port it will listen on is free, and names who holds one.

It only probes (bind, then close at once) and reads /proc; it never keeps a socket or signals another process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from shipyard.errors import ShipyardError


class PortInUse(ShipyardError):
    status = 409


def _probe(bind: str, port: int, kind: socket.SocketKind) -> bool:
    """True when (bind, port) can be bound now. SO_REUSEADDR as the real listeners use it, so a socket of a
    server that just exited (TIME_WAIT) does not count as taken, while any live listener does."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise ShipyardError(f"cannot listen on {bind}:{port}: {exc.strerror}", status=400) from None
    return True


def _socket_inodes(port: int, proto: str) -> set[str]:
    """Inodes of the sockets bound to `port` in /proc/net/<proto>{,6} (listening ones for TCP)."""
    inodes: set[str] = set()
    for name in (proto, proto + "6"):
        with contextlib.suppress(OSError):
            for line in Path("/proc/net", name).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                    continue
                if proto == "tcp" and fields[3] != "0A":  # 0A: LISTEN
                    continue
                inodes.add(fields[9])
    return inodes


def holder_pid(port: int, proto: str = "tcp") -> int | None:
    """The pid of a process holding `port`, when /proc lets us see it (our own user's processes, or root)."""
    targets = {f"socket:[{inode}]" for inode in _socket_inodes(port, proto)}
    if not targets:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in targets:
                        return int(entry.name)
    return None


def _holder_text(port: int, proto: str) -> str:
    pid = holder_pid(port, proto)
    if pid is None:
        return ""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = ""
    return f" (by pid {pid}{' ' + name if name else ''})"


def check_port_free(bind: str, port: int, option: str, *, udp: bool = False) -> None:
    """Raises PortInUse with one line ("port 8080 is in use (by pid N); use --gateway-port ...") if taken."""
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
    for kind in kinds:
        if not _probe(bind, port, kind):
            proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
            raise PortInUse(
                f"port {port}{'/udp' if proto == 'udp' else ''} is in use{_holder_text(port, proto)}; "
                f"use {option} to choose another"
            )


def check_ports_free(bind: str, ports: list[tuple[int, str, bool]]) -> None:
    """Each (port, option, udp-too) that is not 0 must be free, and differ from the others; the first taken one
    raises."""
    seen: dict[int, str] = {}
    for port, option, _udp in ports:
        if port and port in seen:
            raise ShipyardError(f"{option} {port} is also {seen[port]}: give each listener its own port", status=400)
        seen[port] = option
    for port, option, udp in ports:
        if port:
            check_port_free(bind, port, option, udp=udp)
