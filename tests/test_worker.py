"""`shipyard worker` end to end, the same cases on both backends: a real server (embedded bus, or `--bus rabbitmq://`
with the RabbitMQ on this machine) and real worker processes running tests/apps/bus_worker.py.

Handlers are acked, retried and dead-lettered; SIGTERM finishes or gives back in-flight work within the grace;
kill -9 mid-task gets the task redelivered to the next worker."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
import requests

from shipyard.bus.rabbitmq import amqp_name, dead_name
from shipyard.sdk.bus import BusApp
from support import ServerProcess, need_peer, rabbit_up

RABBIT_URL = "rabbitmq://guest:guest@127.0.0.1:5672/"
APPS = Path(__file__).parent / "apps"


def wait_for(predicate, timeout: float = 60, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")


@pytest.fixture(scope="module")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    proc = ServerProcess(tmp_path_factory.mktemp("rabbit-server") / "data", "--bus", RABBIT_URL).start()
    yield proc
    proc.stop()


@dataclass
class Setup:
    """One backend: the server the CLI talks to, the bus URL workers get, and the names a test used."""

    backend: str
    server: ServerProcess
    bus_url: str
    tmp: Path
    queue: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:8]}")
    group: str = field(default_factory=lambda: f"g-{uuid.uuid4().hex[:8]}")
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.tmp / "events.jsonl"

    def events(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SHIPYARD_BUS_URL": self.bus_url, "SHIPYARD_HTTP_ADDR": self.server.addr,
               "WORK_QUEUE": self.queue, "EVENT_GROUP": self.group, "OUT_FILE": str(self.out),
               "PYTHONPATH": str(APPS)}
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "shipyard.cli.main", "worker", "bus_worker:bus", *args],
                                env=env, cwd=APPS, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        wait_for(lambda: self.consumers(self.queue) >= 1 or proc.poll() is not None, what="worker attached")
        assert proc.poll() is None, self.worker_log(len(self.workers) - 1)
        return proc

    def worker_log(self, n: int) -> str:
        return (self.tmp / f"worker-{n}.log").read_text(errors="replace")[-3000:]

    def stats(self, queue: str) -> dict | None:
        r = requests.get(f"{self.server.url}/api/v1/bus/queues/{queue}", timeout=10)
        return r.json() if r.status_code == 200 else None

    def consumers(self, queue: str) -> int:
        s = self.stats(queue)
        return s["consumers"] if s else 0

    def dead_letters(self) -> list[dict]:
        return requests.get(f"{self.server.url}/api/v1/bus/queues/{self.queue}/dead-letters", timeout=10).json()

    def enqueue(self, *payloads: dict) -> None:
        async def send() -> None:
            app = BusApp(self.bus_url)
            for p in payloads:
                await app.enqueue(self.queue, p)
            await app.close()

        asyncio.run(send())

    def publish(self, topic: str, payload: dict) -> None:
        async def send() -> None:
            app = BusApp(self.bus_url)
            await app.publish(topic, payload)
            await app.close()

        asyncio.run(send())


@pytest.fixture(params=["embedded", "rabbitmq"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    if request.param == "rabbitmq":
        s = Setup("rabbitmq", request.getfixturevalue("rabbit_server"), RABBIT_URL, tmp_path)
    else:
        server = request.getfixturevalue("server")
        s = Setup("embedded", server, server.url, tmp_path)
    yield s
    for proc in s.workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if request.param == "rabbitmq":
        async def cleanup() -> None:
            connection = await aio_pika.connect(RABBIT_URL.replace("rabbitmq", "amqp"))
            channel = await connection.channel()
            for n in (s.queue, s.group):
                for q in (amqp_name(n), dead_name(n)):
                    await channel.queue_delete(q)
            await connection.close()

        asyncio.run(cleanup())


def done_ids(s: Setup) -> list[str]:
    return [e["id"] for e in s.events() if e["event"] == "done"]


def test_worker_acks_retries_and_dead_letters_tasks_and_handles_events(setup: Setup) -> None:
    s = setup
    s.start_worker()
    s.enqueue({"id": "ok"}, {"id": "flaky", "action": "flaky"}, {"id": "reject", "action": "reject"},
              {"id": "crash", "action": "crash"})
    s.publish("assets.created", {"id": "e1"})
    s.publish("other.created", {"id": "not-mine"})
    wait_for(lambda: {"ok", "flaky"} <= set(done_ids(s)), what="ok and flaky done")
    wait_for(lambda: len(s.dead_letters()) == 2, what="two dead letters")
    dead = {json.loads(base64.b64decode(d["body"]))["id"]: d for d in s.dead_letters()}
    assert dead["reject"]["error"] == "bad input"
    assert "always fails" in dead["crash"]["error"]
    events = s.events()
    # flaky: failed once, acked on its second attempt; crash: tried max_attempts (3) times, then dead.
    assert [e["attempt"] for e in events if e["id"] == "flaky" and e["event"] == "start"] == [1, 2]
    assert len([e for e in events if e["id"] == "crash" and e["event"] == "start"]) == 3
    assert len([e for e in events if e["id"] == "reject" and e["event"] == "start"]) == 1
    wait_for(lambda: any(e["event"] == "event" for e in s.events()), what="event handled")
    handled = [e for e in s.events() if e["event"] == "event"]
    assert [(e["id"], e["topic"]) for e in handled] == [("e1", "assets.created")]
    assert done_ids(s).count("ok") == 1
    wait_for(lambda: (s.stats(s.queue) or {}).get("depth") == 0, what="queue drained")


def test_sigterm_mid_task_finishes_it_within_the_grace(setup: Setup) -> None:
    s = setup
    worker = s.start_worker("--stop-grace", "20")
    s.enqueue({"id": "slow", "action": "sleep", "seconds": 1.5})
    wait_for(lambda: any(e["event"] == "start" for e in s.events()), what="task started")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, s.worker_log(0)
    assert done_ids(s) == ["slow"]
    # Acked before the worker left: nothing is left to redeliver.
    assert (s.stats(s.queue) or {}).get("depth") == 0
    assert s.dead_letters() == []


def test_sigterm_gives_back_a_task_that_outlasts_the_grace(setup: Setup) -> None:
    s = setup
    worker = s.start_worker("--stop-grace", "1")
    s.enqueue({"id": "long", "block_once": str(s.tmp / "blocked")})
    wait_for(lambda: any(e["event"] == "start" for e in s.events()), what="task started")
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, s.worker_log(0)
    assert time.monotonic() - began < 15  # the grace is 1s; generous for a loaded machine
    assert done_ids(s) == []
    wait_for(lambda: (s.stats(s.queue) or {}).get("ready") == 1, what="task back in the queue")
    s.start_worker()
    wait_for(lambda: done_ids(s) == ["long"], what="task completed by the next worker")
    assert s.dead_letters() == []


def test_kill9_mid_task_redelivers_it_to_the_next_worker(setup: Setup) -> None:
    s = setup
    first = s.start_worker()
    s.enqueue({"id": "k9", "block_once": str(s.tmp / "blocked")})
    wait_for(lambda: any(e["event"] == "start" for e in s.events()), what="task started")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    s.start_worker()
    wait_for(lambda: done_ids(s) == ["k9"], what="task redelivered and completed")
    starts = [e for e in s.events() if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["pid"] != starts[1]["pid"]
    wait_for(lambda: (s.stats(s.queue) or {}).get("depth") == 0, what="acked")


def test_instances_get_the_bus_url_and_celery_broker_with_rabbitmq(setup: Setup) -> None:
    """What the agent puts in every instance's environment: SHIPYARD_BUS_URL (the embedded broker's http URL or the
    amqp URL), CELERY_BROKER_URL only with RabbitMQ, and the stop grace the worker runtime uses."""
    s = setup
    name = f"envdump-{uuid.uuid4().hex[:6]}"
    dump = s.tmp / "env.json"
    code = f"import json, os, time; json.dump(dict(os.environ), open({str(dump)!r}, 'w')); time.sleep(3600)"
    spec = {"name": name, "kind": "worker", "args": [sys.executable, "-c", code], "stop_grace": 7}
    r = requests.post(f"{s.server.url}/api/v1/jobs", json=spec, timeout=30)
    assert r.status_code == 201, r.text
    try:
        env = wait_for(lambda: dump.exists() and dump.stat().st_size and json.loads(dump.read_text()),
                       what="instance started")
    finally:
        requests.delete(f"{s.server.url}/api/v1/jobs/{name}", timeout=30)
    assert env["SHIPYARD_HTTP_ADDR"] == s.server.addr
    assert env["SHIPYARD_STOP_GRACE"] == "7"
    if s.backend == "rabbitmq":
        assert env["SHIPYARD_BUS_URL"] == RABBIT_URL
        assert env["CELERY_BROKER_URL"] == "amqp://guest:guest@127.0.0.1:5672/"
    else:
        assert env["SHIPYARD_BUS_URL"] == s.server.url
        assert "CELERY_BROKER_URL" not in env
