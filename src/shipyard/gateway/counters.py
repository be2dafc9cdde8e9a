"""Counters shared by all gateway workers of one node: an mmap'ed file of fixed-size slots under fcntl locks.

Owns rate-limit windows (second/minute/hour) and node-wide metric sums; never makes a network call and never
blocks longer than one short byte-range lock (a few microseconds), so it is safe on a worker's event loop.

Layout: a 64-byte header, then buckets of BUCKET_SLOTS slots of 40 bytes: (key hash u64, window start i64,
window length i64, count i64, remote i64). A key+window hashes to one bucket; the bucket's byte range is locked with
fcntl.lockf while a slot is found (matching, expired, empty, or else the oldest is evicted) and updated, so
"increment if below the limit" is atomic across processes: a limit admits exactly that many requests.

`remote` is what the other gateways of a cluster counted in the same key+window, as last synced through the store
(gateway/cluster_counters.py writes it; always 0 on a lone server): a request is admitted while count + remote stays
within the limit, so a cluster's limit holds in all, within what the gateways admit between two syncs.

Far from its limit a key does not need a lock per request: when at least LEASE_FRACTION requests remain in a
window, the locked update also reserves a lease of up to LEASE_MAX more for this process (counted in the shared
slot at once, so other workers see them as used), and the following requests are counted from the lease with no
lock and no syscall. A lease never lets a window pass its limit; what it can do is leave up to one lease per
process unused when a window ends (less than workers/LEASE_FRACTION of what remained), and within LEASE_FRACTION
of the limit every request is counted under the lock again, exactly.
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

MAGIC = b"SHIPCTR2"
HEADER = 64
SLOT = struct.Struct("<Qqqqq")
BUCKET_SLOTS = 8
BUCKET_BYTES = SLOT.size * BUCKET_SLOTS
DEFAULT_BUCKETS = 8192  # 64k slots, 2.5 MiB
ENV_PATH = "SHIPYARD_GATEWAY_SHARED"

WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


class WindowUse:
    """The outcome of one count in one window (a plain slotted class: made once per request on the hot path)."""

    __slots__ = ("allowed", "count", "limit", "reset")

    def __init__(self, allowed: bool, count: int, limit: int, reset: float) -> None:
        self.allowed = allowed
        self.count = count  # requests counted in this window after this call
        self.limit = limit
        self.reset = reset  # seconds until the window ends

    def __repr__(self) -> str:
        return f"WindowUse(allowed={self.allowed}, count={self.count}, limit={self.limit}, reset={self.reset:.3f})"

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


def _hash(key: str, window: int) -> int:
    digest = hashlib.blake2b(f"{window}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot


HASH_CACHE_SIZE = 65536
LEASE_FRACTION = 1024  # lease only while at least this many requests remain in the window...
LEASE_MAX = 64  # ...and at most remaining / LEASE_FRACTION, at most this many


class _Lease:
    """Requests of one key+window this process has already counted in the shared slot and not used yet."""

    __slots__ = ("count", "end", "left", "start")

    def __init__(self, start: int, window: int, left: int, count: int) -> None:
        self.start = start
        self.end = start + window  # kept so a request checks its window with two compares, not a floor division
        self.left = left
        self.count = count  # the shared count right after the lease was taken, this lease included


class SharedCounters:
    """Windowed counters in a file shared by every worker that opens the same path."""

    def __init__(self, path: str, *, buckets: int = DEFAULT_BUCKETS) -> None:
        self.path = path
        size = HEADER + buckets * BUCKET_BYTES
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, HEADER, 0)
        try:
            head = os.pread(self._fd, 16, 0)
            if head[:8] == MAGIC and os.fstat(self._fd).st_size >= HEADER:
                buckets = int.from_bytes(head[8:16], "little")  # the creator's size wins
                size = HEADER + buckets * BUCKET_BYTES
            else:  # new, or left by an older layout (its slots would be misread): start empty
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, size)
                os.pwrite(self._fd, MAGIC + buckets.to_bytes(8, "little"), 0)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, HEADER, 0)
        self.buckets = buckets
        self._map = mmap.mmap(self._fd, size)
        # POSIX record locks don't exclude threads of one process; this does.
        self._thread_lock = threading.Lock()
        self._places: dict[tuple[str, int], tuple[int, int]] = {}
        self._hints: dict[int, int] = {}  # slot hash -> offset where it was last found (checked before use)
        self._leases: dict[tuple[str, int], _Lease] = {}  # (key, window) -> this process's lease, current window

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _where(self, key: str, window: int) -> tuple[int, int]:
        """(slot hash, bucket offset) of key+window; remembered, so a hot key costs one dict lookup, not a blake2b."""
        found = self._places.get((key, window))
        if found is None:
            h = _hash(key, window)
            found = (h, HEADER + (h % self.buckets) * BUCKET_BYTES)
            if len(self._places) >= HASH_CACHE_SIZE:
                self._places.clear()
            self._places[(key, window)] = found
        return found

    def _locked_update(self, key: str, window: int, limit: int | None, amount: int, now: float,
                       lease: bool = False) -> WindowUse:
        h, base = self._where(key, window)
        start = int(now // window) * window
        m = self._map
        fd = self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX, BUCKET_BYTES, base)
        try:
            # The slot this key used last time is almost always still its slot: check it before scanning.
            target, count, remote, matched = self._hints.get(h, -1), 0, 0, False
            if target >= 0:
                sh, sstart, slen, count, remote = SLOT.unpack_from(m, target)
                matched = sh == h and sstart == start and slen == window
            if not matched:
                target, count, remote, matched = self._scan(base, h, start, window, now)
            allowed = limit is None or count + remote + amount <= limit
            if allowed and (matched or amount > 0):
                count = count + amount if count + amount > 0 else 0
                extra = 0
                if lease and limit is not None and limit - count - remote >= LEASE_FRACTION:
                    extra = min(LEASE_MAX, (limit - count - remote) // LEASE_FRACTION)
                    self._leases[(key, window)] = _Lease(start, window, extra, count + remote + extra)
                SLOT.pack_into(m, target, h, start, window, count + extra, remote)
                if not matched:
                    if len(self._hints) >= HASH_CACHE_SIZE:
                        self._hints.clear()
                        self._leases.clear()
                    self._hints[h] = target
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, BUCKET_BYTES, base)
        return WindowUse(allowed, count + remote, limit if limit is not None else 0, start + window - now)

    def _scan(self, base: int, h: int, start: int, window: int, now: float) -> tuple[int, int, int, bool]:
        """(offset, count, remote, matched) of h's slot for this window in the locked bucket at `base`; when it has
        none, the slot to take for it (empty or expired, else the one whose window ends first) and zeros."""
        m = self._map
        free, oldest, oldest_end = -1, base, None
        for i in range(BUCKET_SLOTS):
            off = base + i * SLOT.size
            sh, sstart, slen, scount, sremote = SLOT.unpack_from(m, off)
            if sh == h and sstart == start and slen == window:
                return off, scount, sremote, True
            end = sstart + slen
            if free < 0 and (sh == 0 or end <= now):
                free = off
            elif oldest_end is None or end < oldest_end:
                oldest, oldest_end = off, end
        return (free if free >= 0 else oldest), 0, 0, False

    def raw_slots(self) -> bytes:
        """A consistent copy of every slot (one shared lock over all buckets, held for a memory copy)."""
        end = HEADER + self.buckets * BUCKET_BYTES
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_SH, end - HEADER, HEADER)
            try:
                return self._map[HEADER:end]
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, end - HEADER, HEADER)

    def set_remote(self, h: int, start: int, window: int, remote: int, *, now: float | None = None) -> None:
        """Records what the other gateways of the cluster counted in window (start, window) of the key whose slot
        hash is h; the local count is kept (a slot is taken for the key if it has none here yet)."""
        if now is None:
            now = time.time()
        if start + window <= now:
            return  # over: no request will look at it again
        base = HEADER + (h % self.buckets) * BUCKET_BYTES
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, BUCKET_BYTES, base)
            try:
                target, count, _, matched = self._scan(base, h, start, window, now)
                if matched or remote:
                    SLOT.pack_into(self._map, target, h, start, window, count, max(0, remote))
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, BUCKET_BYTES, base)

    def acquire(self, key: str, window: int, limit: int, *, now: float | None = None, amount: int = 1) -> WindowUse:
        """Count `amount` in the current window of `key` unless that would pass `limit` (then nothing is counted)."""
        if now is None:
            now = time.time()
        with self._thread_lock:
            held = self._leases.get((key, window))
            if held is not None:
                # start <= now < end is the same test as start == int(now // window) * window, for less
                if held.start <= now < held.end and held.left >= amount:
                    held.left -= amount
                    return WindowUse(True, held.count - held.left, limit, held.end - now)
                del self._leases[(key, window)]  # spent, or from a window that is over
            return self._locked_update(key, window, limit, amount, now, lease=True)

    def release(self, key: str, window: int, *, now: float | None = None, amount: int = 1) -> None:
        """Give back what acquire counted (when another window of the same request refused it)."""
        if now is None:
            now = time.time()
        with self._thread_lock:
            held = self._leases.get((key, window))
            if held is not None and held.start == int(now // window) * window:
                held.left += amount  # back into the lease it most likely came from: still counted as used
                return
            self._locked_update(key, window, None, -amount, now)

    def usage(self, key: str, window: int, *, now: float | None = None) -> int:
        """Requests counted in the current window of `key` (this process's unused lease excluded)."""
        if now is None:
            now = time.time()
        with self._thread_lock:
            count = self._locked_update(key, window, None, 0, now).count
            held = self._leases.get((key, window))
            if held is not None and held.start == int(now // window) * window:
                count -= held.left
            return count


_opened: dict[str, SharedCounters] = {}
_open_lock = threading.Lock()


def shared_counters(path: str | None = None) -> SharedCounters:
    """The node's counters file: `path`, else $SHIPYARD_GATEWAY_SHARED, else a private file of this process
    (then limits hold per process only, which is right for a single worker)."""
    path = path or os.environ.get(ENV_PATH) or ""
    with _open_lock:
        if not path:
            path = _opened[""].path if "" in _opened else ""
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
