"""Rate-limit counts shared by the gateways of a cluster: each server publishes what its own gateway workers counted
and writes the sum of the other servers' last published counts into its node's counters file (`remote`).

Runs in the server (which holds the store), never in a worker: the request path only reads the counters file, so no
request ever waits on the network. It never decides admission itself: counters.py admits while count + remote stays
within the limit. Tolerance: a gateway does not see what the others admitted since their last sync (see
docs/cluster.md, "Rate limits across the cluster").

Each server writes one key, gateway-counters/<server id>, with a plain put (no txn, no compare: nobody else writes
it) when its counts changed since its last put, at most every `interval` seconds: a list of (key hash, window start,
window length, count) of its windows still running. The key is on a lease of its own that outlives the longest
window, so a server that dies still counts for the rest of its windows, and its key goes away a day later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Iterable

from shipyard.gateway.counters import BUCKET_BYTES, SLOT, WINDOWS, SharedCounters
from shipyard.store.base import Event, EventType, LeaseNotFound, Store
from shipyard.store.follow import follow_prefix
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger("shipyard.gateway.cluster")

PREFIX = "gateway-counters/"
ENTRY = struct.Struct("<Qqqq")  # key hash, window start, window length, count
VERSION = b"SRL1"
DEFAULT_INTERVAL = 0.1
LEASE_TTL = max(WINDOWS.values()) + 3600  # outlives the longest window: a dead server's counts last as long
LEASE_RENEW = 600.0
CHUNK = BUCKET_BYTES * 8  # the counters file is compared with its last copy this many bytes at a time

Window = tuple[int, int, int]  # key hash, window start, window length


def encode_counts(entries: Iterable[tuple[int, int, int, int]]) -> bytes:
    return VERSION + b"".join(ENTRY.pack(*entry) for entry in sorted(entries))


def decode_counts(raw: bytes) -> list[tuple[int, int, int, int]]:
    """The entries of one server's key; nothing from a value this version cannot read (it is ignored, not fatal)."""
    if not raw.startswith(VERSION) or (len(raw) - len(VERSION)) % ENTRY.size:
        return []
    return list(ENTRY.iter_unpack(raw[len(VERSION):]))


class LocalCounts:
    """What this node's workers counted, read from the counters file; only the chunks that changed since the last
    read are decoded (a full decode of the 64k slots costs tens of milliseconds, a compare of copies well under one)."""

    def __init__(self, counters: SharedCounters) -> None:
        self.counters = counters
        self._copy = b""
        self._slots: dict[int, tuple[int, int, int, int]] = {}  # offset -> (hash, start, window, count), count > 0

    def read(self, now: float) -> list[tuple[int, int, int, int]]:
        raw = self.counters.raw_slots()
        previous = self._copy
        if raw != previous:
            for at in range(0, len(raw), CHUNK):
                chunk = raw[at:at + CHUNK]
                if chunk != previous[at:at + CHUNK]:
                    self._decode_chunk(at, chunk)
            self._copy = raw
        return [slot for slot in self._slots.values() if slot[1] + slot[2] > now]

    def _decode_chunk(self, at: int, chunk: bytes) -> None:
        for i, (h, start, window, count, _) in enumerate(SLOT.iter_unpack(chunk)):
            if h and count > 0:
                self._slots[at + i * SLOT.size] = (h, start, window, count)
            else:
                self._slots.pop(at + i * SLOT.size, None)


class ClusterCounters:
    """Publishes this server's gateway counts and applies the other servers' to the node's counters file."""

    def __init__(self, store: Store, counters: SharedCounters, server_id: str, *,
                 interval: float = DEFAULT_INTERVAL, wait_for_others: bool = False) -> None:
        self.store = store
        # A lone server publishes nothing (and reads no counts) until another gateway (an agent's) has published.
        self.wait_for_others = wait_for_others
        self.counters = counters
        self.key = PREFIX + server_id
        self.interval = interval
        self.local = LocalCounts(counters)
        self.others: dict[str, list[tuple[int, int, int, int]]] = {}  # store key -> that server's entries
        self.applied: dict[Window, int] = {}  # what this file's remote fields hold now
        self.published = b""
        self.puts = 0  # counted for tests and metrics
        self._lease = 0
        self._lease_renewed = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(follow_prefix(self.store, PREFIX, self._on_events, self._resync,
                                              name="gateway counters"), name="gateway-counters-follow"),
            asyncio.create_task(self._publish_loop(), name="gateway-counters-publish"),
        ]

    async def stop(self) -> None:
        await cancel_all_and_wait(self._tasks)
        with contextlib.suppress(Exception):
            await self.publish()  # the last requests counted still count, for the rest of their windows

    # ---- this server's counts -> the store ----------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.publish()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not ten times a second
                    log.warning("cannot publish this gateway's rate-limit counts (%s); retrying", exc)
                failing = True

    async def publish(self) -> None:
        if self.wait_for_others and not self.others:
            return
        value = encode_counts(self.local.read(time.time()))
        if value == self.published:
            return
        lease = await self._current_lease()
        try:
            await self.store.put(self.key, value, lease=lease)
        except LeaseNotFound:
            self._lease = 0  # etcd lost it (restored from a backup): a new one next time
            raise
        self.published = value
        self.puts += 1

    async def _current_lease(self) -> int:
        now = time.monotonic()
        if self._lease and now - self._lease_renewed > LEASE_RENEW:
            try:
                await self.store.keepalive(self._lease)
                self._lease_renewed = now
            except LeaseNotFound:
                self._lease = 0
        if not self._lease:
            self._lease = (await self.store.grant_lease(LEASE_TTL)).id
            self._lease_renewed = now
        return self._lease

    # ---- the other servers' counts -> this node's file --------------------------------------------------------

    async def _resync(self) -> int:
        result = await self.store.range(PREFIX, prefix=True)
        self.others = {kv.key: decode_counts(kv.value) for kv in result.kvs if kv.key != self.key}
        self.apply()
        return result.revision

    def _on_events(self, batch: list[Event]) -> None:
        for event in batch:
            key = event.kv.key
            if key == self.key:
                continue
            if event.type == EventType.DELETE:
                self.others.pop(key, None)
            else:
                self.others[key] = decode_counts(event.kv.value)
        self.apply()

    def apply(self) -> None:
        """Writes into the file the remote count of every running window whose sum over the other servers changed."""
        now = time.time()
        sums: dict[Window, int] = {}
        for entries in self.others.values():
            for h, start, window, count in entries:
                if start + window > now:
                    sums[(h, start, window)] = sums.get((h, start, window), 0) + count
        for where in [w for w in self.applied if w not in sums]:
            if where[1] + where[2] > now:
                self.counters.set_remote(*where, 0, now=now)  # a server's key went away: no longer counted
            del self.applied[where]
        for where, total in sums.items():
            if self.applied.get(where) != total:
                self.counters.set_remote(*where, total, now=now)
                self.applied[where] = total
