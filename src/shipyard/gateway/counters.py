"""Counters shared by all gateway workers of one node: an mmap'ed file of fixed-size slots under fcntl locks.

Owns rate-limit windows (second/minute/hour) and node-wide metric sums; never makes a network call and never
blocks longer than one short byte-range lock (a few microseconds), so it is safe on a worker's event loop.

Layout: a 64-byte header, then buckets of BUCKET_SLOTS slots of 32 bytes: (key hash u64, window start i64,
window length i64, count i64). A key+window hashes to one bucket; the bucket's byte range is locked with
fcntl.lockf while a slot is found (matching, expired, empty, or else the oldest is evicted) and updated, so
"increment if below the limit" is atomic across processes: a limit admits exactly that many requests.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

MAGIC = b"SHIPCTR1"
HEADER = 64
SLOT = struct.Struct("<Qqqq")
BUCKET_SLOTS = 8
BUCKET_BYTES = SLOT.size * BUCKET_SLOTS
DEFAULT_BUCKETS = 8192  # 64k slots, 2 MiB
ENV_PATH = "SHIPYARD_GATEWAY_SHARED"

WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class WindowUse:
    allowed: bool
    count: int  # requests counted in this window after this call
    limit: int
    reset: float  # seconds until the window ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


def _hash(key: str, window: int) -> int:
    digest = hashlib.blake2b(f"{window}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot


class SharedCounters:
    """Windowed counters in a file shared by every worker that opens the same path."""

    def __init__(self, path: str, *, buckets: int = DEFAULT_BUCKETS) -> None:
        self.path = path
        size = HEADER + buckets * BUCKET_BYTES
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, HEADER, 0)
        try:
            current = os.fstat(self._fd).st_size
            if current < size:
                os.ftruncate(self._fd, size)
                os.pwrite(self._fd, MAGIC + buckets.to_bytes(8, "little"), 0)
            else:
                head = os.pread(self._fd, 16, 0)
                if head[:8] == MAGIC:
                    buckets = int.from_bytes(head[8:16], "little")  # the creator's size wins
                size = HEADER + buckets * BUCKET_BYTES
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, HEADER, 0)
        self.buckets = buckets
        self._map = mmap.mmap(self._fd, size)
        # POSIX record locks don't exclude threads of one process; this does.
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _locked_update(self, key: str, window: int, limit: int | None, amount: int, now: float) -> WindowUse:
        h = _hash(key, window)
        start = int(now // window) * window
        bucket = h % self.buckets
        base = HEADER + bucket * BUCKET_BYTES
        m = self._map
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, BUCKET_BYTES, base)
            try:
                target, count = -1, 0
                free, oldest, oldest_end = -1, base, None
                for i in range(BUCKET_SLOTS):
                    off = base + i * SLOT.size
                    sh, sstart, slen, scount = SLOT.unpack_from(m, off)
                    if sh == h and sstart == start and slen == window:
                        target, count = off, scount
                        break
                    end = sstart + slen
                    if free < 0 and (sh == 0 or end <= now):
                        free = off
                    elif oldest_end is None or end < oldest_end:
                        oldest, oldest_end = off, end
                matched = target >= 0
                if not matched:
                    target = free if free >= 0 else oldest
                allowed = limit is None or count + amount <= limit
                if allowed and (matched or amount > 0):
                    count = max(0, count + amount)
                    SLOT.pack_into(m, target, h, start, window, count)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, BUCKET_BYTES, base)
        return WindowUse(allowed, count, limit if limit is not None else 0, start + window - now)

    def acquire(self, key: str, window: int, limit: int, *, now: float | None = None, amount: int = 1) -> WindowUse:
        """Count `amount` in the current window of `key` unless that would pass `limit` (then nothing is counted)."""
        return self._locked_update(key, window, limit, amount, time.time() if now is None else now)

    def release(self, key: str, window: int, *, now: float | None = None, amount: int = 1) -> None:
        """Give back what acquire counted (when another window of the same request refused it)."""
        self._locked_update(key, window, None, -amount, time.time() if now is None else now)

    def usage(self, key: str, window: int, *, now: float | None = None) -> int:
        return self._locked_update(key, window, None, 0, time.time() if now is None else now).count


_opened: dict[str, SharedCounters] = {}
_open_lock = threading.Lock()


def shared_counters(path: str | None = None) -> SharedCounters:
    """The node's counters file: `path`, else $SHIPYARD_GATEWAY_SHARED, else a private file of this process
    (then limits hold per process only, which is right for a single worker)."""
    path = path or os.environ.get(ENV_PATH) or ""
    with _open_lock:
        if not path:
            path = _opened.get("").path if "" in _opened else ""
            if not path:
                fd, path = tempfile.mkstemp(prefix="shipyard-counters-")
                os.close(fd)
                os.unlink(path)
                counters = SharedCounters(path)
                os.unlink(path)  # private: nothing else may open it
                _opened[""] = counters
            return _opened[""]
        if path not in _opened:
            _opened[path] = SharedCounters(path)
        return _opened[path]


METRIC_SLOT = struct.Struct("<Qd112s")  # name hash, value, name (utf-8, NUL padded)
METRIC_MAGIC = b"SHIPMET1"


class SharedMetrics:
    """Named float sums shared by a node's workers (Prometheus counters and histogram buckets), so a scrape of
    any worker shows the whole node. Linear probing over one table; one lock per batch of updates."""

    def __init__(self, path: str, *, slots: int = 8192) -> None:
        self.path = path
        size = HEADER + slots * METRIC_SLOT.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, HEADER, 0)
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
                os.pwrite(self._fd, METRIC_MAGIC + slots.to_bytes(8, "little"), 0)
            else:
                head = os.pread(self._fd, 16, 0)
                if head[:8] == METRIC_MAGIC:
                    slots = int.from_bytes(head[8:16], "little")
                size = HEADER + slots * METRIC_SLOT.size
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, HEADER, 0)
        self.slots = slots
        self._map = mmap.mmap(self._fd, size)
        self._thread_lock = threading.Lock()
        self._where: dict[str, int] = {}  # name -> offset, found once per process

    def _offset(self, name: str, raw: bytes, h: int, create: bool) -> int:
        off = self._where.get(name)
        if off is not None:
            return off
        m = self._map
        for i in range(self.slots):
            off = HEADER + ((h + i) % self.slots) * METRIC_SLOT.size
            sh, _, sname = METRIC_SLOT.unpack_from(m, off)
            if sh == h and sname.rstrip(b"\0") == raw:
                self._where[name] = off
                return off
            if sh == 0:
                if not create:
                    return -1
                METRIC_SLOT.pack_into(m, off, h, 0.0, raw)
                self._where[name] = off
                return off
        return -1  # full: the metric is dropped rather than blocking requests

    def add_many(self, updates: list[tuple[str, float]]) -> None:
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, HEADER, 0)
            try:
                for name, amount in updates:
                    raw = name.encode()[:112]
                    off = self._offset(name, raw, _hash(name, 0), True)
                    if off >= 0:
                        h, value, sname = METRIC_SLOT.unpack_from(self._map, off)
                        METRIC_SLOT.pack_into(self._map, off, h, value + amount, sname)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, HEADER, 0)

    def snapshot(self) -> dict[str, float]:
        out = {}
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_SH, HEADER, 0)
            try:
                for i in range(self.slots):
                    h, value, sname = METRIC_SLOT.unpack_from(self._map, HEADER + i * METRIC_SLOT.size)
                    if h:
                        out[sname.rstrip(b"\0").decode(errors="replace")] = value
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, HEADER, 0)
        return out


_metrics_opened: dict[str, SharedMetrics] = {}


def shared_metrics(path: str | None = None) -> SharedMetrics:
    """The node's metrics file: `path`, else $SHIPYARD_GATEWAY_SHARED + ".metrics", else one private to this
    process."""
    base = path or os.environ.get(ENV_PATH) or ""
    with _open_lock:
        key = base
        if key not in _metrics_opened:
            if base:
                _metrics_opened[key] = SharedMetrics(path or base + ".metrics")
            else:
                fd, tmp = tempfile.mkstemp(prefix="shipyard-metrics-")
                os.close(fd)
                os.unlink(tmp)
                _metrics_opened[key] = SharedMetrics(tmp)
                os.unlink(tmp)
        return _metrics_opened[key]
