"""Autoscaling workers on queue depth: the pure decision, the loop against JobService and a real embedded broker
in-process, and a real server that scales a `shipyard worker` job up to drain its queue and back down to zero."""

from __future__ import annotations

import base64
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from shipyard.bus.autoscaler import BusAutoscaler
from shipyard.bus.base import Task
from shipyard.bus.embedded import EmbeddedBroker
from shipyard.scheduler.autoscale import desired_instances
from shipyard.scheduler.jobs import JobService
from shipyard.spec import Autoscale, SpecError, TaskSpec, parse_project
from shipyard.store import SqliteStore
from support import ServerProcess

APPS = Path(__file__).parent / "apps"


@dataclass
class Figures:
    ready: int
    in_flight: int = 0


POLICY = Autoscale(queue="q", min=1, max=5, target_depth=10, cooldown=30)


@pytest.mark.parametrize(("work", "current", "since", "expected"), [
    (0, 1, math.inf, 1),  # at min already
    (35, 1, 0, 4),  # up at once, ceil(35 / 10), cooldown or not
    (1000, 2, 0, 5),  # never above max
    (10, 3, 0, 3),  # down waits for the cooldown
    (10, 3, 30, 2),  # ... then goes to ceil(10 / (10 * 0.8))
    (0, 3, 30, 1),  # never below min
    (19, 3, 60, 3),  # 19 needs 2 at the target but 3 inside the hysteresis band (19 / 8 -> 3): hold
    (15, 3, 60, 2),  # 15 / 8 -> 2: down
    (20, 2, 0, 2),  # exactly at target: hold
    (21, 2, 0, 3),
])
def test_desired_instances(work: int, current: int, since: float, expected: int) -> None:
    assert desired_instances(Figures(work), POLICY, current, since_last_change=since) == expected


def test_desired_instances_counts_in_flight_and_clamps_without_figures() -> None:
    assert desired_instances(Figures(5, in_flight=20), POLICY, 1) == 3
    assert desired_instances(None, POLICY, 9) == 5  # a count outside the bounds comes back into them
    assert desired_instances(None, POLICY, 0) == 1
    assert desired_instances(None, POLICY, 3, since_last_change=0) == 3  # no evidence, no change
    zero = Autoscale(queue="q", min=0, max=3, target_depth=1, cooldown=0)
    assert desired_instances(Figures(0), zero, 2) == 0  # scale to zero when idle
    assert desired_instances(Figures(1), zero, 0) == 1  # and back when work arrives


def test_spec_autoscale_is_validated_and_round_trips() -> None:
    project = parse_project("""
workers:
  transcoder:
    cmd: shipyard worker app:bus
    autoscale: {queue: transcode, min: 0, max: 4, target_depth: 25, cooldown: 1m}
""")
    worker = project.workers["transcoder"]
    assert worker.autoscale == Autoscale("transcode", 0, 4, 25, 60.0)
    assert TaskSpec.from_dict(worker.to_dict()) == worker
    # Scaling must not replace running instances: the policy is not part of the instance template.
    assert worker.template_hash() == TaskSpec.from_dict({**worker.to_dict(), "autoscale": None}).template_hash()
    with pytest.raises(SpecError) as err:
        parse_project("""
workers:
  a:
    cmd: x
    autoscale: {queue: "has space", min: 3, max: 2, target_depth: 0}
services:
  web:
    cmd: x
    autoscale: {queue: q}
""")
    text = str(err.value)
    assert "workers.a.autoscale.queue" in text and "workers.a.autoscale.target_depth" in text
    assert "services.web.autoscale: unknown field" in text


@pytest.fixture
async def parts() -> AsyncIterator[tuple[JobService, EmbeddedBroker]]:
    store = await SqliteStore.open(None)
    broker = await EmbeddedBroker.open(None)
    yield JobService(store), broker
    await broker.close()
    await store.close()


def worker_spec(name: str, policy: Autoscale, instances: int = 1) -> TaskSpec:
    return TaskSpec(name=name, kind="worker", cmd="true", instances=instances, autoscale=policy)


async def test_loop_scales_with_job_service_and_embedded_broker(parts: tuple[JobService, EmbeddedBroker]) -> None:
    jobs, broker = parts
    policy = Autoscale(queue="transcode", min=1, max=4, target_depth=100, cooldown=0)
    await jobs.deploy(worker_spec("transcoder", policy))
    await jobs.deploy(TaskSpec(name="web", kind="service", cmd="true"))  # no policy: never touched
    loop = BusAutoscaler(jobs, broker)
    assert await loop.reconcile() == {}  # no queue yet: keeps its one instance

    await broker.enqueue_many("transcode", [Task(b"x") for _ in range(250)])
    assert await loop.reconcile() == {"transcoder": 3}
    job = await jobs.get("transcoder")
    assert job.spec.instances == 3 and job.spec.autoscale == policy
    assert await loop.reconcile() == {}  # level-triggered: nothing more to do

    consumer = await broker.consume("transcode", prefetch=1000)
    for _ in range(250):
        delivery = await consumer.get(5)
        assert delivery is not None
        await delivery.ack()
    assert await loop.reconcile() == {"transcoder": 1}
    assert (await jobs.get("web")).spec.instances == 1
    await consumer.close()


