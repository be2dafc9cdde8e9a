"""Background work in a service: BusApp declares task handlers (@bus.task) and event subscribers (@bus.subscribe),
enqueues and publishes; Worker runs the handlers with acks, retries, dead letters and graceful shutdown.

It reaches the bus only through shipyard.bus clients (HTTP to a server's embedded broker, AMQP to RabbitMQ) and
the server only over HTTP; it never imports the server's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson

from shipyard.bus import Bus, Consumer, Delivery, Message, bus_from_url
from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    check_max_attempts,
    check_name,
    check_prefetch,
    patterns_list,
)
from shipyard.errors import BadRequest
from shipyard.sdk.server_api import control_verify, server_url
from shipyard.tokens import token_headers

__all__ = ["BusApp", "Fail", "Handler", "Reject", "Retry", "Worker", "decode_payload", "encode_payload"]

log = logging.getLogger("shipyard.worker")
CONTENT_TYPE = "content-type"
JSON, TEXT = "application/json", "text/plain; charset=utf-8"
DEFAULT_STOP_GRACE = 5.0


class Reject(Exception):
    """Raise from a handler to send the message straight to the dead-letter queue (no more attempts)."""


Fail = Reject


class Retry(Exception):
    """Raise from a handler to put the message back after `delay` seconds (exponential backoff when None)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or (f"retry in {delay}s" if delay is not None else "retry"))
        self.delay = delay


def encode_payload(payload: Any, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """bytes travel as they are; str as UTF-8 text; anything else as JSON. The content-type header says which."""
    out = dict(headers or {})
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), out
    if isinstance(payload, str):
        out.setdefault(CONTENT_TYPE, TEXT)
        return payload.encode(), out
    try:
        body = orjson.dumps(payload)
    except TypeError as exc:
        raise BadRequest(f"payload is not bytes, str or JSON-serialisable: {exc}") from None
    out.setdefault(CONTENT_TYPE, JSON)
    return body, out


def decode_payload(message: Message) -> Any:
    kind = message.headers.get(CONTENT_TYPE, "")
    if kind.startswith(JSON):
        return orjson.loads(message.body)
    if kind.startswith("text/"):
        return message.body.decode()
    return message.body


