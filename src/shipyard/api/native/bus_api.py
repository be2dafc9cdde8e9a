"""The embedded broker over HTTP (/api/v1/bus): publish, enqueue, a WebSocket consume stream, dead letters, stats.

Workers and the SDK reach the bus through here (bus.http_client); it validates input and never owns messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.bus.base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    Bus,
    BusError,
    Message,
    QueueStats,
    Task,
    check_max_attempts,
    check_name,
    check_prefetch,
    patterns_list,
)
from shipyard.bus.embedded import BrokerConsumer, EmbeddedBroker, Entry
from shipyard.errors import BadRequest
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.bus.api")
routes = web.RouteTableDef()

PREFIX = "/api/v1/bus"
MAX_MESSAGE = 1 << 20
MAX_BATCH_BODY = 32 << 20
MAX_BATCH_ITEMS = 10000
DEFAULT_LEASE = 10.0


def bus_of(request: web.Request) -> Bus:
    """The server's bus: the embedded broker, or a RabbitMQ client when the server runs with --bus amqp://."""
    bus = platform_of(request).extras.get("bus")
    if not isinstance(bus, Bus):
        raise BusError("this server has no bus")
    return bus


def broker_of(request: web.Request) -> EmbeddedBroker:
    """Consuming through the server is the embedded broker's transport; RabbitMQ consumers connect to it directly."""
    broker = bus_of(request)
    if not isinstance(broker, EmbeddedBroker):
        raise BusError("this server's bus is RabbitMQ: consume from it directly (the SHIPYARD_BUS_URL of services)")
    return broker


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request, limit: int) -> Any:
    raw = await read_limited(request, limit)
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("request body is not valid JSON", str(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None
    if len(data) > MAX_MESSAGE:
        raise BadRequest(f"{where} exceeds {MAX_MESSAGE} bytes")
    return data


def _list(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key)
    if not isinstance(items, list):
        raise BadRequest(f"{key} must be a list")
    if len(items) > MAX_BATCH_ITEMS:
        raise BadRequest(f"at most {MAX_BATCH_ITEMS} {key} per request")
    return items


def _event(item: Any) -> tuple[str, bytes, Any]:
    if not isinstance(item, dict):
        raise BadRequest("each event must be an object with topic and message")
    topic: Any = item.get("topic")  # checked by the bus (check_topic): a missing one is a 400 there
    return topic, _b64(item.get("message"), "message"), item.get("headers")


def _task(item: Any) -> Task:
    if not isinstance(item, dict):
        raise BadRequest("each task must be an object with a payload")
    key = item.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or len(key) > 512):
        raise BadRequest("idempotency_key must be a string of at most 512 characters")
    return Task(_b64(item.get("payload"), "payload"), item.get("delay", 0.0), item.get("priority", 0), key,
                item.get("headers"))


def message_json(m: Message) -> dict[str, Any]:
    d = asdict(m)
    d["body"] = base64.b64encode(m.body).decode()
    return d


def delivery_json(e: Entry) -> dict[str, Any]:
    return {"tag": e.tag, "id": str(e.id), "queue": e.queue, "topic": e.topic,
            "body": base64.b64encode(e.body).decode(), "headers": e.headers, "priority": e.priority,
            "attempts": e.attempts, "enqueued_at": e.enqueued_at}


def _queue(request: web.Request) -> str:
    return check_name(request.match_info["queue"])


def _ids(data: dict[str, Any]) -> list[str] | None:
    ids = data.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str | int) for i in ids):
        raise BadRequest("ids must be a list of message ids")
    return [str(i) for i in ids]


@routes.post(PREFIX + "/publish")
async def publish(request: web.Request) -> web.Response:
    data = await _body(request, MAX_MESSAGE * 2)
    await bus_of(request).publish_many([_event(data)])
    return _json({"published": 1})


@routes.post(PREFIX + "/publish/batch")
async def publish_batch(request: web.Request) -> web.Response:
    data = await _body(request, MAX_BATCH_BODY)
    events = [_event(item) for item in _list(data, "events")]
    await bus_of(request).publish_many(events)
    return _json({"published": len(events)})