async def test_loop_waits_for_cooldown_before_scaling_down(parts: tuple[JobService, EmbeddedBroker]) -> None:
    jobs, broker = parts
    policy = Autoscale(queue="slow", min=0, max=3, target_depth=1, cooldown=3600)
    await jobs.deploy(worker_spec("slowpoke", policy, instances=3))
    await broker.declare_queue("slow")
    loop = BusAutoscaler(jobs, broker)
    # The queue is empty but the job was (as far as this loop knows) just changed: hold.
    assert await loop.reconcile() == {}
    assert (await jobs.get("slowpoke")).spec.instances == 3
    await jobs.stop("slowpoke")
    assert await loop.reconcile() == {}  # stopped jobs are left alone


@pytest.fixture
def server_with_worker_app(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = ServerProcess(tmp_path / "data").start()
    yield proc
    proc.stop()


def test_server_scales_a_worker_job_on_queue_depth_and_back_to_zero(server_with_worker_app: ServerProcess,
                                                                    tmp_path: Path) -> None:
    """The agent gives instances SHIPYARD_BUS_URL, the autoscaler scales the job from 0 as work arrives, the
    workers drain the queue, and the job goes back to 0."""
    server = server_with_worker_app
    queue, out = f"as-{uuid.uuid4().hex[:8]}", tmp_path / "events.jsonl"
    spec = f"""
workers:
  transcoder:
    args: [{json.dumps(sys.executable)}, -m, shipyard.cli.main, worker, "bus_worker:bus"]
    workdir: {json.dumps(str(APPS))}
    instances: 0
    env:
      PYTHONPATH: {json.dumps(str(APPS))}
      WORK_QUEUE: {queue}
      EVENT_GROUP: {queue}-events
      OUT_FILE: {json.dumps(str(out))}
    autoscale: {{queue: {queue}, min: 0, max: 2, target_depth: 2, cooldown: 0s}}
    update: {{min_healthy_time: 0s}}
    stop_grace: 5s
"""
    r = requests.post(f"{server.url}/api/v1/jobs", data=spec, headers={"Content-Type": "application/yaml"},
                      timeout=30)
    assert r.status_code == 201, r.text
    requests.put(f"{server.url}/api/v1/bus/queues/{queue}", json={}, timeout=10).raise_for_status()
    bodies = [json.dumps({"id": f"t{i}", "action": "sleep", "seconds": 0.5}).encode() for i in range(6)]
    tasks = [{"payload": base64.b64encode(b).decode(), "headers": {"content-type": "application/json"}}
             for b in bodies]
    requests.post(f"{server.url}/api/v1/bus/queues/{queue}/enqueue/batch", json={"tasks": tasks},
                  timeout=10).raise_for_status()

    def instances() -> int:
        return requests.get(f"{server.url}/api/v1/jobs/transcoder", timeout=10).json()["job"]["spec"]["instances"]

    deadline = time.monotonic() + 120
    peak = 0
    while time.monotonic() < deadline:
        peak = max(peak, instances())
        if peak == 2:
            break
        time.sleep(0.2)
    assert peak == 2, f"never scaled to max: {server.log_tail()}"

    def done() -> set[str]:
        if not out.exists():
            return set()
        return {e["id"] for e in map(json.loads, out.read_text().splitlines()) if e["event"] == "done"}

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and done() != {f"t{i}" for i in range(6)}:
        time.sleep(0.2)
    assert done() == {f"t{i}" for i in range(6)}, server.log_tail()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and instances() != 0:
        time.sleep(0.2)
    assert instances() == 0


async def test_redeploying_keeps_the_autoscaled_count(parts: tuple[JobService, EmbeddedBroker]) -> None:
    jobs, _ = parts
    policy = Autoscale(queue="q", min=1, max=4, target_depth=10, cooldown=0)
    await jobs.deploy(worker_spec("sized", policy))
    await jobs.scale("sized", 3)
    again = await jobs.deploy(worker_spec("sized", policy))  # the same file deployed again: nothing changes
    assert not again.changed and again.job.spec.instances == 3
    tighter = await jobs.deploy(worker_spec("sized", Autoscale(queue="q", min=1, max=2, target_depth=10)))
    assert tighter.changed and tighter.job.spec.instances == 2  # within the new bounds
    plain = await jobs.deploy(TaskSpec(name="sized", kind="worker", cmd="true", instances=1))
    assert plain.job.spec.instances == 1  # without a policy the file's count rules again
