"""The bus contract, the same cases against both backends: the embedded broker of a real `shipyard server`
(over HTTP) and the RabbitMQ on this machine; plus kill -9 of consumers, of the server and a broker restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
import requests

from shipyard.bus import Bus, bus_from_url
from shipyard.bus.base import Task
from shipyard.bus.rabbitmq import amqp_name, dead_name
from support import ServerProcess, need_peer, rabbit_up

RABBIT_URL = "rabbitmq://guest:guest@127.0.0.1:5672/"


def name(prefix: str) -> str:
    return f"t-{prefix}-{uuid.uuid4().hex[:8]}"


class Names:
    """Queue names of one test, deleted from RabbitMQ afterwards so runs leave nothing behind."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def __call__(self, prefix: str) -> str:
        self.used.append(name(prefix))
        return self.used[-1]


@pytest.fixture(params=["embedded", "rabbitmq"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Bus, Names]]:
    names = Names()
    if request.param == "rabbitmq":
        need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
        url = RABBIT_URL
    else:
        url = request.getfixturevalue("server").url
    bus = bus_from_url(url)
    yield url, bus, names
    await bus.close()
    if request.param == "rabbitmq":
        connection = await aio_pika.connect(RABBIT_URL.replace("rabbitmq", "amqp"))
        channel = await connection.channel()
        for n in names.used:
            for q in (amqp_name(n), dead_name(n)):
                await channel.queue_delete(q)
        await connection.close()


async def drain(consumer, count: int, timeout: float = 20.0) -> list:  # type: ignore[no-untyped-def]
    got = []
    while len(got) < count:
        d = await consumer.get(timeout)
        assert d is not None, f"only {len(got)} of {count} deliveries arrived"
        got.append(d)
    return got


async def test_events_reach_every_subscription_once_and_instances_share_the_load(backend) -> None:
    _, bus, names = backend
    g1, g2, g3 = names("g1"), names("g2"), names("g3")
    await bus.declare_subscription(g1, ["assets.*"])
    await bus.declare_subscription(g2, "#")
    await bus.declare_subscription(g3, ["other.*"])
    a = await bus.subscribe("assets.*", g1, prefetch=5)
    b = await bus.subscribe("assets.*", g1, prefetch=5)
    await bus.publish_many([("assets.created", f"e{i}".encode(), {"n": str(i)}) for i in range(20)])
    await bus.publish("assets.deep.path", b"deep")
    # Both instances are attached before the events: each gets its prefetch window of them.
    first_a, first_b = await drain(a, 1), await drain(b, 1)
    seen = [first_a[0], first_b[0]]
    for d in seen:
        await d.ack()
    rest: list = []
    while len(seen) + len(rest) < 20:
        for c in (a, b):
            d = await c.get(0.2)
            if d is not None:
                rest.append(d)
                await d.ack()
    bodies = sorted(d.body for d in seen + rest)
    assert bodies == sorted(f"e{i}".encode() for i in range(20))
    assert {d.message.topic for d in seen + rest} == {"assets.created"}
    assert seen[0].message.headers["n"] == seen[0].body.decode()[1:]
    every = await bus.subscribe("#", g2, prefetch=50)
    everything = await drain(every, 21)
    assert sorted(d.body for d in everything) == sorted([*bodies, b"deep"])
    for d in everything:
        await d.ack()
    assert (await bus.stats(g3))[0].depth == 0
    for c in (a, b, every):
        await c.close()


async def test_tasks_ack_nack_and_fail(backend) -> None:
    _, bus, names = backend
    q = names("tasks")
    worker = await bus.consume(q, prefetch=1)
    first = await bus.enqueue(q, b"one")
    d = await worker.get(10)
    assert d is not None and d.body == b"one" and d.id == first and d.attempts == 1
    await d.ack()
    await bus.enqueue(q, b"two", headers={"trace": "abc"})
    d = await worker.get(10)
    assert d is not None and d.body == b"two" and d.message.headers == {"trace": "abc"}
    await d.nack(delay=0)
    again = await worker.get(10)
    assert again is not None and again.body == b"two" and again.attempts == 2
    await again.fail("cannot decode")
    dead = await bus.dead_letters(q)
    assert [(m.body, m.error, m.attempts) for m in dead] == [(b"two", "cannot decode", 2)]
    assert (await bus.dead_letter(q, dead[0].id)).body == b"two"
    await worker.close()