@routes.get(PREFIX + "/status")
async def bus_status(request: web.Request) -> web.Response:
    """Which bus, where, and whether it is reachable (`shipyard queues` shows it above the table)."""
    return _json(bus_of(request).status())


@routes.get(PREFIX + "/queues")
async def list_queues(request: web.Request) -> web.Response:
    return _json([asdict(s) for s in await bus_of(request).stats()])


# (name, type, help, QueueStats attribute) of each metric family GET /api/v1/bus/metrics exposes, per queue.
METRICS = (
    ("shipyard_bus_queue_depth", "gauge", "Messages in the queue: ready, delayed and in flight.", "depth"),
    ("shipyard_bus_queue_ready", "gauge", "Messages ready for delivery.", "ready"),
    ("shipyard_bus_queue_in_flight", "gauge", "Messages delivered and not yet settled.", "in_flight"),
    ("shipyard_bus_queue_delayed", "gauge", "Messages waiting for their delay or backoff.", "delayed"),
    ("shipyard_bus_queue_oldest_age_seconds", "gauge", "Age of the oldest waiting message.", "oldest_age"),
    ("shipyard_bus_queue_consumers", "gauge", "Consumers attached to the queue.", "consumers"),
    ("shipyard_bus_dead_letters", "gauge", "Messages in the queue's dead-letter queue.", "dead_letters"),
    ("shipyard_bus_published_total", "counter", "Messages published or enqueued into the queue.", "published_total"),
    ("shipyard_bus_acked_total", "counter", "Messages acknowledged by consumers of the queue.", "acked_total"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(stats: list[QueueStats]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of the queues' figures."""
    lines: list[str] = []
    for metric, kind, help_text, attr in METRICS:
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {kind}")
        for s in stats:
            value = getattr(s, attr)
            text = repr(float(value)) if isinstance(value, float) else str(int(value))
            lines.append(f'{metric}{{queue="{_label(s.queue)}",kind="{_label(s.kind)}"}} {text}')
    return "\n".join(lines) + "\n"


@routes.get(PREFIX + "/metrics")
async def metrics(request: web.Request) -> web.Response:
    text = metrics_text(await bus_of(request).stats())
    return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.get(PREFIX + "/queues/{queue}")
async def queue_stats(request: web.Request) -> web.Response:
    return _json(asdict((await bus_of(request).stats(_queue(request)))[0]))


@routes.put(PREFIX + "/queues/{queue}")
async def declare_queue(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, 65536)
    await bus_of(request).declare_queue(queue, max_attempts=check_max_attempts(
        data.get("max_attempts", DEFAULT_MAX_ATTEMPTS)))
    return _json(asdict((await bus_of(request).stats(queue))[0]))


@routes.put(PREFIX + "/subscriptions/{queue}")
async def declare_subscription(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, 65536)
    await bus_of(request).declare_subscription(queue, patterns_list(data.get("patterns") or []))
    return _json(asdict((await bus_of(request).stats(queue))[0]))


@routes.post(PREFIX + "/queues/{queue}/enqueue")
async def enqueue(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, MAX_MESSAGE * 2)
    [mid] = await bus_of(request).enqueue_many(queue, [_task(data)])
    return _json({"id": mid, "duplicate": mid is None})


@routes.post(PREFIX + "/queues/{queue}/enqueue/batch")
async def enqueue_batch(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, MAX_BATCH_BODY)
    tasks = [_task(item) for item in _list(data, "tasks")]
    return _json({"ids": await bus_of(request).enqueue_many(queue, tasks)})


def _settles(data: dict[str, Any]) -> dict[str, list[Any]]:
    """Validates {"ack": [tag], "nack": [[tag, delay|null]], "fail": [[tag, reason]], "release": [tag]}."""
    out: dict[str, list[Any]] = {}
    for key in ("ack", "release"):
        if key in data:
            items = _list(data, key)
            if not all(isinstance(t, str) for t in items):
                raise BadRequest(f"{key} must be a list of delivery tags")
            out[key + "s"] = items
    for key, kinds in (("nack", (int, float, type(None))), ("fail", (str,))):
        if key in data:
            items = _list(data, key)
            if not all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], kinds)
                       and not isinstance(t[1], bool) for t in items):
                raise BadRequest(f"{key} must be a list of [tag, {'delay' if key == 'nack' else 'reason'}] pairs")
            out[key + "s"] = [(t, v) for t, v in items]
    return out


