"""The bus as a client of a `shipyard server` (embedded broker) over /api/v1/bus: what workers and the SDK use.

Coalesces concurrent publishes into batch requests and consumes over a WebSocket; it never polls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    Bus,
    BusError,
    Consumer,
    Delivery,
    Message,
    QueueStats,
    Task,
    check_delay,
    check_headers,
    check_name,
    check_prefetch,
    check_priority,
    check_topic,
    patterns_list,
)
from shipyard.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ShipyardError
from shipyard.tls.contexts import ClientTls
from shipyard.tokens import token_headers

log = logging.getLogger("shipyard.bus.http")
BATCH = 1000  # events per publish request
MAX_INFLIGHT = 4  # concurrent publish requests from one client
_ERRORS: dict[int, type[ShipyardError]] = {400: BadRequest, 404: NotFound, 409: Conflict, 413: PayloadTooLarge}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _message(d: dict[str, Any]) -> Message:
    return Message(d["id"], d["queue"], base64.b64decode(d["body"]), d.get("headers") or {}, d.get("topic", ""),
                   d.get("priority", 0), d.get("attempts", 0), d.get("enqueued_at", 0.0), d.get("error", ""),
                   d.get("failed_at", 0.0))


def _task_json(t: Task) -> dict[str, Any]:
    return {"payload": _b64(t.payload), "delay": t.delay, "priority": t.priority,
            "idempotency_key": t.idempotency_key, "headers": t.headers}


class HttpBus(Bus):
    """Bus backend for `http://host:port`. Requests that fail to reach the server are retried for `retry_for`
    seconds (a server restarting); a publish that is retried may be stored twice (at-least-once)."""

    def __init__(self, url: str, *, retry_for: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/api/v1/bus"
        self.retry_for = retry_for
        self._session: aiohttp.ClientSession | None = None
        self._pending: dict[str, list[tuple[dict[str, Any], asyncio.Future[Any]]]] = {}
        self._inflight: dict[str, int] = {}
        self._consumers: set[HttpConsumer] = set()
        self._flushers: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # https: the CA and client certificate of SHIPYARD_/CONSUL_CACERT, _CLIENT_CERT, _CLIENT_KEY
                connector=aiohttp.TCPConnector(limit=64, ssl=ClientTls.from_env().httpx_verify(self.url)),
                timeout=aiohttp.ClientTimeout(total=None, connect=5),
                json_serialize=lambda o: orjson.dumps(o).decode(), headers=token_headers(),
            )
        return self._session

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                async with self.session.request(
                    method, self.url + path, data=data, headers={"Content-Type": "application/json"}
                ) as resp:
                    raw = await resp.read()
                    if resp.status < 300:
                        return orjson.loads(raw) if raw else None
                    try:
                        err = orjson.loads(raw)
                        message, detail = err.get("error", raw.decode()), err.get("detail")
                    except (orjson.JSONDecodeError, AttributeError):
                        message, detail = raw.decode(errors="replace"), None
                    if resp.status >= 500 and time.monotonic() < deadline:
                        raise aiohttp.ClientConnectionError(message)
                    raise _ERRORS.get(resp.status, BusError)(message, detail, status=resp.status)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if time.monotonic() >= deadline:
                    raise BusError(f"bus at {self.url} unreachable", str(exc)) from None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    # -- events -------------------------------------------------------------------------------------------------

    async def publish(self, topic: str, message: bytes, headers: dict[str, str] | None = None) -> None:
        """Joins the next batch request; returns when the server has made that batch durable."""
        # Checked here so one caller's bad input can't fail the batch it would share with others.
        check_topic(topic)
        check_headers(headers)
        await self._batched("/publish/batch", "events", {"topic": topic, "message": _b64(message), "headers": headers})

    async def _batched(self, path: str, key: str, item: dict[str, Any]) -> Any:
        """Concurrent calls share requests: up to BATCH items each, MAX_INFLIGHT requests per path at once."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(path, []).append((item, fut))
        if self._inflight.get(path, 0) < MAX_INFLIGHT:
            self._inflight[path] = self._inflight.get(path, 0) + 1
            task = asyncio.create_task(self._flush(path, key))
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await fut

    async def _flush(self, path: str, key: str) -> None:
        pending = self._pending[path]
        try:
            while pending:
                batch = pending[:BATCH]
                del pending[:BATCH]
                try:
                    answer = await self.request("POST", path, {key: [item for item, _ in batch]})
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else BusError("cancelled"))
                    if not isinstance(exc, Exception):
                        raise
                else:
                    results = answer.get("ids") or [None] * len(batch)
                    for (_, fut), result in zip(batch, results, strict=True):
                        if not fut.done():
                            fut.set_result(result)
        finally:
            self._inflight[path] -= 1

    async def publish_many(self, events: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        items = [{"topic": t, "message": _b64(m), "headers": h} for t, m, h in events]
        chunks = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
        sem = asyncio.Semaphore(MAX_INFLIGHT)

        async def send(chunk: list[dict[str, Any]]) -> None:
            async with sem:
                await self.request("POST", "/publish/batch", {"events": chunk})

        await asyncio.gather(*(send(c) for c in chunks))

    async def declare_subscription(self, group: str, patterns: str | Iterable[str]) -> None:
        await self.request("PUT", f"/subscriptions/{quote(check_name(group), safe='')}",
                           {"patterns": patterns_list(patterns)})

    async def subscribe(self, patterns: str | Iterable[str], group: str, *,
                        prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        await self.declare_subscription(group, patterns)
        return await self.consume(group, prefetch=prefetch)

    # -- tasks --------------------------------------------------------------------------------------------------

    async def declare_queue(self, queue: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        await self.request("PUT", f"/queues/{quote(check_name(queue), safe='')}", {"max_attempts": max_attempts})

    async def enqueue(self, queue: str, payload: bytes, *, delay: float = 0.0, priority: int = 0,
                      idempotency_key: str | None = None, headers: dict[str, str] | None = None) -> str | None:
        check_delay(delay)
        check_priority(priority)
        check_headers(headers)
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or len(idempotency_key) > 512):
            raise BadRequest("idempotency_key must be a string of at most 512 characters")
        item = _task_json(Task(payload, delay, priority, idempotency_key, headers))
        return await self._batched(f"/queues/{quote(check_name(queue), safe='')}/enqueue/batch", "tasks", item)

    async def enqueue_many(self, queue: str, tasks: Sequence[Task]) -> list[str | None]:
        path = f"/queues/{quote(check_name(queue), safe='')}/enqueue/batch"
        ids: list[str | None] = []
        for i in range(0, len(tasks), BATCH):
            ids += (await self.request("POST", path, {"tasks": [_task_json(t) for t in tasks[i:i + BATCH]]}))["ids"]
        return ids

    async def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        consumer = HttpConsumer(self, check_name(queue), check_prefetch(prefetch))
        await consumer.connect()
        return consumer

    # -- dead letters and stats ---------------------------------------------------------------------------------

    def _q(self, queue: str) -> str:
        return "/queues/" + quote(check_name(queue), safe="")

    async def _read_own_settles(self) -> None:
        # Settles travel on the consumers' streams; a later request on another connection must see them.
        await asyncio.gather(*(c.sync() for c in list(self._consumers)))

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        await self._read_own_settles()
        return [_message(d) for d in await self.request("GET", f"{self._q(queue)}/dead-letters?limit={limit}")]

    async def dead_letter(self, queue: str, message_id: str) -> Message:
        await self._read_own_settles()
        return _message(await self.request("GET", f"{self._q(queue)}/dead-letters/{quote(str(message_id), safe='')}"))

    async def retry_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        await self._read_own_settles()
        body = {} if ids is None else {"ids": list(ids)}
        return (await self.request("POST", f"{self._q(queue)}/dead-letters/retry", body))["retried"]

    async def purge_dead_letters(self, queue: str, ids: Iterable[str] | None = None) -> int:
        await self._read_own_settles()
        body = {} if ids is None else {"ids": list(ids)}
        return (await self.request("POST", f"{self._q(queue)}/dead-letters/purge", body))["purged"]

    async def stats(self, queue: str | None = None) -> list[QueueStats]:
        await self._read_own_settles()
        if queue is None:
            return [QueueStats(**d) for d in await self.request("GET", "/queues")]
        return [QueueStats(**await self.request("GET", self._q(queue)))]

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.close()
        if self._session is not None:
            await self._session.close()


class HttpDelivery(Delivery):
    def __init__(self, consumer: HttpConsumer, generation: int, data: dict[str, Any]) -> None:
        self.consumer, self.generation, self.tag = consumer, generation, data["tag"]
        self.message = Message(data["id"], data["queue"], base64.b64decode(data["body"]), data.get("headers") or {},
                               data.get("topic", ""), data.get("priority", 0), data.get("attempts", 0),
                               data.get("enqueued_at", 0.0))

    # Settles are sent in batches without waiting for the server, like AMQP's basic.ack: a lost settle means
    # the message is delivered again (at-least-once).
    async def ack(self) -> None:
        self.consumer.settle(self, "ack", self.tag)

    # A nack or a fail is rare and often followed by a look at the dead letters: it waits for the server.
    async def nack(self, delay: float | None = None) -> None:
        self.consumer.settle(self, "nack", [self.tag, delay])
        await self.consumer.sync()

    async def fail(self, reason: str = "") -> None:
        self.consumer.settle(self, "fail", [self.tag, reason])
        await self.consumer.sync()


class HttpConsumer(Consumer):
    """One WebSocket per consumer; reconnects with backoff when the server goes away (what it held is
    redelivered by the server, so settles from an older connection are dropped)."""

    def __init__(self, bus: HttpBus, queue: str, prefetch: int, *, lease: float = 10.0) -> None:
        self.bus, self.queue, self.prefetch, self.lease = bus, queue, prefetch, lease
        self.inbox: asyncio.Queue[HttpDelivery | None] = asyncio.Queue()
        self.outbox: dict[str, list[Any]] = {}
        self.wake = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.generation = 0
        self.closed = False
        self.cancelled = False
        self.runner: asyncio.Task[None] | None = None
        self.seq = 0  # settle frames that asked for a receipt
        self.receipt = 0
        self.receipts = asyncio.Condition()

    async def _open(self) -> None:
        url = f"{self.bus.url}/queues/{quote(self.queue, safe='')}/consume?prefetch={self.prefetch}&lease={self.lease}"
        self.ws = await self.bus.session.ws_connect(url, heartbeat=self.lease / 2, max_msg_size=64 << 20)
        self.generation += 1
        self.outbox = {}

    async def connect(self) -> None:
        await self._open()
        self.bus._consumers.add(self)
        self.runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        delay = 0.05
        while not self.closed:
            if self.ws is None or self.ws.closed:
                try:
                    await self._open()
                    if self.cancelled:
                        await self.ws.send_bytes(b'{"cancel": true}')  # type: ignore[union-attr]
                    delay = 0.05
                except (TimeoutError, aiohttp.ClientError, OSError):
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
            sender = asyncio.create_task(self._send_settles(self.ws))  # type: ignore[arg-type]
            try:
                await self._read(self.ws)  # type: ignore[arg-type]
            finally:
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
                async with self.receipts:
                    self.receipts.notify_all()  # sync() waiters: their settles died with the connection

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        generation = self.generation
        async for msg in ws:
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            data = orjson.loads(msg.data)
            if "settled" in data:
                async with self.receipts:
                    self.receipt = data["settled"]
                    self.receipts.notify_all()
            if "error" in data:
                log.warning("bus server rejected a frame: %s", data.get("detail"))
            for d in data.get("deliveries", ()):
                self.inbox.put_nowait(HttpDelivery(self, generation, d))

    async def _send_settles(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            await self.wake.wait()
            self.wake.clear()
            if self.outbox:
                frame, self.outbox = self.outbox, {}
                await ws.send_bytes(orjson.dumps(frame))

    def settle(self, delivery: HttpDelivery, kind: str, item: Any) -> None:
        if delivery.generation != self.generation:
            return  # its connection is gone; the server has already put it back
        self.outbox.setdefault(kind, []).append(item)
        self.wake.set()

    async def sync(self) -> None:
        """Returns once the server has processed every settle sent so far (or the connection was lost)."""
        if self.closed or self.ws is None or self.ws.closed:
            return
        self.seq += 1
        target, generation = self.seq, self.generation
        self.outbox["seq"] = target  # type: ignore[assignment]
        self.wake.set()
        async with self.receipts:
            await self.receipts.wait_for(
                lambda: self.receipt >= target or self.generation != generation or self.closed
                or self.ws is None or self.ws.closed
            )

    async def get(self, timeout: float | None = None) -> Delivery | None:
        if self.closed:
            return None
        if not self.inbox.empty():
            return self.inbox.get_nowait()  # no timer per message when work is waiting
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None

    async def cancel(self) -> None:
        self.cancelled = True
        self.outbox["cancel"] = True  # type: ignore[assignment]
        self.wake.set()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bus._consumers.discard(self)
        unstarted = []
        while not self.inbox.empty():
            d = self.inbox.get_nowait()
            if d is not None and d.generation == self.generation:
                unstarted.append(d.tag)
        self.inbox.put_nowait(None)
        if self.ws is not None and not self.ws.closed:
            if unstarted:
                self.outbox.setdefault("release", []).extend(unstarted)
            with contextlib.suppress(Exception):
                if self.outbox:
                    frame, self.outbox = self.outbox, {}
                    await self.ws.send_bytes(orjson.dumps(frame))
                await self.ws.close()
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(BaseException):
                await self.runner
