"""The Bus on RabbitMQ (aio-pika): topic exchange for events, durable queues with dead-letter queues for tasks,
publisher confirms, prefetch, TTL delay queues, and a robust connection that reconnects when the broker restarts.

It never acknowledges a publish the broker has not confirmed and never acks a message before its copy
(retry, dead letter) is confirmed. For teams bringing their own Celery, CELERY_BROKER_URL is `amqp_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
from aio_pika import DeliveryMode, ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import AMQPException, ChannelInvalidStateError, DeliveryError

from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    IDEMPOTENCY_WINDOW,
    MAX_PRIORITY,
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
)
from shipyard.bus.embedded import RateMeter
from shipyard.errors import NotFound
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.bus.rabbitmq")
T = TypeVar("T")

EVENTS = "shipyard.events"  # topic exchange: events by topic
DELAY = "shipyard.delay"  # topic exchange, key "<ms>.<queue>": into the TTL queue of that delay
RETRY = "shipyard.retry"  # topic exchange where expired delayed messages land, key "<ms>.<queue>"
H_ATTEMPTS, H_TOPIC, H_AT = "x-shipyard-attempts", "x-shipyard-topic", "x-shipyard-enqueued-at"
H_ERROR, H_FAILED_AT = "x-shipyard-error", "x-shipyard-failed-at"
RETRYABLE = (AMQPException, ConnectionError, ChannelInvalidStateError, TimeoutError)
CONNECT_TIMEOUT = 10.0  # one connection attempt; a black-holed broker address must not stall the keeper forever
KEEPER_BACKOFF_MAX = 5.0


def amqp_name(queue: str) -> str:
    return "shipyard." + queue


def dead_name(queue: str) -> str:
    return "shipyard." + queue + ".dead"


def header_number(value: object) -> float:
    """A number we wrote into an AMQP header (int, float, or its text as str or bytes); 0.0 when absent."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


