"""Instance logs over HTTP (/api/v1/allocs/{id}/logs): the last lines of stdout, stderr or both interleaved in
time order (stream=all, from the shim's timeline file; timestamps=1 keeps each line's time), optionally followed.
Served by servers (an instance on a `shipyard agent` elsewhere: asked of that agent) and by agents themselves.

It only reads the files the shim writes (off the event loop); it never touches the instance or its process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

from shipyard.agent.logfiles import read_tail_lines, split_timeline_line
from shipyard.agent.state import TIMELINE_LOG
from shipyard.api.context import platform_of
from shipyard.api.native.agent_logs import AGENT_LOGS, logs_agent_of, proxy_agent_logs, remote_agent_of
from shipyard.errors import BadRequest, NotFound, ShipyardError

routes = web.RouteTableDef()

PREFIX = "/api/v1/allocs"
DEFAULT_TAIL = 100
MAX_TAIL = 100_000
FOLLOW_POLL = 0.2
READ_CHUNK = 64 * 1024


def _tail_param(request: web.Request) -> int:
    raw = request.query.get("tail")
    if raw is None or raw == "":
        return DEFAULT_TAIL
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter tail must be an integer, got {raw!r}") from None
    if not 0 <= value <= MAX_TAIL:
        raise BadRequest(f"query parameter tail must be between 0 and {MAX_TAIL}")
    return value


def _follow_param(request: web.Request, name: str = "follow") -> bool:
    return request.query.get(name, "false").lower() in ("1", "true", "yes", "")


class _TimelineLines:
    """Timeline bytes -> the lines to send: whole lines only, without their time and stream unless asked."""

    def __init__(self, timestamps: bool) -> None:
        self.timestamps = timestamps
        self._partial = b""

    def render(self, line: str) -> str:
        if self.timestamps:
            return line
        parsed = split_timeline_line(line)
        return parsed[2] if parsed is not None else line

    def feed(self, data: bytes) -> bytes:
        *complete, self._partial = (self._partial + data).split(b"\n")
        return b"".join(self.render(line.decode(errors="replace")).encode() + b"\n" for line in complete)


def _stream_file(agent: Any, alloc_id: str, stream: str) -> tuple[Path, _TimelineLines | None]:
    log_file = agent.log_file
    if stream != "all":
        return log_file(alloc_id, stream), None
    path = log_file(alloc_id, "stdout").with_name(TIMELINE_LOG)
    if not path.exists() and log_file(alloc_id, "stdout").exists():
        # An instance whose shim predates the timeline: its stderr (where Python logs) is the better half.
        return log_file(alloc_id, "stderr"), None
    return path, _TimelineLines(False)


class _LogReader:
    """Reads what is appended to a log file, across rotations (the live file renamed to .1, a new one made)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._inode: int | None = None

    def open_at_end(self) -> None:
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        self._fh.seek(0, os.SEEK_END)
        self._inode = os.fstat(self._fh.fileno()).st_ino

    def read_new(self) -> bytes:
        data = b""
        if self._fh is not None:
            data = self._fh.read(READ_CHUNK)
            if data:
                return data
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return data
        if inode != self._inode:
            # Rotated: what the old file got after our last read was read above; go on with the new one.
            if self._fh is not None:
                self._fh.close()
            self._fh = open(self.path, "rb")
            self._inode = inode
            return self._fh.read(READ_CHUNK)
        if self._fh is not None and self._fh.tell() > os.fstat(self._fh.fileno()).st_size:
            self._fh.seek(0)  # truncated (a single-file rotation)
        return data

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _local_agent(request: web.Request) -> tuple[Any, bool]:
    """(the node agent whose files to read: None when this server's node agent is its own process, whether this
    is an agent's own listener rather than a server)."""
    own = request.app.get(AGENT_LOGS)
    if own is not None:
        return own, True
    return getattr(platform_of(request), "agent", None), False


def _runs_here(agent: Any, alloc_id: str) -> bool:
    try:
        return bool(agent.log_file(alloc_id, "stdout").parent.is_dir())
    except ShipyardError:
        return False


@routes.get(PREFIX + "/{id}/logs")
async def alloc_logs(request: web.Request) -> web.StreamResponse:
    agent, on_agent = _local_agent(request)
    alloc_id = request.match_info["id"]
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr", "all"):
        raise BadRequest(f"query parameter stream must be stdout, stderr or all, not {stream!r}")
    tail = _tail_param(request)
    follow = _follow_param(request)
    if not on_agent and (agent is None or not await asyncio.to_thread(_runs_here, agent, alloc_id)):
        platform = platform_of(request)
        remote = (await remote_agent_of(platform.store, alloc_id) if agent is not None
                  else await logs_agent_of(platform.store, alloc_id, platform.node.name))
        if remote is not None:
            return await proxy_agent_logs(request, remote, alloc_id, platform.config.tls)
        if agent is None:
            raise NotFound(f"no logs for allocation {alloc_id!r}: no agent of its node is known")
    path, timeline = _stream_file(agent, alloc_id, stream)
    if timeline is not None:
        timeline.timestamps = _follow_param(request, "timestamps")
    if not path.parent.is_dir():
        raise NotFound(f"no logs for allocation {alloc_id!r}")

    reader = _LogReader(path)

    def start() -> list[str]:
        lines = read_tail_lines(path, tail) if tail else []
        if timeline is not None:
            lines = [timeline.render(line) for line in lines]
        if follow:
            reader.open_at_end()
        return lines

    lines = await asyncio.to_thread(start)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        if lines:
            await response.write(("\n".join(lines) + "\n").encode())
        if not follow:
            await response.write_eof()
            return response
        # Follow until the client goes away or the instance is stopped for good (and its last lines are sent).
        while True:
            data = await asyncio.to_thread(reader.read_new)
            if data:
                await response.write(timeline.feed(data) if timeline is not None else data)
                continue
            if alloc_id not in agent.runners:
                break
            await asyncio.sleep(FOLLOW_POLL)
        await response.write_eof()
    finally:
        await asyncio.to_thread(reader.close)
    return response
