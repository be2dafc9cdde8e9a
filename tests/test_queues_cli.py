"""`shipyard queues` and its dead-letter management, and GET /api/v1/bus/metrics, against a real server with each
bus backend (embedded, and `--bus rabbitmq://` with the RabbitMQ on this machine): same commands, same output."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from shipyard.bus import bus_from_url
from shipyard.bus.rabbitmq import amqp_name, dead_name
from support import ServerProcess, need_peer, rabbit_up

RABBIT_URL = "rabbitmq://guest:guest@127.0.0.1:5672/"


def shipyard(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    proc = ServerProcess(tmp_path_factory.mktemp("rabbit-server") / "data", "--bus", RABBIT_URL).start()
    yield proc
    proc.stop()


@pytest.fixture(params=["embedded", "rabbitmq"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, str, str]]:
    """(server, URL a consumer uses, a fresh queue name)."""
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    if request.param == "rabbitmq":
        server = request.getfixturevalue("rabbit_server")
        yield server, RABBIT_URL, queue

        async def cleanup() -> None:
            connection = await aio_pika.connect(RABBIT_URL.replace("rabbitmq", "amqp"))
            channel = await connection.channel()
            for q in (amqp_name(queue), dead_name(queue)):
                await channel.queue_delete(q)
            await connection.close()

        asyncio.run(cleanup())
    else:
        server = request.getfixturevalue("server")
        yield server, server.url, queue


def enqueue_via_server(server: ServerProcess, queue: str, bodies: list[bytes]) -> None:
    """Through the server's HTTP API, whichever backend it runs: the same API for both."""
    async def send() -> None:
        bus = bus_from_url(server.url)
        for body in bodies:
            await bus.enqueue(queue, body)
        await bus.close()

    asyncio.run(send())


def fail_all(consumer_url: str, queue: str, n: int) -> None:
    """A consumer that fails n tasks straight to the dead letters."""
    async def run() -> None:
        bus = bus_from_url(consumer_url)
        consumer = await bus.consume(queue, prefetch=n)
        for _ in range(n):
            delivery = await consumer.get(30)
            assert delivery is not None
            await delivery.fail(f"cannot handle {delivery.body.decode()}")
        await consumer.close()
        await bus.close()

    asyncio.run(run())


def row_of(table: str, queue: str) -> list[str]:
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == queue:
            return cells
    raise AssertionError(f"no row for {queue} in:\n{table}")


def test_queues_table_and_dead_letters_list_retry_purge(target: tuple[ServerProcess, str, str]) -> None:
    server, consumer_url, queue = target
    enqueue_via_server(server, queue, [b"one", b"two", b"three"])
    fail_all(consumer_url, queue, 2)

    listed = shipyard(server.addr, "queues")
    assert listed.returncode == 0, listed.stderr
    header = listed.stdout.splitlines()[0]
    for column in ("queue", "depth", "ready", "in flight", "delayed", "dead letters", "oldest age", "in/s",
                   "acked/s", "consumers"):
        assert column in header
    # queue, kind, depth, ready, in flight, delayed, dead letters, oldest age, in/s, acked/s, consumers
    cells = row_of(listed.stdout, queue)
    assert cells[1] == "queue" and cells[2:7] == ["1", "1", "0", "0", "2"], listed.stdout
    assert cells[7] != "-"  # one message waits, so it has an age

    as_json = json.loads(shipyard(server.addr, "queues", "--json").stdout)
    mine = next(s for s in as_json if s["queue"] == queue)
    assert (mine["depth"], mine["dead_letters"], mine["consumers"]) == (1, 2, 0)

    dead = json.loads(shipyard(server.addr, "queues", "dead-letters", queue, "--json").stdout)
    assert sorted(d["error"] for d in dead) == ["cannot handle one", "cannot handle two"]
    table = shipyard(server.addr, "queues", "dead-letters", queue).stdout
    assert "cannot handle one" in table and "cannot handle two" in table
    one = next(d["id"] for d in dead if d["error"] == "cannot handle one")

    retried = shipyard(server.addr, "queues", "dead-letters", queue, "--retry", "--id", one)
    assert retried.returncode == 0 and f"retried 1 dead letter of {queue}" in retried.stdout
    after = json.loads(shipyard(server.addr, "queues", "--json").stdout)
    mine = next(s for s in after if s["queue"] == queue)
    assert (mine["depth"], mine["dead_letters"]) == (2, 1)

    purged = shipyard(server.addr, "queues", "dead-letters", queue, "--purge")
    assert purged.returncode == 0 and f"purged 1 dead letter of {queue}" in purged.stdout
    assert "no dead letters" in shipyard(server.addr, "queues", "dead-letters", queue).stdout


def test_queues_errors_are_one_line(target: tuple[ServerProcess, str, str]) -> None:
    server, _, queue = target
    missing = shipyard(server.addr, "queues", "dead-letters", queue)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no queue" in missing.stderr and "Traceback" not in missing.stderr
    both = shipyard(server.addr, "queues", "dead-letters", queue, "--retry", "--purge")
    assert both.returncode == 1 and both.stderr.count("\n") == 1 and "one of --retry and --purge" in both.stderr
    bad = shipyard(server.addr, "queues", "dead-letters", "no spaces allowed")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "invalid queue name" in bad.stderr


def test_queues_when_the_server_is_down_is_one_line() -> None:
    done = shipyard("127.0.0.1:1", "queues")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "cannot reach" in done.stderr


def test_metrics_are_prometheus_text(target: tuple[ServerProcess, str, str]) -> None:
    server, consumer_url, queue = target
    enqueue_via_server(server, queue, [b"a", b"b", b"c"])
    fail_all(consumer_url, queue, 1)
    response = requests.get(f"{server.url}/api/v1/bus/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[tuple[str, str], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            assert sample.labels.get("kind") in ("queue", "subscription")
            samples[(sample.name, sample.labels["queue"])] = sample.value
    assert types["shipyard_bus_queue_depth"] == "gauge"
    assert types["shipyard_bus_published"] == "counter"  # the parser names counters without _total
    assert samples[("shipyard_bus_queue_depth", queue)] == 2
    assert samples[("shipyard_bus_queue_ready", queue)] == 2
    assert samples[("shipyard_bus_dead_letters", queue)] == 1
    assert samples[("shipyard_bus_queue_oldest_age_seconds", queue)] >= 0
    # RabbitMQ reports no totals: the server counts what passes through its own API (the enqueues above).
    assert samples[("shipyard_bus_published_total", queue)] == 3
    assert samples[("shipyard_bus_acked_total", queue)] == 0


def test_server_rejects_an_unknown_bus_url(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--bus", "kafka://somewhere")
    done = subprocess.run(proc.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "unsupported --bus" in done.stderr and "Traceback" not in done.stderr
