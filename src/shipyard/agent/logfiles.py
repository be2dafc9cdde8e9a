"""Per-instance log files: size-rotated writing (used by the shim, off any event loop) and tail reading.

It must never read a child's pipes itself nor run on the server's event loop with blocking I/O.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path


class RotatingLogFile:
    """Appends bytes to `path`; past `max_bytes` it shifts path -> path.1 -> ... and keeps `max_files` files."""

    def __init__(self, path: Path, max_bytes: int, max_files: int) -> None:
        self.path = path
        self.max_bytes = max(1024, max_bytes)
        self.max_files = max(1, max_files)
        self._fh = open(path, "ab", buffering=0)
        self._size = self._fh.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self._size
            if room <= 0:
                self._rotate()
                continue
            # Prefer to cut at a newline so a line is not split across files when it fits.
            chunk = data[:room]
            if len(data) > room:
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    chunk = chunk[: cut + 1]
                elif self._size > 0:
                    self._rotate()
                    continue
                # else: one line longer than a whole file; it has to be split.
            self._fh.write(chunk)
            self._size += len(chunk)
            data = data[len(chunk) :]

    def _rotate(self) -> None:
        self._fh.close()
        if self.max_files == 1:
            os.truncate(self.path, 0)
        else:
            for n in range(self.max_files - 1, 0, -1):
                src = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{n}"))
        self._fh = open(self.path, "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        self._fh.close()


class LineTail:
    """The last `count` complete lines of a byte stream (for crash reports), bounded in memory."""

    def __init__(self, count: int = 20, max_line: int = 2000) -> None:
        self.lines: deque[str] = deque(maxlen=count)
        self._partial = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for line in complete:
            self.lines.append(line[: self._max_line].decode(errors="replace"))
        self._partial = self._partial[-self._max_line :]

    def snapshot(self) -> list[str]:
        lines = list(self.lines)
        if self._partial:
            lines = [*lines, self._partial.decode(errors="replace")][-(self.lines.maxlen or 1) :]
        return lines


class TimelineWriter:
    """Both streams in one file, a line at a time as the shim reads them: `<unix time> <o|e> <line>`, so that logs
    can show stdout and stderr interleaved in time order (the plain files keep each stream byte for byte)."""

    def __init__(self, log: RotatingLogFile, max_line: int = 64 * 1024) -> None:
        self.log = log
        self._partial: dict[bytes, bytes] = {}
        self._max_line = max_line

    def feed(self, stream: bytes, data: bytes) -> None:
        *complete, rest = (self._partial.pop(stream, b"") + data).split(b"\n")
        stamp = b"%.6f " % time.time() + stream + b" "
        if complete:
            self.log.write(b"".join(stamp + line + b"\n" for line in complete))
        if len(rest) > self._max_line:  # a very long line without a newline: write what we have
            self.log.write(stamp + rest + b"\n")
            rest = b""
        if rest:
            self._partial[stream] = rest

    def close(self) -> None:
        for stream, rest in self._partial.items():
            self.log.write(b"%.6f " % time.time() + stream + b" " + rest + b"\n")
        self._partial.clear()
        self.log.close()


def split_timeline_line(line: str) -> tuple[float, str, str] | None:
    """(unix time, "stdout" | "stderr", text) of a TimelineWriter line; None for anything else."""
    stamp, _, rest = line.partition(" ")
    stream, _, text = rest.partition(" ")
    try:
        return float(stamp), ("stderr" if stream == "e" else "stdout"), text
    except ValueError:
        return None


def log_files_oldest_first(path: Path) -> list[Path]:
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1 :].isdigit()),
        key=lambda p: -int(p.name[len(path.name) + 1 :]),
    )
    return [*rotated, path] if path.exists() else rotated


def read_tail_lines(path: Path, count: int, block: int = 64 * 1024) -> list[str]:
    """The last `count` lines across the live file and its rotations (blocking; see read_tail)."""
    lines: list[str] = []
    for file in reversed(log_files_oldest_first(path)):
        try:
            with open(file, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - block))
                data = fh.read()
        except FileNotFoundError:
            continue
        found = data.decode(errors="replace").splitlines()
        if size > block and found:
            found = found[1:]  # first line may be cut
        lines = found + lines
        if len(lines) >= count:
            break
    return lines[-count:] if count else []


async def read_tail(path: Path, count: int) -> list[str]:
    import asyncio  # here, not at the top: the shim imports this module and must stay small and quick

    return await asyncio.to_thread(read_tail_lines, path, count)