@dataclass
class Handler:
    """One decorated function and where its messages come from."""

    kind: str  # "task" (a work queue) or "subscription" (events bound by topic patterns)
    name: str  # the queue, or the subscription group
    fn: Callable[..., Any]
    prefetch: int
    max_attempts: int
    patterns: list[str] = field(default_factory=list)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @property
    def wants_message(self) -> bool:
        try:
            return "message" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False

    def arguments(self, message: Message) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (decode_payload(message),), ({"message": message} if self.wants_message else {})


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class BusApp:
    """`bus = BusApp()`; `@bus.task("transcode")`, `@bus.subscribe("assets.*", group="search-indexer")`;
    `await bus.enqueue("transcode", {...})`, `await bus.publish("assets.created", {...})`.

    The bus is found at `url`, else $SHIPYARD_BUS_URL (set for every instance the platform starts)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self.handlers: list[Handler] = []
        self._bus: Bus | None = None

    # ---- declaring handlers ------------------------------------------------------------------------

    def task(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, prefetch: int = 1
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Handles tasks of `queue`, up to `prefetch` at once. Return: done (ack). Raise: tried again with
        backoff, dead after `max_attempts`. Raise Reject: dead at once. Raise Retry(delay): again after delay."""
        check_name(queue)
        check_max_attempts(max_attempts)
        check_prefetch(prefetch)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._add(Handler("task", queue, fn, prefetch, max_attempts))
            return fn

        return register

    def subscribe(self, patterns: str | Iterable[str], *, group: str, prefetch: int = 10,
                  max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Handles events whose topic matches `patterns` ("assets.*", "#"). Each group gets every event once;
        the instances of one group share them. Settled like tasks."""
        plist = patterns_list(patterns)
        check_name(group, "subscription")
        check_max_attempts(max_attempts)
        check_prefetch(prefetch)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._add(Handler("subscription", group, fn, prefetch, max_attempts, plist))
            return fn

        return register

    def _add(self, handler: Handler) -> None:
        if any(h.name == handler.name for h in self.handlers):
            raise BadRequest(f"{handler.name!r} already has a handler in this app")
        self.handlers.append(handler)

    # ---- talking to the bus ------------------------------------------------------------------------

    def resolve_url(self, url: str | None = None) -> str:
        found = url or self.url or os.environ.get("SHIPYARD_BUS_URL")
        if not found:
            raise BadRequest("no bus URL: pass one, or set SHIPYARD_BUS_URL (the platform sets it for its services)")
        return found

    async def connect(self, url: str | None = None) -> Bus:
        if self._bus is None:
            self.url = self.resolve_url(url)
            self._bus = bus_from_url(self.url)
        return self._bus

    async def enqueue(self, queue: str, payload: Any, *, delay: float = 0.0, priority: int = 0,
                      idempotency_key: str | None = None, headers: dict[str, str] | None = None) -> str | None:
        """The task's id once it is durable; None when `idempotency_key` was used before."""
        body, hdrs = encode_payload(payload, headers)
        bus = await self.connect()
        return await bus.enqueue(queue, body, delay=delay, priority=priority, idempotency_key=idempotency_key,
                                 headers=hdrs)

    async def publish(self, topic: str, message: Any, *, headers: dict[str, str] | None = None) -> None:
        """Returns once the event is durable in every subscription it matches."""
        body, hdrs = encode_payload(message, headers)
        bus = await self.connect()
        await bus.publish(topic, body, hdrs)

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()
            self._bus = None


class Worker:
    """Runs a BusApp's handlers until `stop` is set, then stops taking work, lets in-flight handlers finish for up to
    `stop_grace` seconds, and gives back (unsettled, so the broker redelivers them) those still running."""

    def __init__(self, app: BusApp, *, url: str | None = None, stop_grace: float = DEFAULT_STOP_GRACE,
                 server_addr: str | None = None) -> None:
        if not app.handlers:
            raise BadRequest("the app has no @task or @subscribe handlers to run")
        self.app, self.url, self.stop_grace, self.server_addr = app, url, max(0.0, stop_grace), server_addr
        self.consumers: dict[str, Consumer] = {}
        self.inflight: set[asyncio.Task[None]] = set()
        self.sync_running = 0
        sync_slots = sum(h.prefetch for h in app.handlers if not h.is_async)
        self.executor = ThreadPoolExecutor(max_workers=max(1, sync_slots), thread_name_prefix="shipyard-handler")

    async def declare(self, bus: Bus) -> None:
        for h in self.app.handlers:
            if h.kind == "subscription":
                await bus.declare_subscription(h.name, h.patterns)
            await bus.declare_queue(h.name, max_attempts=h.max_attempts)

    async def register_with_server(self) -> None:
        """With RabbitMQ the server cannot list queues by itself: tell it ours, so `shipyard queues`, metrics
        and autoscaling see them (an embedded bus knows them already). Retried until the server answers."""
        assert self.app.url is not None
        if not self.server_addr or urlsplit(self.app.url).scheme in ("http", "https"):
            return
        base = server_url(self.server_addr)
        delay = 0.5
        while True:
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=token_headers(),
                                                 connector=aiohttp.TCPConnector(ssl=control_verify(base))) as session:
                    for h in self.app.handlers:
                        name = quote(h.name, safe="")
                        if h.kind == "subscription":
                            async with session.put(f"{base}/api/v1/bus/subscriptions/{name}",
                                                   json={"patterns": h.patterns}) as resp:
                                resp.raise_for_status()
                        async with session.put(f"{base}/api/v1/bus/queues/{name}",
                                               json={"max_attempts": h.max_attempts}) as resp:
                            resp.raise_for_status()
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                if delay == 0.5:
                    log.warning("cannot register queues with the shipyard server at %s yet: %s", base, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def run(self, stop: asyncio.Event) -> None:
        bus = await self.app.connect(self.url)
        await self.declare(bus)
        for h in self.app.handlers:
            if h.kind == "subscription":
                self.consumers[h.name] = await bus.subscribe(h.patterns, h.name, prefetch=h.prefetch)
            else:
                self.consumers[h.name] = await bus.consume(h.name, prefetch=h.prefetch)
        log.info("worker ready on %s: tasks %s, subscriptions %s", redact(self.app.url or ""),
                 [h.name for h in self.app.handlers if h.kind == "task"],
                 [f"{h.name} ({', '.join(h.patterns)})" for h in self.app.handlers if h.kind == "subscription"])
        takers = [asyncio.create_task(self._take(h, self.consumers[h.name])) for h in self.app.handlers]
        registering = asyncio.create_task(self.register_with_server())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *takers], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        registering.cancel()
        await self.shutdown(takers)

    async def _take(self, handler: Handler, consumer: Consumer) -> None:
        while True:
            delivery = await consumer.get()
            if delivery is None:
                return  # the consumer was closed
            task = asyncio.create_task(self._handle(handler, delivery))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _handle(self, handler: Handler, delivery: Delivery) -> None:
        message = delivery.message
        started = time.monotonic()
        try:
            args, kwargs = handler.arguments(message)
            if handler.is_async:
                await handler.fn(*args, **kwargs)
            else:
                await self._in_thread(handler.fn, args, kwargs)
        except Reject as exc:
            log.warning("%s: message %s rejected: %s", handler.name, message.id, exc)
            await self._settle(delivery.fail(str(exc) or "rejected"))
        except Retry as exc:
            await self._settle(delivery.nack(exc.delay))
        except asyncio.CancelledError:
            raise  # shutting down past the grace period: left unsettled, the broker gives it to another worker
        except Exception as exc:
            log.exception("%s: message %s failed on attempt %d", handler.name, message.id, message.attempts)
            if message.attempts >= handler.max_attempts:
                await self._settle(delivery.fail(f"{type(exc).__name__}: {exc}"))
            else:
                await self._settle(delivery.nack())
        else:
            await self._settle(delivery.ack())
            log.debug("%s: message %s done in %.3fs", handler.name, message.id, time.monotonic() - started)

    async def _in_thread(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.sync_running += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))
            # A thread can't be interrupted: on cancellation, stop waiting and let the process exit past it.
            await asyncio.shield(future)
        finally:
            self.sync_running -= 1

    async def _settle(self, settle: Awaitable[None]) -> None:
        try:
            await settle
        except Exception as exc:  # the broker is away: the message comes back to someone (at-least-once)
            log.warning("could not settle a message: %s", exc)

    async def shutdown(self, takers: list[asyncio.Task[None]]) -> None:
        """Stop taking work; finish in-flight work within stop_grace; give back the rest; close."""
        log.info("worker stopping: %d in flight, up to %.1fs to finish", len(self.inflight), self.stop_grace)
        for consumer in self.consumers.values():
            with contextlib.suppress(Exception):
                await consumer.cancel()
        for taker in takers:
            taker.cancel()
        await asyncio.gather(*takers, return_exceptions=True)
        if self.inflight:
            # Part of the grace is kept for giving back what is unfinished, so the whole stop fits in it.
            await asyncio.wait(list(self.inflight), timeout=self.stop_grace - min(1.0, 0.2 * self.stop_grace))
        unfinished = [t for t in self.inflight if not t.done()]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            log.warning("worker gave back %d unfinished messages for redelivery", len(unfinished))
        for consumer in self.consumers.values():
            with contextlib.suppress(Exception):
                await consumer.close()  # unsettled deliveries go back to the queue
        await self.app.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