async def test_max_attempts_then_dead_letters_can_be_retried_and_purged(backend) -> None:
    _, bus, names = backend
    q = names("dlq")
    await bus.declare_queue(q, max_attempts=2)
    x, y = await bus.enqueue(q, b"x"), await bus.enqueue(q, b"y")
    worker = await bus.consume(q, prefetch=10)
    for _ in range(4):
        d = await worker.get(10)
        assert d is not None
        await d.nack(delay=0)
    dead = await bus.dead_letters(q)
    assert sorted(m.body for m in dead) == [b"x", b"y"]
    assert all("attempts" in m.error for m in dead)
    assert (await bus.stats(q))[0].dead_letters == 2
    assert await bus.retry_dead_letters(q, [x]) == 1
    d = await worker.get(10)
    assert d is not None and d.body == b"x" and d.attempts == 1
    await d.ack()
    assert [m.id for m in await bus.dead_letters(q)] == [y]
    assert await bus.purge_dead_letters(q) == 1
    assert await bus.dead_letters(q) == []
    assert (await bus.stats(q))[0].dead_letters == 0
    await worker.close()


async def test_delayed_task_arrives_after_its_delay(backend) -> None:
    _, bus, names = backend
    q = names("delay")
    worker = await bus.consume(q, prefetch=10)
    start = time.time()
    await bus.enqueue(q, b"later", delay=1.0)
    await bus.enqueue(q, b"now")
    first, second = await drain(worker, 2)
    assert (first.body, second.body) == (b"now", b"later")
    assert time.time() - start >= 1.0
    await first.ack()
    await second.ack()
    await worker.close()


async def test_higher_priority_is_delivered_first(backend) -> None:
    _, bus, names = backend
    q = names("prio")
    await bus.declare_queue(q)
    await bus.enqueue_many(q, [Task(f"low{i}".encode()) for i in range(5)])
    await bus.enqueue(q, b"urgent", priority=9)
    worker = await bus.consume(q, prefetch=1)
    d = await worker.get(10)
    assert d is not None and d.body == b"urgent"
    await d.ack()
    rest = []
    for _ in range(5):
        d = await worker.get(10)
        assert d is not None
        rest.append(d.body)
        await d.ack()
    assert rest == [f"low{i}".encode() for i in range(5)]
    await worker.close()


async def test_idempotency_key_enqueues_once(backend) -> None:
    _, bus, names = backend
    q = names("idem")
    first = await bus.enqueue(q, b"charge", idempotency_key="order-17")
    assert first is not None
    assert await bus.enqueue(q, b"charge", idempotency_key="order-17") is None
    other = await bus.enqueue(q, b"charge", idempotency_key="order-18")
    assert other is not None and other != first
    worker = await bus.consume(q, prefetch=10)
    got = await drain(worker, 2)
    assert sorted(d.id for d in got) == sorted([first, other])
    for d in got:
        await d.ack()
    assert (await bus.stats(q))[0].ready == 0
    await worker.close()


async def test_prefetch_limits_unsettled_deliveries(backend) -> None:
    _, bus, names = backend
    q = names("prefetch")
    await bus.enqueue_many(q, [Task(str(i).encode()) for i in range(10)])
    worker = await bus.consume(q, prefetch=3)
    held = await drain(worker, 3)
    assert await worker.get(0.5) is None
    await held[0].ack()
    more = await worker.get(10)
    assert more is not None and more.body == b"3"
    assert await worker.get(0.5) is None
    await worker.close()


async def test_one_consumer_sees_queue_order(backend) -> None:
    _, bus, names = backend
    q = names("order")
    await bus.declare_queue(q)
    await bus.enqueue_many(q, [Task(str(i).encode()) for i in range(300)])
    worker = await bus.consume(q, prefetch=50)
    got = []
    while len(got) < 300:
        d = await worker.get(20)
        assert d is not None
        got.append(int(d.body))
        await d.ack()
    assert got == list(range(300))
    await worker.close()