@routes.post(PREFIX + "/queues/{queue}/settle")
async def settle(request: web.Request) -> web.Response:
    """Acks, nacks and fails deliveries by tag, outside the stream that received them."""
    queue, data = _queue(request), await _body(request, MAX_BATCH_BODY)
    return _json({"settled": broker_of(request).settle_any(queue, **_settles(data))})


@routes.get(PREFIX + "/queues/{queue}/dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= 10000:
        raise BadRequest("limit must be 1..10000")
    items = await bus_of(request).dead_letters(_queue(request), limit)
    return _json([message_json(m) for m in items])


@routes.get(PREFIX + "/queues/{queue}/dead-letters/{id}")
async def dead_letter(request: web.Request) -> web.Response:
    return _json(message_json(await bus_of(request).dead_letter(_queue(request), request.match_info["id"])))


@routes.post(PREFIX + "/queues/{queue}/dead-letters/retry")
async def retry_dead_letters(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, MAX_BATCH_BODY)
    return _json({"retried": await bus_of(request).retry_dead_letters(queue, _ids(data))})


@routes.post(PREFIX + "/queues/{queue}/dead-letters/purge")
async def purge_dead_letters(request: web.Request) -> web.Response:
    queue, data = _queue(request), await _body(request, MAX_BATCH_BODY)
    return _json({"purged": await bus_of(request).purge_dead_letters(queue, _ids(data))})


def _float_query(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


@routes.get(PREFIX + "/queues/{queue}/consume")
async def consume(request: web.Request) -> web.StreamResponse:
    """WebSocket: the server sends {"deliveries": [...]} while fewer than `prefetch` are unsettled; the client
    sends settle frames (see _settles), {"cancel": true}, and "seq": n when it wants {"settled": n} back.
    The connection is the consumer's lease: when it drops or misses heartbeats for `lease` seconds, what it
    held is redelivered to others."""
    broker, queue = broker_of(request), _queue(request)
    try:
        prefetch = check_prefetch(int(request.query.get("prefetch", DEFAULT_PREFETCH)))
    except ValueError:
        raise BadRequest("prefetch must be an integer") from None
    lease = _float_query(request, "lease", DEFAULT_LEASE, 1.0, 3600.0)
    patterns = patterns_list(request.query.getall("pattern")) if "pattern" in request.query else None
    ws = web.WebSocketResponse(heartbeat=lease / 2, max_msg_size=MAX_BATCH_BODY)
    await ws.prepare(request)
    outbox: list[Entry] = []
    wake = asyncio.Event()
    closing = False
    settled_seq: int | None = None  # the client's last settle frame processed, reported back when it asks

    def push(entries: list[Entry]) -> None:
        nonlocal closing
        if not entries:  # the broker is closing
            closing = True
        outbox.extend(entries)
        wake.set()

    consumer: BrokerConsumer = await broker.attach(queue, prefetch, push, patterns)

    async def send_deliveries() -> None:
        nonlocal outbox, settled_seq
        while not ws.closed:
            await wake.wait()
            wake.clear()
            frame: dict[str, Any] = {}
            if outbox:
                batch, outbox = outbox, []
                frame["deliveries"] = [delivery_json(e) for e in batch]
            if settled_seq is not None:
                frame["settled"], settled_seq = settled_seq, None
            if frame:
                await ws.send_bytes(orjson.dumps(frame))
            if closing:
                await ws.close()
                return

    sender = asyncio.create_task(send_deliveries())
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            try:
                data = orjson.loads(msg.data)
                if not isinstance(data, dict):
                    raise BadRequest("frames must be JSON objects")
                if data.get("cancel"):
                    broker.cancel(consumer)
                broker.settle(consumer, **_settles(data))
                if isinstance(data.get("seq"), int):
                    settled_seq = data["seq"]
                    wake.set()
            except (orjson.JSONDecodeError, BadRequest) as exc:
                await ws.send_bytes(orjson.dumps({"error": "bad frame", "detail": str(exc)}))
    finally:
        await cancel_and_wait(sender)
        broker.detach(consumer)
    return ws
