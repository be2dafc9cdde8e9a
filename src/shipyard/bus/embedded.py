"""The embedded broker served by `shipyard server`: queues, topic routing, leases and dead letters in memory,
every change written to its journal (bus.db) before a publish is acknowledged.

It never blocks the event loop on disk and never hands out a message that is not yet durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from typing import Any

import orjson

from shipyard.bus import journal as j
from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    IDEMPOTENCY_WINDOW,
    Bus,
    BusError,
    Consumer,
    Delivery,
    Message,
    QueueStats,
    Task,
    backoff_delay,
    check_delay,
    check_headers,
    check_max_attempts,
    check_name,
    check_prefetch,
    check_priority,
    check_topic,
    patterns_list,
    topic_matches,
)
from shipyard.errors import NotFound

READY, DELAYED, HELD, DEAD = 1, 2, 3, 4


class Entry:
    __slots__ = (
        "attempts", "available_at", "body", "enqueued_at", "error", "failed_at", "headers", "id", "priority",
        "queue", "topic", "where",
    )

    def __init__(self, id: int, queue: str, topic: str, body: bytes, headers: dict[str, str], priority: int,
                 enqueued_at: float, available_at: float, attempts: int = 0) -> None:
        self.id, self.queue, self.topic, self.body, self.headers = id, queue, topic, body, headers
        self.priority, self.enqueued_at, self.available_at = priority, enqueued_at, available_at
        self.attempts = attempts
        self.error, self.failed_at, self.where = "", 0.0, 0

    @property
    def tag(self) -> str:
        # One tag per delivery: a settle from a consumer whose lease was lost can't touch the redelivery.
        return f"{self.id}:{self.attempts}"

    def row(self) -> tuple[object, ...]:
        return (self.id, self.queue, self.topic, self.body, orjson.dumps(self.headers), self.priority,
                self.enqueued_at, self.available_at, self.attempts, int(self.where == DEAD), self.error,
                self.failed_at)

    def message(self) -> Message:
        return Message(str(self.id), self.queue, self.body, self.headers, self.topic, self.priority, self.attempts,
                       self.enqueued_at, self.error, self.failed_at)


class RateMeter:
    """Events per second over the last minute, in one-second buckets."""

    def __init__(self) -> None:
        self.buckets = [0] * 60
        self.seconds = [0] * 60
        self.total = 0

    def add(self, n: int, now: float) -> None:
        second = int(now)
        i = second % 60
        if self.seconds[i] != second:
            self.seconds[i], self.buckets[i] = second, 0
        self.buckets[i] += n
        self.total += n

    def rate(self, now: float) -> float:
        second = int(now)
        return sum(b for b, s in zip(self.buckets, self.seconds, strict=True) if second - 60 < s <= second) / 60.0


class QueueState:
    def __init__(self, name: str, patterns: list[str], max_attempts: int) -> None:
        self.name, self.patterns, self.max_attempts = name, patterns, max_attempts
        self.live: dict[int, Entry] = {}  # ready, delayed and held, in id order
        self.ready: list[tuple[int, int]] = []  # heap of (-priority, id): priority first, then FIFO
        self.dead: dict[int, Entry] = {}
        self.consumers: list[BrokerConsumer] = []
        self.turn = 0
        self.published, self.acked = RateMeter(), RateMeter()

    def push_ready(self, entry: Entry) -> None:
        entry.where = READY
        heapq.heappush(self.ready, (-entry.priority, entry.id))


class BrokerConsumer:
    """The broker's side of one consumer: at most `prefetch` held deliveries, handed over through `push`."""

    _ids = count(1)

    def __init__(self, queue: QueueState, prefetch: int, push: Callable[[list[Entry]], None]) -> None:
        self.id = next(self._ids)
        self.queue, self.prefetch, self.push = queue, prefetch, push
        self.held: dict[int, Entry] = {}
        self.cancelled = False


