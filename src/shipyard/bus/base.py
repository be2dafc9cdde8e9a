"""The message bus contract every backend implements: events by topic, tasks by queue, dead letters, stats.

Pure types and the abstract API; it never talks to a broker and never holds messages itself.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from shipyard.errors import BadRequest, ShipyardError

DEFAULT_PREFETCH = 100
DEFAULT_MAX_ATTEMPTS = 5
# A nack without an explicit delay backs off 1s, 2s, 4s ... capped here.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
# An enqueue repeating an idempotency key within this window is dropped.
IDEMPOTENCY_WINDOW = 24 * 3600.0
MAX_PRIORITY = 9
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


class BusError(ShipyardError):
    status = 503


def check_name(name: str, what: str = "queue") -> str:
    """Queue and subscription names are portable to AMQP and URLs: letters, digits and _ . : -."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"invalid {what} name {name!r}: use 1-200 of A-Z a-z 0-9 _ . : -")
    return name


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic or len(topic) > 255 or "*" in topic or "#" in topic:
        raise BadRequest(f"invalid topic {topic!r}: 1-255 characters, no wildcards")
    return topic


def check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern or len(pattern) > 255:
        raise BadRequest(f"invalid topic pattern {pattern!r}")
    return pattern


def backoff_delay(attempts: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_BASE * (2 ** max(0, attempts - 1)))


@lru_cache(maxsize=65536)
def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic semantics: words split by ".", "*" is exactly one word, "#" is zero or more words."""
    pw, tw = pattern.split("."), topic.split(".")
    # reachable[j]: the pattern prefix consumed so far can match the first j topic words.
    reachable = [True] + [False] * len(tw)
    for word in pw:
        if word == "#":
            for j in range(1, len(tw) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            nxt = [False] * (len(tw) + 1)
            for j in range(len(tw)):
                if reachable[j] and (word == "*" or word == tw[j]):
                    nxt[j + 1] = True
            reachable = nxt
    return reachable[len(tw)]


@dataclass
class Message:
    """A message as a consumer or the dead-letter API sees it."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    topic: str = ""  # set for events, "" for tasks
    priority: int = 0
    attempts: int = 0  # deliveries so far, this one included
    enqueued_at: float = 0.0
    error: str = ""  # why it was dead-lettered
    failed_at: float = 0.0


@dataclass
class QueueStats:
    queue: str
    kind: str  # "queue" (tasks) or "subscription" (events bound by patterns)
    depth: int  # ready + delayed + in flight
    ready: int
    in_flight: int
    delayed: int
    dead_letters: int
    consumers: int
    oldest_age: float  # seconds since the oldest waiting message was enqueued; 0 when empty
    publish_rate: float  # messages/s over the last minute
    ack_rate: float
    patterns: list[str] = field(default_factory=list)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    published_total: int = 0  # since the broker (or, for RabbitMQ, the client reporting) started
    acked_total: int = 0


@dataclass
class Task:
    """One item of a batch enqueue."""

    payload: bytes
    delay: float = 0.0
    priority: int = 0
    idempotency_key: str | None = None
    headers: dict[str, str] | None = None


class Delivery(abc.ABC):
    """One delivery of a message to a consumer; settle it exactly once with ack, nack or fail."""

    message: Message

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def attempts(self) -> int:
        return self.message.attempts

    @abc.abstractmethod
    async def ack(self) -> None: ...

    @abc.abstractmethod
    async def nack(self, delay: float | None = None) -> None:
        """Back to the queue after `delay` seconds (exponential backoff when None); dead after max attempts."""

    @abc.abstractmethod
    async def fail(self, reason: str = "") -> None:
        """Straight to the dead-letter queue."""


class Consumer(abc.ABC):
    """Deliveries of one queue, at most `prefetch` unsettled at a time; iterate with `async for`."""

    queue: str
    prefetch: int

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        delivery = await self.get()
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    @abc.abstractmethod
    async def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; None when the consumer is closed (or on timeout)."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop receiving new deliveries; the ones held can still be settled (graceful shutdown)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; unsettled deliveries go back to the queue."""

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Bus(abc.ABC):
    """Events (publish/subscribe with AMQP topic patterns) and tasks (work queues) with at-least-once delivery."""

    @abc.abstractmethod
    async def publish(self, topic: str, message: bytes, headers: dict[str, str] | None = None) -> None:
        """Returns once the event is durable in every subscription queue it matches."""

    async def publish_many(self, events: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        for topic, message, headers in events:
            await self.publish(topic, message, headers)

    @abc.abstractmethod
    async def subscribe(
        self, patterns: str | Iterable[str], group: str, *, prefetch: int = DEFAULT_PREFETCH
    ) -> Consumer:
        """Binds the durable subscription `group` to the patterns (additive) and consumes from it."""

    @abc.abstractmethod
    async def declare_subscription(self, group: str, patterns: str | Iterable[str]) -> None:
        """Creates the durable subscription without consuming: events from now on are kept for it."""

    @abc.abstractmethod
    async def declare_queue(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None: ...

    @abc.abstractmethod
    async def enqueue(
        self,
        queue: str,
        payload: bytes,
        *,
        delay: float = 0.0,
        priority: int = 0,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str | None:
        """The task's id once it is durable; None when the idempotency key was already used."""

    async def enqueue_many(self, queue: str, tasks: Sequence[Task]) -> list[str | None]:
        return [
            await self.enqueue(
                queue, t.payload, delay=t.delay, priority=t.priority,
                idempotency_key=t.idempotency_key, headers=t.headers,
            )
            for t in tasks
        ]

    @abc.abstractmethod
    async def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer: ...

    @abc.abstractmethod
    async def dead_letters(self, queue: str, limit: int = 100) -> list[Message]: ...

    @abc.abstractmethod
    async def dead_letter(self, queue: str, message_id: str) -> Message: ...

    @abc.abstractmethod
    async def retry_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        """Moves dead letters (all, or these ids) back to the queue with a fresh attempt count."""

    @abc.abstractmethod
    async def purge_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int: ...

    @abc.abstractmethod
    async def stats(self, queue: str | None = None) -> list[QueueStats]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def start(self) -> None:  # noqa: B027 - optional hook: most backends have nothing to start
        """Called once by the server before it says ready: a broker client connects (and keeps trying) here."""

    def status(self) -> dict[str, Any]:
        """The bus's connection state for health checks and `shipyard queues`: backend, address, state
        ("up", "connecting", "reconnecting", "unreachable"), the last error and since when (epoch seconds)."""
        return {"backend": "embedded", "address": "", "state": "up", "error": "", "since": 0.0}


def check_priority(priority: int) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be an integer 0..{MAX_PRIORITY}")
    return priority


def check_delay(delay: float) -> float:
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 366 * 86400:
        raise BadRequest("delay must be a number of seconds between 0 and one year")
    return float(delay)


def check_prefetch(prefetch: int) -> int:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 1 <= prefetch <= 65535:
        raise BadRequest("prefetch must be an integer 1..65535")
    return prefetch


def check_max_attempts(max_attempts: int) -> int:
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or not 1 <= max_attempts <= 1000:
        raise BadRequest("max_attempts must be an integer 1..1000")
    return max_attempts


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BadRequest("headers must be an object of strings")
    return dict(headers)


def patterns_list(patterns: str | Iterable[str]) -> list[str]:
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    if not items:
        raise BadRequest("a subscription needs at least one topic pattern")
    return [check_pattern(p) for p in items]