WORKER = """
import asyncio, sys
from shipyard.bus import bus_from_url
async def main():
    bus = bus_from_url(sys.argv[1])
    worker = await bus.consume(sys.argv[2], prefetch=1)
    d = await worker.get()
    print("working on", d.id, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_task_of_a_killed_worker_is_redelivered_and_completed_once_acked(backend) -> None:
    url, bus, names = backend
    q = names("crash")
    await bus.declare_queue(q)
    task_id = await bus.enqueue(q, b"transcode movie.mp4")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, url, q], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
        assert line.split() == ["working", "on", task_id]
        survivor = await bus.consume(q, prefetch=1)
        proc.kill()  # SIGKILL mid-task: no ack, no goodbye
        proc.wait()
        d = await survivor.get(30)
        assert d is not None and d.id == task_id and d.body == b"transcode movie.mp4"
        await d.ack()
        await survivor.close()
        stats = (await bus.stats(q))[0]
        assert stats.ready == 0 and stats.dead_letters == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bus_api_errors_are_json_with_status(server: ServerProcess) -> None:
    base = server.url + "/api/v1/bus"
    cases = [
        (requests.post(base + "/publish", data=b"{nope"), 400),
        (requests.post(base + "/publish", json={"topic": "a.b", "message": "***"}), 400),
        (requests.post(base + "/publish", json={"topic": "a.*", "message": ""}), 400),
        (requests.post(base + "/queues/bad name/enqueue", json={"payload": ""}), 400),
        (requests.post(base + "/queues/q1/enqueue", json={"payload": "", "priority": 99}), 400),
        (requests.post(base + "/queues/q1/enqueue", json={"payload": "", "delay": -1}), 400),
        (requests.get(base + "/queues/never-declared"), 404),
        (requests.get(base + "/queues/never-declared/dead-letters"), 404),
        (requests.post(base + "/publish/batch", data=b"x" * (33 << 20)), 413),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert set(body) == {"error", "detail"} and body["error"]
    assert requests.get(base + "/queues").status_code == 200


async def test_server_kill9_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        bus = bus_from_url(server.url)
        q, group = name("durable"), name("durable-sub")
        await bus.declare_subscription(group, "orders.#")
        acked: list[str] = []
        events_acked = 0
        stop = asyncio.Event()

        async def producer(k: int) -> None:
            nonlocal events_acked
            i = 0
            while not stop.is_set():
                try:
                    mid = await bus.enqueue(q, f"{k}-{i}".encode())
                    await bus.publish("orders.created", f"{k}-{i}".encode())
                except Exception:
                    return  # the server died under this request: unacknowledged, may or may not be stored
                acked.append(mid)  # type: ignore[arg-type]
                events_acked += 1
                i += 1

        bus.retry_for = 0.0  # type: ignore[attr-defined]
        producers = [asyncio.create_task(producer(k)) for k in range(8)]
        while len(acked) < 500:
            await asyncio.sleep(0.01)
        server.kill9()
        stop.set()
        await asyncio.gather(*producers)
        confirmed, confirmed_events = set(acked), events_acked
        await bus.close()
        server.start()
        bus = bus_from_url(server.url)
        stats = (await bus.stats(q))[0]
        assert stats.depth >= len(confirmed)
        worker = await bus.consume(q, prefetch=500)
        seen = set()
        while not confirmed <= seen:
            d = await worker.get(10)
            assert d is not None, f"{len(confirmed - seen)} acknowledged tasks lost"
            seen.add(d.id)
            await d.ack()
        assert (await bus.stats(group))[0].depth >= confirmed_events
        await worker.close()
        await bus.close()
    finally:
        server.stop()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


async def test_rabbitmq_restart_under_a_steady_stream_loses_no_confirmed_message() -> None:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    need_peer("rabbitmqctl", os.path.exists("/usr/sbin/rabbitmqctl"), "rabbitmqctl is not installed")
    bus = bus_from_url(RABBIT_URL)
    q = name("restart")
    await bus.declare_queue(q)
    consumer = await bus.consume(q, prefetch=20)
    confirmed: set[str] = set()
    received: set[str] = set()
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            mid = await bus.enqueue(q, f"m{i}".encode())
            confirmed.add(mid)  # type: ignore[arg-type]
            i += 1
            await asyncio.sleep(0.005)

    async def consume() -> None:
        while True:
            d = await consumer.get()
            if d is None:
                return
            received.add(d.id)
            await d.ack()

    publisher, reader = asyncio.create_task(publish()), asyncio.create_task(consume())
    try:
        while len(received) < 50:
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, rabbitmqctl, "stop_app")
        await loop.run_in_executor(None, rabbitmqctl, "start_app")
        before = len(confirmed)
        while len(confirmed) < before + 50:  # the publisher recovered by itself
            assert not publisher.done(), publisher.exception()
            await asyncio.sleep(0.05)
        stop.set()
        await publisher
        deadline = time.monotonic() + 60
        while not confirmed <= received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert confirmed <= received, f"{len(confirmed - received)} confirmed messages never arrived"
    finally:
        stop.set()
        reader.cancel()
        with contextlib.suppress(BaseException):
            await publisher
        await consumer.close()
        await bus.close()
        connection = await aio_pika.connect(RABBIT_URL.replace("rabbitmq", "amqp"))
        channel = await connection.channel()
        for qn in (amqp_name(q), dead_name(q)):
            await channel.queue_delete(qn)
        await connection.close()
