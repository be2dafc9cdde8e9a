"""Benchmark of persistent 1 KiB message throughput: Shipyard's bus on RabbitMQ and on the embedded broker of a real
`shipyard server` (over HTTP), with raw aio-pika against the same RabbitMQ as the reference, in one invocation.

Every side does the same thing: C concurrent publishers awaiting confirmed, persistent publishes into a durable
queue, then one consumer with the same prefetch acking each message. It never reaches inside the server.

Usage: python bench/bus.py [--quick] [--messages N]  (progress on stderr, one JSON line with all figures on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aio_pika
import uvloop

from shipyard.bus import Bus, bus_from_url
from shipyard.bus.rabbitmq import amqp_name, dead_name

RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
BODY = b"x" * 1024
PREFETCH = 200
PUBLISHERS = 200
RABBIT_RATIO_TARGET = 0.8
EMBEDDED_TARGET = 10_000


def progress(message: str) -> None:
    print(f"[bench/bus] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def publish_phase(n: int, publish_one: Callable[[], Awaitable[object]]) -> float:
    """Messages/s with PUBLISHERS coroutines each awaiting one confirmed publish at a time."""
    left = n

    async def publisher() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await publish_one()

    start = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
    return n / (time.perf_counter() - start)


async def bench_raw(n: int) -> dict[str, float]:
    connection = await aio_pika.connect(RABBIT)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(f"bench.raw.{uuid.uuid4().hex[:8]}", durable=True)
    try:
        def one() -> Awaitable[object]:
            message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            return channel.default_exchange.publish(message, routing_key=queue.name)

        published = await publish_phase(n, one)
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=PREFETCH)
        cqueue = await consumer_channel.get_queue(queue.name)
        start, got = time.perf_counter(), 0
        async with cqueue.iterator() as it:
            async for message in it:
                await message.ack()
                got += 1
                if got == n:
                    break
        consumed = n / (time.perf_counter() - start)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()
    return {"publish_per_s": round(published), "consume_per_s": round(consumed)}


async def bench_bus(bus: Bus, n: int) -> dict[str, float]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    await bus.declare_queue(queue)
    published = await publish_phase(n, lambda: bus.enqueue(queue, BODY))
    consumer = await bus.consume(queue, prefetch=PREFETCH)
    start = time.perf_counter()
    for _ in range(n):
        delivery = await consumer.get(60)
        assert delivery is not None, "consumer stalled"
        await delivery.ack()
    consumed = n / (time.perf_counter() - start)
    await consumer.close()
    return {"publish_per_s": round(published), "consume_per_s": round(consumed), "queue": queue}  # type: ignore[dict-item]


async def drop_rabbit_queue(queue: str) -> None:
    connection = await aio_pika.connect(RABBIT)
    channel = await connection.channel()
    for name in (amqp_name(queue), dead_name(queue)):
        await channel.queue_delete(name)
    await connection.close()


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(data_dir.parent / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(data_dir), "--http-port", str(port),
         "--dns-port", "0", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/status/leader", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("shipyard server did not start")


async def run(n: int, repeats: int) -> dict[str, object]:
    best: dict[str, dict[str, float]] = {}

    def keep(side: str, figures: dict[str, float]) -> None:
        old = best.setdefault(side, {"publish_per_s": 0, "consume_per_s": 0})
        for k in ("publish_per_s", "consume_per_s"):
            old[k] = max(old[k], figures[k])

    with tempfile.TemporaryDirectory(prefix="bench-bus-") as tmp:
        proc, url = start_server(Path(tmp) / "data")
        try:
            for round_ in range(repeats):
                progress(f"round {round_ + 1}/{repeats}: raw aio-pika")
                keep("raw_aio_pika", await bench_raw(n))
                progress(f"round {round_ + 1}/{repeats}: shipyard bus on RabbitMQ")
                rabbit = bus_from_url("rabbitmq://guest:guest@127.0.0.1:5672/")
                figures = await bench_bus(rabbit, n)
                await rabbit.close()
                await drop_rabbit_queue(str(figures["queue"]))
                keep("rabbitmq", figures)
                progress(f"round {round_ + 1}/{repeats}: shipyard bus embedded (HTTP, {url})")
                embedded = bus_from_url(url)
                keep("embedded", await bench_bus(embedded, n))
                await embedded.close()
                progress(json.dumps(best))
        finally:
            proc.terminate()
            proc.wait(10)
    raw, rabbit_fig, emb = best["raw_aio_pika"], best["rabbitmq"], best["embedded"]
    return {
        "bench": "bus",
        "message_bytes": len(BODY),
        "messages": n,
        "publishers": PUBLISHERS,
        "prefetch": PREFETCH,
        "raw_aio_pika": raw,
        "rabbitmq": rabbit_fig,
        "embedded": emb,
        "ratio_rabbitmq_publish": round(rabbit_fig["publish_per_s"] / raw["publish_per_s"], 3),
        "ratio_rabbitmq_consume": round(rabbit_fig["consume_per_s"] / raw["consume_per_s"], 3),
        "embedded_over_target_publish": round(emb["publish_per_s"] / EMBEDDED_TARGET, 3),
        "embedded_over_target_consume": round(emb["consume_per_s"] / EMBEDDED_TARGET, 3),
        "targets": {"rabbitmq_ratio": RABBIT_RATIO_TARGET, "embedded_per_s": EMBEDDED_TARGET},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 5,000 messages, one round")
    parser.add_argument("--messages", type=int, default=0, help="messages per phase (default 50,000; quick 5,000)")
    parser.add_argument("--repeats", type=int, default=0, help="rounds, best of (default 3; quick 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.messages or (5_000 if args.quick else 50_000)
    repeats = args.repeats or (1 if args.quick else 3)
    figures = uvloop.run(run(n, repeats))
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