class EmbeddedBroker(Bus):
    """In-process API of the broker; remote processes use it through /api/v1/bus (bus.http_client)."""

    def __init__(self, path: str | None) -> None:
        self.journal = j.Journal(path)
        self.queues: dict[str, QueueState] = {}
        self.seq = 0
        self.idempotency: dict[tuple[str, str], float] = {}
        self.routes: dict[str, list[str]] = {}  # topic -> subscription queues, rebuilt when bindings change
        self.timers: list[tuple[float, str, int]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.housekeeping: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | None) -> EmbeddedBroker:
        broker = cls(path)
        await broker._load()
        return broker

    async def _load(self) -> None:
        queues, messages, keys = await self.journal.open()
        now = time.time()
        for name, patterns, max_attempts in queues:
            self.queues[name] = QueueState(name, orjson.loads(patterns), max_attempts)
        for mid, queue, topic, body, headers, priority, enqueued_at, available_at, attempts, dead, error, failed_at \
                in messages:
            q = self.queues.get(queue) or self._new_queue(queue, [], DEFAULT_MAX_ATTEMPTS)
            e = Entry(mid, queue, topic, body, orjson.loads(headers), priority, enqueued_at, available_at, attempts)
            self.seq = max(self.seq, mid)
            if dead:
                e.where, e.error, e.failed_at = DEAD, error, failed_at
                q.dead[mid] = e
            else:
                q.live[mid] = e
                self._make_available(q, e, now)
        self.idempotency = {(q, k): exp for q, k, exp in keys if exp > now}
        self.housekeeping = asyncio.create_task(self._housekeep(), name="bus-housekeeping")

    def _new_queue(self, name: str, patterns: list[str], max_attempts: int) -> QueueState:
        q = self.queues[name] = QueueState(name, patterns, max_attempts)
        self.routes.clear()
        return q

    async def _queue(self, name: str, patterns: list[str] | None = None, max_attempts: int | None = None) -> QueueState:
        """The queue, created or updated (durably) when new or when bindings/settings change."""
        q = self.queues.get(check_name(name))
        changed = q is None
        if q is None:
            q = self._new_queue(name, [], max_attempts or DEFAULT_MAX_ATTEMPTS)
        if patterns and not set(patterns) <= set(q.patterns):
            q.patterns = q.patterns + [p for p in patterns if p not in q.patterns]
            self.routes.clear()
            changed = True
        if max_attempts is not None and max_attempts != q.max_attempts:
            q.max_attempts, changed = max_attempts, True
        if changed:
            await self._durable(j.UPSERT_QUEUE, [(q.name, orjson.dumps(q.patterns).decode(), q.max_attempts)])
        return q

    def _existing(self, name: str) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            raise NotFound(f"no queue {name!r}")
        return q

    async def _durable(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        try:
            await self.journal.write(sql, rows)
        except Exception as exc:
            raise BusError("the bus could not persist the write", str(exc)) from exc

    def _route(self, topic: str) -> list[str]:
        names = self.routes.get(topic)
        if names is None:
            if len(self.routes) > 10000:
                self.routes.clear()
            names = [q.name for q in self.queues.values() if any(topic_matches(p, topic) for p in q.patterns)]
            self.routes[topic] = names
        return names

    # -- publishing ---------------------------------------------------------------------------------------------

    async def publish(self, topic: str, message: bytes, headers: dict[str, str] | None = None) -> None:
        await self.publish_many([(topic, message, headers)])

    async def publish_many(self, events: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        now = time.time()
        entries: list[Entry] = []
        for topic, body, headers in events:
            check_topic(topic)
            hdrs = check_headers(headers)
            for name in self._route(topic):
                self.seq += 1
                entries.append(Entry(self.seq, name, topic, bytes(body), hdrs, 0, now, now))
        await self._store_new(entries, now)

    async def enqueue(self, queue: str, payload: bytes, *, delay: float = 0.0, priority: int = 0,
                      idempotency_key: str | None = None, headers: dict[str, str] | None = None) -> str | None:
        task = Task(payload, delay, priority, idempotency_key, headers)
        return (await self.enqueue_many(queue, [task]))[0]

    async def enqueue_many(self, queue: str, tasks: Sequence[Task]) -> list[str | None]:
        q = self.queues.get(queue) or await self._queue(queue)
        now = time.time()
        entries: list[Entry] = []
        ids: list[str | None] = []
        claimed: list[tuple[str, str]] = []
        keys: list[tuple[object, ...]] = []
        try:
            for t in tasks:
                delay, priority, hdrs = check_delay(t.delay), check_priority(t.priority), check_headers(t.headers)
                if t.idempotency_key is not None:
                    k = (q.name, str(t.idempotency_key))
                    if self.idempotency.get(k, 0) > now:
                        ids.append(None)
                        continue
                    # Claimed before the write is durable, so a concurrent duplicate is refused too.
                    self.idempotency[k] = now + IDEMPOTENCY_WINDOW
                    claimed.append(k)
                    keys.append((*k, now + IDEMPOTENCY_WINDOW))
                self.seq += 1
                entries.append(Entry(self.seq, q.name, "", bytes(t.payload), hdrs, priority, now, now + delay))
                ids.append(str(self.seq))
            if keys:
                self.journal.write(j.PUT_IDEMPOTENCY, keys)
            await self._store_new(entries, now)
        except BaseException:
            for k in claimed:
                self.idempotency.pop(k, None)
            raise
        return ids

    async def _store_new(self, entries: list[Entry], now: float) -> None:
        if not entries:
            return
        await self._durable(j.INSERT_MESSAGE, [e.row() for e in entries])
        touched: dict[str, int] = {}
        for e in entries:
            q = self.queues.get(e.queue)
            if q is None:
                continue
            q.live[e.id] = e
            self._make_available(q, e, now)
            touched[q.name] = touched.get(q.name, 0) + 1
        for name, n in touched.items():
            q = self.queues[name]
            q.published.add(n, now)
            self._dispatch(q)

    def _make_available(self, q: QueueState, e: Entry, now: float) -> None:
        if e.available_at > now:
            e.where = DELAYED
            heapq.heappush(self.timers, (e.available_at, q.name, e.id))
            if self.timers[0][2] == e.id:
                self._arm_timer()
        else:
            q.push_ready(e)

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        if self.timers:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(max(0.0, self.timers[0][0] - time.time()), self._release_due)

    def _release_due(self) -> None:
        now = time.time()
        touched: dict[str, QueueState] = {}
        while self.timers and self.timers[0][0] <= now:
            _, name, mid = heapq.heappop(self.timers)
            q = self.queues.get(name)
            e = q.live.get(mid) if q else None
            if q is not None and e is not None and e.where == DELAYED and e.available_at <= now:
                q.push_ready(e)
                touched[name] = q
        for q in touched.values():
            self._dispatch(q)
        self._arm_timer()

    # -- consuming ----------------------------------------------------------------------------------------------

    async def attach(self, queue: str, prefetch: int, push: Callable[[list[Entry]], None],
                     patterns: list[str] | None = None) -> BrokerConsumer:
        q = await self._queue(queue, patterns)
        consumer = BrokerConsumer(q, check_prefetch(prefetch), push)
        q.consumers.append(consumer)
        self._dispatch(q)
        return consumer

    def _dispatch(self, q: QueueState) -> None:
        if not q.ready or not q.consumers:
            return
        batches: dict[int, list[Entry]] = {}
        consumers = q.consumers
        while q.ready:
            progressed = False
            for _ in range(len(consumers)):
                c = consumers[q.turn % len(consumers)]
                q.turn += 1
                if c.cancelled or len(c.held) >= c.prefetch:
                    continue
                e = None
                while q.ready:
                    _, mid = heapq.heappop(q.ready)
                    cand = q.live.get(mid)
                    if cand is not None and cand.where == READY:
                        e = cand
                        break
                if e is None:
                    break
                e.where, e.attempts = HELD, e.attempts + 1
                c.held[e.id] = e
                batches.setdefault(c.id, []).append(e)
                progressed = True
            if not progressed:
                break
        for c in consumers:
            if c.id in batches:
                c.push(batches[c.id])

    def settle(self, consumer: BrokerConsumer, acks: Iterable[str] = (), nacks: Iterable[tuple[str, float | None]] = (),
               fails: Iterable[tuple[str, str]] = (), releases: Iterable[str] = ()) -> int:
        """Settles deliveries held by this consumer; tags of other or older deliveries are ignored."""
        q, now, done = consumer.queue, time.time(), 0
        deletes: list[tuple[object, ...]] = []
        retries: list[tuple[object, ...]] = []
        for tag in acks:
            e = self._take(consumer, tag)
            if e is not None:
                q.live.pop(e.id, None)
                e.where = 0
                deletes.append((e.id,))
        if deletes:
            self.journal.write(j.DELETE_MESSAGE, deletes)
            q.acked.add(len(deletes), now)
            done += len(deletes)
        for tag, delay in nacks:
            e = self._take(consumer, tag)
            if e is None:
                continue
            done += 1
            if e.attempts >= q.max_attempts:
                self._bury(q, e, f"nacked after {e.attempts} attempts (max_attempts {q.max_attempts})", now)
                continue
            e.available_at = now + (backoff_delay(e.attempts) if delay is None else max(0.0, float(delay)))
            retries.append((e.attempts, e.available_at, e.id))
            self._make_available(q, e, now)
        for tag, reason in fails:
            e = self._take(consumer, tag)
            if e is not None:
                done += 1
                self._bury(q, e, reason or "failed", now)
        for tag in releases:
            # Handed over but never started (prefetched by a consumer that stops): not an attempt.
            e = self._take(consumer, tag)
            if e is not None:
                done += 1
                e.attempts -= 1
                q.push_ready(e)
        if retries:
            self.journal.write(j.UPDATE_RETRY, retries)
        self._dispatch(q)
        return done

    def settle_any(self, queue: str, **settles: list[Any]) -> int:
        """Settles deliveries by tag whichever consumer of the queue holds them (the plain HTTP endpoints)."""
        q = self._existing(queue)
        return sum(self.settle(c, **settles) for c in list(q.consumers))

    def _take(self, consumer: BrokerConsumer, tag: str) -> Entry | None:
        mid, _, attempts = str(tag).partition(":")
        try:
            e = consumer.held.get(int(mid))
        except ValueError:
            return None
        if e is None or str(e.attempts) != attempts:
            return None
        del consumer.held[e.id]
        return e

    def _bury(self, q: QueueState, e: Entry, reason: str, now: float) -> None:
        q.live.pop(e.id, None)
        e.where, e.error, e.failed_at = DEAD, reason[:1000], now
        q.dead[e.id] = e
        self.journal.write(j.UPDATE_DEAD, [(e.attempts, e.error, now, e.id)])

    def cancel(self, consumer: BrokerConsumer) -> None:
        consumer.cancelled = True

    def detach(self, consumer: BrokerConsumer) -> None:
        """The consumer is gone (closed, or its lease expired): what it held goes back to the queue."""
        q, now = consumer.queue, time.time()
        with contextlib.suppress(ValueError):
            q.consumers.remove(consumer)
        held, consumer.held = list(consumer.held.values()), {}
        retries: list[tuple[object, ...]] = []
        for e in sorted(held, key=lambda e: e.id):
            if e.attempts >= q.max_attempts:
                self._bury(q, e, f"consumer lost on attempt {e.attempts} (max_attempts {q.max_attempts})", now)
            else:
                retries.append((e.attempts, e.available_at, e.id))
                q.push_ready(e)
        if retries:
            self.journal.write(j.UPDATE_RETRY, retries)
        self._dispatch(q)

    async def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        consumer = LocalConsumer(self, queue, prefetch)
        consumer.handle = await self.attach(queue, prefetch, consumer.push)
        return consumer

    async def subscribe(self, patterns: str | Iterable[str], group: str, *,
                        prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        consumer = LocalConsumer(self, group, prefetch)
        consumer.handle = await self.attach(group, prefetch, consumer.push, patterns_list(patterns))
        return consumer

    async def declare_subscription(self, group: str, patterns: str | Iterable[str]) -> None:
        await self._queue(group, patterns_list(patterns))

    async def declare_queue(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        await self._queue(queue, max_attempts=check_max_attempts(max_attempts))

    # -- dead letters and stats ---------------------------------------------------------------------------------

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        q = self._existing(queue)
        out: list[Message] = []
        for e in q.dead.values():
            if len(out) >= limit:
                break
            out.append(e.message())
        return out

    def _dead(self, q: QueueState, message_id: str) -> Entry:
        try:
            e = q.dead.get(int(message_id))
        except (TypeError, ValueError):
            e = None
        if e is None:
            raise NotFound(f"no dead letter {message_id!r} in queue {q.name!r}")
        return e

    async def dead_letter(self, queue: str, message_id: str) -> Message:
        return self._dead(self._existing(queue), message_id).message()

    def _select_dead(self, q: QueueState, ids: Iterable[str] | None) -> list[Entry]:
        if ids is None:
            return list(q.dead.values())
        out = []
        for i in ids:
            with contextlib.suppress(NotFound):
                out.append(self._dead(q, i))
        return out

    async def retry_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        q, now = self._existing(queue), time.time()
        chosen = self._select_dead(q, ids)
        for e in chosen:
            del q.dead[e.id]
            e.attempts, e.error, e.failed_at, e.available_at = 0, "", 0.0, now
            q.live[e.id] = e
            q.push_ready(e)
        if chosen:
            await self._durable(j.UPDATE_RETRY, [(0, now, e.id) for e in chosen])
        self._dispatch(q)
        return len(chosen)

    async def purge_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        q = self._existing(queue)
        chosen = self._select_dead(q, ids)
        for e in chosen:
            del q.dead[e.id]
        if chosen:
            await self._durable(j.DELETE_MESSAGE, [(e.id,) for e in chosen])
        return len(chosen)

    async def stats(self, queue: str | None = None) -> list[QueueStats]:
        now = time.time()
        names = [self._existing(queue).name] if queue is not None else sorted(self.queues)
        out = []
        for name in names:
            q = self.queues[name]
            held = sum(len(c.held) for c in q.consumers)
            delayed = sum(1 for e in q.live.values() if e.where == DELAYED) if len(q.live) > held else 0
            oldest = next(iter(q.live.values()), None)
            out.append(QueueStats(
                queue=name, kind="subscription" if q.patterns else "queue", depth=len(q.live),
                ready=len(q.live) - held - delayed, in_flight=held, delayed=delayed, dead_letters=len(q.dead),
                consumers=sum(1 for c in q.consumers if not c.cancelled),
                oldest_age=max(0.0, now - oldest.enqueued_at) if oldest else 0.0,
                publish_rate=q.published.rate(now), ack_rate=q.acked.rate(now),
                patterns=list(q.patterns), max_attempts=q.max_attempts,
                published_total=q.published.total, acked_total=q.acked.total,
            ))
        return out

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(300)
            now = time.time()
            self.idempotency = {k: exp for k, exp in self.idempotency.items() if exp > now}
            self.journal.write(j.EXPIRE_IDEMPOTENCY, [(now,)])

    async def close(self) -> None:
        if self.housekeeping is not None:
            self.housekeeping.cancel()
        if self.timer is not None:
            self.timer.cancel()
        for q in self.queues.values():
            for c in list(q.consumers):
                c.push([])  # an empty push tells a consumer the broker is going away
        await self.journal.close()


class LocalDelivery(Delivery):
    def __init__(self, consumer: LocalConsumer, entry: Entry) -> None:
        self.consumer, self.tag, self.message = consumer, entry.tag, entry.message()

    async def ack(self) -> None:
        self.consumer.broker.settle(self.consumer.handle, acks=[self.tag])

    async def nack(self, delay: float | None = None) -> None:
        self.consumer.broker.settle(self.consumer.handle, nacks=[(self.tag, delay)])

    async def fail(self, reason: str = "") -> None:
        self.consumer.broker.settle(self.consumer.handle, fails=[(self.tag, reason)])


class LocalConsumer(Consumer):
    """A consumer inside the server process (the HTTP edge has its own, over WebSocket)."""

    handle: BrokerConsumer

    def __init__(self, broker: EmbeddedBroker, queue: str, prefetch: int) -> None:
        self.broker, self.queue, self.prefetch = broker, queue, prefetch
        self.inbox: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.closed = False

    def push(self, entries: list[Entry]) -> None:
        if not entries:
            self.inbox.put_nowait(None)
        for e in entries:
            self.inbox.put_nowait(e)

    async def get(self, timeout: float | None = None) -> Delivery | None:
        if self.closed:
            return None
        try:
            entry = self.inbox.get_nowait() if not self.inbox.empty() else await asyncio.wait_for(
                self.inbox.get(), timeout)
        except TimeoutError:
            return None
        if entry is None:
            self.closed = True
            return None
        return LocalDelivery(self, entry)

    async def cancel(self) -> None:
        self.broker.cancel(self.handle)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            unstarted = []
            while not self.inbox.empty():
                e = self.inbox.get_nowait()
                if e is not None:
                    unstarted.append(e.tag)
            self.broker.settle(self.handle, releases=unstarted)
            self.broker.detach(self.handle)