def delay_bucket(seconds: float) -> int:
    """Milliseconds rounded up to two significant digits, so delays share a bounded set of TTL queues."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 100:
        return ms
    scale = 10 ** (len(str(ms)) - 2)
    return math.ceil(ms / scale) * scale


class RabbitBus(Bus):
    """`amqp://user:pass@host:port/vhost?queue_type=auto|classic|quorum` (amqps:// for TLS; rabbitmq:// means
    amqp://). auto: quorum queues on RabbitMQ 4+
    (which prioritise within them), classic queues with x-max-priority on 3.x."""

    def __init__(self, url: str, *, retry_for: float = 60.0) -> None:
        parts = urlsplit(url)
        options = parse_qs(parts.query)
        self.queue_type = options.get("queue_type", ["auto"])[0]
        scheme = "amqps" if parts.scheme == "amqps" else "amqp"
        self.amqp_url = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        self.retry_for = retry_for
        self.address = f"{parts.hostname or 'localhost'}:{parts.port or 5672}{parts.path or '/'}"  # no credentials
        self.last_error = ""
        self.since = time.time()  # when the state last changed (up <-> down)
        self._keeper: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None  # publisher confirms on
        self._lock = asyncio.Lock()
        self._declared: set[str] = set()
        self.max_attempts: dict[str, int] = {}
        self.published: dict[str, RateMeter] = {}
        self.acked: dict[str, RateMeter] = {}

    # -- connection -----------------------------------------------------------------------------------------

    async def _connect(self) -> AbstractChannel:
        if self.channel is not None and not self.channel.is_closed:
            return self.channel
        async with self._lock:
            if self.connection is None:
                try:
                    self.connection = await aio_pika.connect_robust(self.amqp_url, reconnect_interval=1.0)
                except Exception as exc:
                    self._went_down(exc)
                    raise
                self._came_up()
                self.connection.close_callbacks.add(self._on_close)
                self.connection.reconnect_callbacks.add(self._on_reconnect)
                if self.queue_type == "auto":
                    transport = self.connection.transport
                    assert transport is not None  # just connected
                    version = transport.connection.server_properties.get("version", b"3")
                    major = int((version.decode() if isinstance(version, bytes) else str(version)).split(".")[0])
                    self.queue_type = "quorum" if major >= 4 else "classic"
            if self.channel is None:
                self.channel = await self.connection.channel(publisher_confirms=True)
                await self.channel.declare_exchange(EVENTS, ExchangeType.TOPIC, durable=True)
                await self.channel.declare_exchange(DELAY, ExchangeType.TOPIC, durable=True)
                await self.channel.declare_exchange(RETRY, ExchangeType.TOPIC, durable=True)
            return self.channel

    # -- connection state (the server's health and `shipyard queues` show it) ----------------------------------

    def _went_down(self, exc: BaseException) -> None:
        if not self.last_error:
            self.since = time.time()
        self.last_error = " ".join(f"{type(exc).__name__}: {exc}".split()) if str(exc) else type(exc).__name__

    def _came_up(self) -> None:
        if self.last_error:
            self.since = time.time()
        self.last_error = ""

    def _on_close(self, _connection: object, exc: BaseException | None = None) -> None:
        if exc is not None and self._keeper is not None:
            log.warning("bus: lost RabbitMQ at %s (%s); reconnecting", self.address, exc)
            self._went_down(exc)

    def _on_reconnect(self, _connection: object) -> None:
        if self.last_error:
            log.info("bus: reconnected to RabbitMQ at %s", self.address)
        self._came_up()

    def status(self) -> dict[str, Any]:
        if self.connection is not None and self.connection.connected.is_set():
            state = "up"
        elif self.connection is not None:
            state = "reconnecting"
        else:
            state = "unreachable" if self.last_error else "connecting"
        return {"backend": "rabbitmq", "address": self.address, "state": state,
                "error": "" if state == "up" else self.last_error, "since": self.since}

    async def start(self, first_try: float = 5.0) -> None:
        """Tries once now (bounded) so the server can say at start whether the broker is there, then keeps
        trying in the background until it is; the server starts either way."""
        self._keeper = asyncio.create_task(self._keep_connecting())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), first_try)
        state = self.status()
        if state["state"] == "up":
            log.info("bus: connected to RabbitMQ at %s", self.address)
        else:
            log.warning("bus: RabbitMQ at %s is unreachable (%s); retrying in the background, and publishes and "
                        "tasks wait for it (up to %.0fs each)", self.address, state["error"] or "no answer yet",
                        self.retry_for)

    async def _keep_connecting(self) -> None:
        delay = 0.5
        while self.connection is None:
            try:
                await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            except Exception as exc:  # any failure means "not there yet": record it, try again
                if isinstance(exc, TimeoutError):
                    self._went_down(TimeoutError(f"no answer within {CONNECT_TIMEOUT:.0f}s"))
                self._tried.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, KEEPER_BACKOFF_MAX)
                continue
            if self._tried.is_set():  # start() already said it was unreachable
                log.info("bus: connected to RabbitMQ at %s", self.address)
            self._tried.set()

    def _unreachable(self) -> BusError | None:
        """In the server (start() ran): fail fast while the broker is away instead of stalling a request."""
        if self._keeper is not None and self.connection is None and self.last_error:
            return BusError(f"the bus is unreachable: RabbitMQ at {self.address}: {self.last_error} (retrying)")
        return None

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Runs op until it succeeds; while the broker is away the robust connection reconnects underneath."""
        deadline, delay = time.monotonic() + self.retry_for, 0.05
        while True:
            try:
                return await op()
            except RETRYABLE as exc:
                if isinstance(exc, DeliveryError) or time.monotonic() >= deadline:
                    raise BusError("RabbitMQ did not confirm the operation", str(exc)) from exc
                log.info("RabbitMQ unavailable (%s), retrying", exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    def _queue_args(self, queue: str) -> dict[str, Any]:
        args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_name(queue)}
        if self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
        else:
            args["x-max-priority"] = MAX_PRIORITY
        return args

    async def _declare(self, queue: str, patterns: list[str] | None = None) -> AbstractQueue:
        channel = await self._connect()
        q = await channel.declare_queue(amqp_name(queue), durable=True, arguments=self._queue_args(queue))
        if queue not in self._declared:
            dead_args: dict[str, Any] = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}
            await channel.declare_queue(dead_name(queue), durable=True, arguments=dead_args)
            await q.bind(RETRY, routing_key="*." + queue)
            self._declared.add(queue)
        for pattern in patterns or ():
            await q.bind(EVENTS, routing_key=pattern)
        return q

    async def declare_queue(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self.max_attempts[check_name(queue)] = check_max_attempts(max_attempts)
        await self._retrying(lambda: self._declare(queue))

    async def declare_subscription(self, group: str, patterns: str | Iterable[str]) -> None:
        plist = patterns_list(patterns)
        await self._retrying(lambda: self._declare(check_name(group, "subscription"), plist))

    # -- publishing -----------------------------------------------------------------------------------------

    def _meter(self, meters: dict[str, RateMeter], queue: str, n: int = 1) -> None:
        meters.setdefault(queue, RateMeter()).add(n, time.time())

    async def publish(self, topic: str, message: bytes, headers: dict[str, str] | None = None) -> None:
        check_topic(topic)
        hdrs: dict[str, Any] = {**check_headers(headers), H_TOPIC: topic, H_AT: repr(time.time())}

        async def send() -> None:
            channel = await self._connect()
            exchange = await channel.get_exchange(EVENTS, ensure=False)
            await exchange.publish(self._message(message, hdrs, 0), routing_key=topic)

        await self._retrying(send)

    async def publish_many(self, events: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        # Confirms are pipelined: all in flight at once, each awaited.
        await asyncio.gather(*(self.publish(t, m, h) for t, m, h in events))

    def _message(self, body: bytes, headers: dict[str, Any], priority: int, message_id: str | None = None
                 ) -> aio_pika.Message:
        return aio_pika.Message(
            body, headers=headers, priority=priority, delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message_id or uuid.uuid4().hex,
        )

    async def _send_to_queue(self, queue: str, msg: aio_pika.Message, delay: float) -> None:
        """Confirmed publish into a queue, through the TTL queue of its delay when there is one."""
        channel = await self._connect()
        if queue not in self._declared:
            await self._declare(queue)
        if delay <= 0:
            await channel.default_exchange.publish(msg, routing_key=amqp_name(queue))
            return
        ms = delay_bucket(delay)
        name = f"shipyard.delay.{ms}"
        if name not in self._declared:
            dq = await channel.declare_queue(name, durable=True, arguments={
                "x-message-ttl": ms, "x-dead-letter-exchange": RETRY, "x-expires": 2 * ms + 600_000,
            })
            await dq.bind(DELAY, routing_key=f"{ms}.#")
            self._declared.add(name)
        exchange = await channel.get_exchange(DELAY, ensure=False)
        await exchange.publish(msg, routing_key=f"{ms}.{queue}")

    async def _claim(self, queue: str, key: str) -> bool:
        """Atomic first-wins on (queue, key): a one-message marker queue that rejects a second publish."""
        channel = await self._connect()
        name = "shipyard.idem." + hashlib.sha256(f"{queue}\0{key}".encode()).hexdigest()[:40]
        await channel.declare_queue(name, durable=True, arguments={
            "x-max-length": 1, "x-overflow": "reject-publish", "x-expires": int(IDEMPOTENCY_WINDOW * 1000),
        })
        try:
            await channel.default_exchange.publish(self._message(b"", {}, 0), routing_key=name)
        except DeliveryError:
            return False
        return True

    async def enqueue(self, queue: str, payload: bytes, *, delay: float = 0.0, priority: int = 0,
                      idempotency_key: str | None = None, headers: dict[str, str] | None = None) -> str | None:
        check_name(queue)
        delay, priority = check_delay(delay), check_priority(priority)
        hdrs: dict[str, Any] = {**check_headers(headers), H_AT: repr(time.time())}
        if idempotency_key is not None and not await self._retrying(lambda: self._claim(queue, idempotency_key)):
            return None
        msg_id = uuid.uuid4().hex
        message = self._message(payload, hdrs, priority, msg_id)
        channel = self.channel
        if delay <= 0 and queue in self._declared and channel is not None and not channel.is_closed:
            try:  # the common case, without the retry machinery
                await channel.default_exchange.publish(message, routing_key=amqp_name(queue))
            except RETRYABLE:
                await self._retrying(lambda: self._send_to_queue(queue, message, delay))
        else:
            await self._retrying(lambda: self._send_to_queue(queue, message, delay))
        self._meter(self.published, queue)
        return msg_id

    async def enqueue_many(self, queue: str, tasks: Sequence[Task]) -> list[str | None]:
        # Confirms are pipelined: all in flight at once, each awaited.
        return list(await asyncio.gather(*(
            self.enqueue(queue, t.payload, delay=t.delay, priority=t.priority, idempotency_key=t.idempotency_key,
                         headers=t.headers)
            for t in tasks
        )))

    # -- consuming ------------------------------------------------------------------------------------------

    async def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        return await self._consumer(check_name(queue), check_prefetch(prefetch), None)

    async def subscribe(self, patterns: str | Iterable[str], group: str, *,
                        prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        return await self._consumer(check_name(group, "subscription"), check_prefetch(prefetch),
                                    patterns_list(patterns))

    async def _consumer(self, queue: str, prefetch: int, patterns: list[str] | None) -> RabbitConsumer:
        async def start() -> RabbitConsumer:
            await self._connect()
            assert self.connection is not None
            await self._declare(queue, patterns)
            channel = await self.connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            consumer = RabbitConsumer(self, queue, prefetch, channel)
            # Declared (not merely looked up) on this channel so the robust channel restores the consumer.
            amqp_queue = await channel.declare_queue(amqp_name(queue), durable=True, arguments=self._queue_args(queue))
            consumer.amqp_queue = amqp_queue
            consumer.tag = await amqp_queue.consume(consumer.push)
            return consumer

        return await self._retrying(start)

    def delivery_of(self, consumer: RabbitConsumer, incoming: AbstractIncomingMessage) -> RabbitDelivery:
        headers = dict(incoming.headers or {})
        earlier = int(header_number(headers.pop(H_ATTEMPTS, 0)))
        # Quorum queues count returns of a message (a consumer lost); classic queues can't, so they count nacks only.
        returned = int(header_number(headers.pop("x-delivery-count", 0)))
        message = Message(
            id=incoming.message_id or "", queue=consumer.queue, body=incoming.body,
            headers={k: str(v) for k, v in headers.items() if not k.startswith("x-")},
            topic=str(headers.get(H_TOPIC, "")), priority=incoming.priority or 0,
            attempts=earlier + returned + 1, enqueued_at=header_number(headers.get(H_AT)),
        )
        return RabbitDelivery(self, consumer, incoming, message)

    # -- dead letters and stats -----------------------------------------------------------------------------

    async def _scan_dead(self, queue: str, choose: Callable[[Message], bool] | None,
                         act: Callable[[Message], Awaitable[None]] | None, limit: int = 1_000_000) -> list[Message]:
        """Reads the dead-letter queue on a private channel; messages not acted upon go back in their place."""
        await self._connect()
        assert self.connection is not None
        if queue not in self._declared:
            await self._existing(queue)
        channel = await self.connection.channel()
        out: list[Message] = []
        try:
            dq = await channel.get_queue(dead_name(queue), ensure=False)
            while len(out) < limit:
                incoming = await dq.get(no_ack=False, fail=False)
                if incoming is None:
                    break
                h = dict(incoming.headers or {})
                m = Message(
                    id=incoming.message_id or "", queue=queue, body=incoming.body,
                    headers={k: str(v) for k, v in h.items() if not k.startswith("x-")},
                    topic=str(h.get(H_TOPIC, "")), priority=incoming.priority or 0,
                    attempts=int(header_number(h.get(H_ATTEMPTS))), enqueued_at=header_number(h.get(H_AT)),
                    error=str(h.get(H_ERROR, "rejected by the broker")), failed_at=header_number(h.get(H_FAILED_AT)),
                )
                if choose is None or choose(m):
                    out.append(m)
                    if act is not None:
                        await act(m)
                        await incoming.ack()
        finally:
            await channel.close()  # everything not acked returns to the dead-letter queue
        return out

    async def _existing(self, queue: str) -> None:
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            await channel.declare_queue(amqp_name(queue), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise NotFound(f"no queue {queue!r}") from None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        return await self._scan_dead(check_name(queue), None, None, limit)

    async def dead_letter(self, queue: str, message_id: str) -> Message:
        found = await self._scan_dead(check_name(queue), lambda m: m.id == message_id, None)
        if not found:
            raise NotFound(f"no dead letter {message_id!r} in queue {queue!r}")
        return found[0]

    async def retry_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        wanted = None if ids is None else set(ids)

        async def requeue(m: Message) -> None:
            hdrs: dict[str, Any] = {**m.headers, H_AT: repr(m.enqueued_at or time.time())}
            if m.topic:
                hdrs[H_TOPIC] = m.topic
            await self._send_to_queue(queue, self._message(m.body, hdrs, m.priority, m.id), 0)

        return len(await self._scan_dead(check_name(queue), None if wanted is None else lambda m: m.id in wanted,
                                         requeue))

    async def purge_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        wanted = None if ids is None else set(ids)

        async def drop(m: Message) -> None:
            return None

        return len(await self._scan_dead(check_name(queue), None if wanted is None else lambda m: m.id in wanted,
                                         drop))

    async def stats(self, queue: str | None = None) -> list[QueueStats]:
        """Depth and consumers from the broker; oldest age by peeking at the head; rates as seen by this client
        (RabbitMQ reports its own rates only through the management plugin)."""
        unreachable = self._unreachable()
        if unreachable is not None:
            raise unreachable
        await self._connect()
        assert self.connection is not None
        names = [check_name(queue)] if queue is not None else sorted(self._declared - {
            n for n in self._declared if n.startswith("shipyard.delay.")})
        out = []
        now = time.time()
        for name in names:
            channel = await self.connection.channel()
            try:
                try:
                    q = await channel.declare_queue(amqp_name(name), passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    raise NotFound(f"no queue {name!r}") from None
                dq = await channel.declare_queue(dead_name(name), passive=True)
                ready = q.declaration_result.message_count or 0
                oldest = 0.0
                head = await q.get(no_ack=False, fail=False) if ready else None
                if head is not None:
                    oldest = max(0.0, now - (header_number((head.headers or {}).get(H_AT)) or now))
                    await head.nack(requeue=True)
                out.append(QueueStats(
                    queue=name, kind="queue", depth=ready, ready=ready, in_flight=0, delayed=0,
                    dead_letters=dq.declaration_result.message_count or 0,
                    consumers=q.declaration_result.consumer_count or 0, oldest_age=oldest,
                    publish_rate=self.published.get(name, RateMeter()).rate(now),
                    ack_rate=self.acked.get(name, RateMeter()).rate(now),
                    max_attempts=self.max_attempts.get(name, DEFAULT_MAX_ATTEMPTS),
                    published_total=self.published.get(name, RateMeter()).total,
                    acked_total=self.acked.get(name, RateMeter()).total,
                ))
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return out

    async def close(self) -> None:
        await cancel_and_wait(self._keeper)
        self._keeper = None
        if self.connection is not None:
            await self.connection.close()
        self.connection = self.channel = None


class RabbitDelivery(Delivery):
    def __init__(self, bus: RabbitBus, consumer: RabbitConsumer, incoming: AbstractIncomingMessage,
                 message: Message) -> None:
        self.bus, self.consumer, self.incoming, self.message = bus, consumer, incoming, message

    async def _settle(self, op: Callable[[], Awaitable[None]]) -> None:
        # After a reconnect the old channel is gone and the broker has already requeued the message.
        with contextlib.suppress(*RETRYABLE):
            await op()

    async def ack(self) -> None:
        await self._settle(self.incoming.ack)
        self.bus._meter(self.bus.acked, self.consumer.queue)

    def _copy(self, extra: dict[str, Any]) -> aio_pika.Message:
        headers = {**dict(self.incoming.headers or {}), **extra}
        headers.pop("x-delivery-count", None)
        headers.pop("x-death", None)
        return self.bus._message(self.incoming.body, headers, self.incoming.priority or 0, self.message.id)

    async def nack(self, delay: float | None = None) -> None:
        max_attempts = self.bus.max_attempts.get(self.consumer.queue, DEFAULT_MAX_ATTEMPTS)
        if self.message.attempts >= max_attempts:
            await self.fail(f"nacked after {self.message.attempts} attempts (max_attempts {max_attempts})")
            return
        wait = backoff_delay(self.message.attempts) if delay is None else max(0.0, float(delay))
        copy = self._copy({H_ATTEMPTS: self.message.attempts})
        await self.bus._retrying(lambda: self.bus._send_to_queue(self.consumer.queue, copy, wait))
        await self._settle(self.incoming.ack)

    async def fail(self, reason: str = "") -> None:
        copy = self._copy({H_ATTEMPTS: self.message.attempts, H_ERROR: (reason or "failed")[:1000],
                           H_FAILED_AT: repr(time.time())})

        async def send() -> None:
            channel = await self.bus._connect()
            await channel.default_exchange.publish(copy, routing_key=dead_name(self.consumer.queue))

        await self.bus._retrying(send)
        await self._settle(self.incoming.ack)


class RabbitConsumer(Consumer):
    """A channel with basic.qos(prefetch) and one basic.consume; aio-pika's robust channel restores both after a
    reconnect, and deliveries from the lost channel are dropped (the broker redelivers them)."""

    amqp_queue: AbstractQueue
    tag: str

    def __init__(self, bus: RabbitBus, queue: str, prefetch: int, channel: AbstractChannel) -> None:
        self.bus, self.queue, self.prefetch, self.channel = bus, queue, prefetch, channel
        self.inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self.closed = False

    async def push(self, incoming: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait(incoming)

    async def get(self, timeout: float | None = None) -> Delivery | None:
        while not self.closed:
            if not self.inbox.empty():
                incoming = self.inbox.get_nowait()  # no timer per message when work is waiting
            else:
                try:
                    incoming = await asyncio.wait_for(self.inbox.get(), timeout)
                except TimeoutError:
                    return None
            if incoming is None:
                return None
            if incoming.channel.is_closed:
                continue  # from a channel lost in a reconnect: already back in the queue
            return self.bus.delivery_of(self, incoming)
        return None

    async def cancel(self) -> None:
        with contextlib.suppress(*RETRYABLE):
            await self.amqp_queue.cancel(self.tag)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.cancel()
        while not self.inbox.empty():
            incoming = self.inbox.get_nowait()
            if incoming is not None and not incoming.channel.is_closed:
                with contextlib.suppress(*RETRYABLE):
                    await incoming.nack(requeue=True)
        self.inbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await self.channel.close()
