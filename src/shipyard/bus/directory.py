"""The server's list of queues and subscriptions for a broker that cannot list them itself (RabbitMQ without its
management plugin), kept in the store under bus/queues/, and the Bus wrapper that records into it.

It holds names and settings only, never messages; the broker stays the authority on what a queue contains.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote, unquote

import orjson

from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    Bus,
    Consumer,
    Message,
    QueueStats,
    Task,
    check_name,
    patterns_list,
)
from shipyard.errors import NotFound
from shipyard.store import Store

log = logging.getLogger("shipyard.bus.directory")
PREFIX = "bus/queues/"


class QueueDirectory:
    """bus/queues/<name> -> {"kind": "queue"|"subscription", "patterns": [...], "max_attempts": n}."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, dict[str, Any]] = {}

    async def record(self, name: str, *, patterns: Iterable[str] = (), max_attempts: int | None = None) -> None:
        """Adds the queue, or the patterns / max_attempts it did not have yet; writes only on a change."""
        current = self._known.get(name)
        if current is None:
            kv = await self.store.get(PREFIX + quote(name, safe=""))
            current = orjson.loads(kv.value) if kv is not None else None
        entry = dict(current or {"kind": "queue", "patterns": [], "max_attempts": DEFAULT_MAX_ATTEMPTS})
        added = [p for p in patterns if p not in entry["patterns"]]
        if added:
            entry["patterns"] = [*entry["patterns"], *added]
            entry["kind"] = "subscription"
        if max_attempts is not None:
            entry["max_attempts"] = max_attempts
        if entry != current:
            await self.store.put(PREFIX + quote(name, safe=""), orjson.dumps(entry))
        self._known[name] = entry

    async def entries(self) -> dict[str, dict[str, Any]]:
        result = await self.store.range(PREFIX, prefix=True)
        out: dict[str, dict[str, Any]] = {}
        for kv in result.kvs:
            with contextlib.suppress(ValueError):  # an unreadable record must not hide the others
                out[unquote(kv.key[len(PREFIX):])] = orjson.loads(kv.value)
        self._known = dict(out)
        return out


class DirectoryBus(Bus):
    """A Bus that records every queue and subscription it declares or is asked about, so `stats()` without a
    queue can list them all (and with their kind, patterns and max_attempts, which RabbitMQ does not report)."""

    def __init__(self, inner: Bus, directory: QueueDirectory) -> None:
        self.inner, self.directory = inner, directory

    async def publish(self, topic: str, message: bytes, headers: dict[str, str] | None = None) -> None:
        await self.inner.publish(topic, message, headers)

    async def publish_many(self, events: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        await self.inner.publish_many(events)

    async def subscribe(self, patterns: str | Iterable[str], group: str, *,
                        prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        consumer = await self.inner.subscribe(patterns, group, prefetch=prefetch)
        await self.directory.record(group, patterns=patterns_list(patterns))
        return consumer

    async def declare_subscription(self, group: str, patterns: str | Iterable[str]) -> None:
        await self.inner.declare_subscription(group, patterns)
        await self.directory.record(group, patterns=patterns_list(patterns))

    async def declare_queue(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        await self.inner.declare_queue(queue, max_attempts=max_attempts)
        await self.directory.record(queue, max_attempts=max_attempts)

    async def enqueue(self, queue: str, payload: bytes, *, delay: float = 0.0, priority: int = 0,
                      idempotency_key: str | None = None, headers: dict[str, str] | None = None) -> str | None:
        mid = await self.inner.enqueue(queue, payload, delay=delay, priority=priority,
                                       idempotency_key=idempotency_key, headers=headers)
        await self.directory.record(queue)
        return mid

    async def enqueue_many(self, queue: str, tasks: Sequence[Task]) -> list[str | None]:
        ids = await self.inner.enqueue_many(queue, tasks)
        await self.directory.record(queue)
        return ids

    async def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        consumer = await self.inner.consume(queue, prefetch=prefetch)
        await self.directory.record(queue)
        return consumer

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        return await self.inner.dead_letters(queue, limit)

    async def dead_letter(self, queue: str, message_id: str) -> Message:
        return await self.inner.dead_letter(queue, message_id)

    async def retry_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        return await self.inner.retry_dead_letters(queue, ids)

    async def purge_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        return await self.inner.purge_dead_letters(queue, ids)

    async def stats(self, queue: str | None = None) -> list[QueueStats]:
        entries = await self.directory.entries()
        names = [check_name(queue)] if queue is not None else sorted(entries)
        out = []
        for name in names:
            try:
                [s] = await self.inner.stats(name)
            except NotFound:
                if queue is not None:
                    raise
                continue  # deleted on the broker behind our back: it stays listed once it is used again
            entry = entries.get(name)
            if entry is not None:
                s = replace(s, kind=entry.get("kind", s.kind), patterns=list(entry.get("patterns", s.patterns)),
                            max_attempts=int(entry.get("max_attempts", s.max_attempts)))
            out.append(s)
        return out

    async def start(self) -> None:
        await self.inner.start()

    def status(self) -> dict[str, Any]:
        return self.inner.status()

    async def close(self) -> None:
        await self.inner.close()
