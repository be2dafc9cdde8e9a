"""JobService and SchedulerLoop on an in-memory store, with agents' status reports written by the test; and the
/api/v1/jobs HTTP API against a real `shipyard server` for status codes and bad input."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time

import pytest
import requests

from shipyard.errors import Conflict, NotFound, Unprocessable
from shipyard.scheduler.jobs import JobService
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.scheduler.model import Allocation, Node
from shipyard.scheduler.records import (
    ALLOCS,
    AllocStatus,
    alloc_status_key,
    decode_alloc,
    encode_node,
    encode_status,
    node_key,
)
from shipyard.spec import Resources, TaskSpec, UpdatePolicy, parse_project
from shipyard.store import SqliteStore


def service(name: str = "web", instances: int = 3, cmd: str = "sleep 30", memory: int = 128, **update: object
            ) -> TaskSpec:
    return TaskSpec(name=name, kind="service", cmd=cmd, instances=instances, resources=Resources(100, memory),
                    update=UpdatePolicy(**update))  # type: ignore[arg-type]


class Cluster:
    """The store, the job API and a scheduler loop on a test clock; the test plays the node agents' part by
    writing alloc-status records, as a NodeAgent does when instances start, turn healthy or finish stopping."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.now = 1_000_000.0
        self.jobs = JobService(store)
        self.loop = SchedulerLoop(store, clock=lambda: self.now)

    async def add_node(self, name: str = "node-1", cpu: int = 4000, memory: int = 4096) -> None:
        await self.store.put(node_key(name), encode_node(Node(name, cpu, memory)))

    async def step(self):  # type: ignore[no-untyped-def]
        plan, _ = await self.loop.run_once()
        return plan

    async def allocs(self, job: str = "web") -> list[Allocation]:
        return [a for a, _ in await self.jobs.allocations(job)]

    async def live(self, job: str = "web") -> list[Allocation]:
        return [a for a in await self.allocs(job) if a.desired == "run"]

    async def report(self, client: str = "healthy", job: str = "web", only_new: bool = True) -> int:
        """Agents report on running allocations: each one gets `client` status from now."""
        count = 0
        for alloc, status in await self.jobs.allocations(job):
            if alloc.desired != "run" or (only_new and status is not None):
                continue
            since = self.now if client == "healthy" else None
            status = AllocStatus(client=client, healthy_since=since, updated_at=self.now)
            await self.store.put(alloc_status_key(alloc.node, alloc.id), encode_status(status))
            count += 1
        return count

    async def finish_stops(self) -> None:
        """Agents finish stopping what they were told to stop: their status record goes."""
        for alloc, status in await self.jobs.allocations():
            if alloc.desired == "stop" and status is not None:
                await self.store.delete(alloc_status_key(alloc.node, alloc.id))

    async def converge(self, job: str = "web", steps: int = 40) -> None:
        """Run until the job's deployment is over, with every new instance healthy at once."""
        for _ in range(steps):
            await self.step()
            await self.report("healthy", job)
            await self.finish_stops()
            self.now += 10
            d = await self.jobs.deployment(job)
            if d is not None and not d.active and not await self._pending_stops():
                await self.step()  # collects what the agents finished stopping
                commits = self.loop.commits
                await self.step()
                assert self.loop.commits == commits, "a converged cluster must not be rewritten on every pass"
                return
        raise AssertionError(f"no convergence: {await self.jobs.deployment(job)}")

    async def _pending_stops(self) -> bool:
        return any(a.desired == "stop" for a, _ in await self.jobs.allocations())


@pytest.fixture
async def cluster():  # type: ignore[no-untyped-def]
    store = await SqliteStore.open(None)
    c = Cluster(store)
    await c.add_node()
    yield c
    await store.close()


# ---- JobService + SchedulerLoop ----------------------------------------------------------------------


async def test_deploy_creates_allocations(cluster: Cluster) -> None:
    result = await cluster.jobs.deploy(service())
    assert result.changed and result.job.version == 1 and result.deployment_id
    plan = await cluster.step()
    assert len(plan.place) == 3
    live = await cluster.live()
    assert sorted(a.index for a in live) == [0, 1, 2]
    assert {a.node for a in live} == {"node-1"} and all(a.version == 1 for a in live)
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.id == result.deployment_id and d.status == "running"

    await cluster.report("healthy")
    cluster.now += 6  # past min_healthy_time (5s)
    await cluster.step()
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.status == "successful" and d.healthy == 3
    assert (await cluster.jobs.get("web")).stable_version == 1
    assert not (await cluster.step()).place  # converged: nothing more to do


async def test_redeploy_same_spec_is_not_a_new_version(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service())
    await cluster.converge()
    again = await cluster.jobs.deploy(service())
    assert not again.changed and again.deployment_id is None and again.job.version == 1
    project = parse_project("services:\n  web:\n    cmd: sleep 30\n    instances: 3\n")
    assert [r.changed for r in await cluster.jobs.deploy_project(project)] == [False]
    assert [v.version for v in await cluster.jobs.versions("web")] == [1]
    plan = await cluster.step()
    assert not plan.place and not plan.stop


async def test_new_version_rolls_one_at_a_time(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(max_parallel=1, min_healthy_time=5))
    await cluster.converge()
    old_ids = {a.id for a in await cluster.live()}

    result = await cluster.jobs.deploy(service(cmd="sleep 31", max_parallel=1, min_healthy_time=5))
    assert result.changed and result.job.version == 2
    assert [v.version for v in await cluster.jobs.versions("web")] == [1, 2]
    plan = await cluster.step()
    assert len(plan.place) == 1 and not plan.stop  # surge one, stop none

    await cluster.report("healthy")
    cluster.now += 2
    plan = await cluster.step()
    assert not plan.stop and not plan.place  # new instance healthy, but not for min_healthy_time yet

    for _ in range(20):
        cluster.now += 6
        plan = await cluster.step()
        live = await cluster.live()
        assert sum(1 for a in live if a.client == "healthy") >= 2  # never below old count minus max_parallel
        assert sum(1 for a in live if a.client != "healthy") <= 1  # max_parallel new ones in flight
        assert all(s.alloc in old_ids for s in plan.stop)
        await cluster.report("healthy")
        await cluster.finish_stops()
        if not old_ids & {a.id for a in live}:
            break
    else:
        raise AssertionError("the rollout did not finish")
    await cluster.converge()
    live = await cluster.live()
    assert len(live) == 3 and not old_ids & {a.id for a in live} and all(a.version == 2 for a in live)
    assert not [a for a in await cluster.allocs() if a.desired == "stop"]  # stopped ones collected
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.version == 2 and d.status == "successful"


async def test_scale_up_and_down(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(instances=2))
    await cluster.converge()
    before = {a.id for a in await cluster.live()}

    job = await cluster.jobs.scale("web", 5)
    assert job.version == 2 and job.spec.instances == 5
    plan = await cluster.step()
    assert len(plan.place) == 3 and not plan.stop  # running instances stay; they only change version
    await cluster.converge()
    live = await cluster.live()
    assert len(live) == 5 and before <= {a.id for a in live} and all(a.version == 2 for a in live)

    await cluster.jobs.scale("web", 1)
    plan = await cluster.step()
    assert sorted(s.alloc.split(".")[1] for s in plan.stop) == ["1", "2", "3", "4"]  # highest indexes go
    await cluster.converge()
    assert [a.index for a in await cluster.live()] == [0]

    with pytest.raises(Unprocessable):
        await cluster.jobs.scale("web", -1)
    with pytest.raises(Unprocessable):
        await cluster.jobs.scale("web", "3")
    with pytest.raises(NotFound):
        await cluster.jobs.scale("nope", 3)


async def test_restart_rolls_every_instance(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(max_parallel=1))
    await cluster.converge()
    before = {a.id for a in await cluster.live()}
    job = await cluster.jobs.restart("web")
    assert job.generation == 1 and job.version == 1
    plan = await cluster.step()
    assert len(plan.place) == 1 and not plan.stop
    await cluster.converge()
    after = {a.id for a in await cluster.live()}
    assert len(after) == 3 and not before & after


async def test_stop_then_start_then_delete(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service())
    await cluster.converge()
    job = await cluster.jobs.stop("web")
    assert job.status == "stopped"
    plan = await cluster.step()
    assert len(plan.stop) == 3
    assert not await cluster.live()
    await cluster.finish_stops()
    await cluster.step()
    assert not await cluster.allocs()  # agents done: the records are collected

    started = await cluster.jobs.deploy(service())
    assert started.changed and started.job.status == "running" and started.job.version == 1
    await cluster.converge()
    assert len(await cluster.live()) == 3

    await cluster.jobs.delete("web")
    with pytest.raises(NotFound):
        await cluster.jobs.get("web")
    plan = await cluster.step()
    assert len(plan.stop) == 3
    await cluster.finish_stops()
    await cluster.step()
    assert not await cluster.allocs()
    with pytest.raises(NotFound):
        await cluster.jobs.delete("web")


async def test_scale_after_stop_starts_the_job_again(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(instances=3))
    await cluster.converge()
    await cluster.jobs.stop("web")
    await cluster.step()
    await cluster.finish_stops()
    await cluster.step()
    assert not await cluster.allocs()

    job = await cluster.jobs.scale("web", 2)
    assert job.status == "running" and job.spec.instances == 2
    await cluster.converge()
    assert sorted(a.index for a in await cluster.live()) == [0, 1]

    await cluster.jobs.stop("web")
    await cluster.step()
    job = await cluster.jobs.scale("web", 2)  # the same count: a fresh start of the same version
    assert job.status == "running" and job.version == 2 and job.generation == 1
    await cluster.converge()
    assert len(await cluster.live()) == 2
    await cluster.jobs.stop("web")
    assert (await cluster.jobs.scale("web", 0)).status == "stopped"  # nothing to start


async def test_kill_instances_stops_exactly_the_named_ones(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(instances=4))
    await cluster.converge()
    by_index = {a.index: a.id for a in await cluster.live()}
    job = await cluster.jobs.kill_instances("web", {0, 2})
    assert job.spec.instances == 2 and job.retired == (0, 2)
    plan = await cluster.step()
    assert sorted(s.alloc for s in plan.stop) == sorted([by_index[0], by_index[2]]) and not plan.place
    await cluster.converge()
    assert {a.id for a in await cluster.live()} == {by_index[1], by_index[3]}
    assert (await cluster.jobs.versions("web"))[-1].reason == "scaled to 2: killed instances 0, 2"

    await cluster.jobs.kill_instances("web", {3})  # only retired indexes below the survivor's are kept
    assert (await cluster.jobs.get("web")).retired == (0,)
    await cluster.converge()
    assert {a.id for a in await cluster.live()} == {by_index[1]}
    await cluster.jobs.scale("web", 3)
    await cluster.converge()
    assert sorted(a.index for a in await cluster.live()) == [1, 2, 3]
    await cluster.jobs.scale("web", 0)
    assert (await cluster.jobs.get("web")).retired == ()
    assert (await cluster.jobs.kill_instances("web", {7})).version == (await cluster.jobs.get("web")).version


async def test_waiting_for_a_dependency_is_recorded_then_cleared(cluster: Cluster) -> None:
    project = parse_project("services:\n  db: {cmd: sleep 30, health: {command: 'true'}}\n"
                            "  api: {cmd: sleep 30, instances: 2, depends_on: {db: healthy}}\n")
    await cluster.jobs.deploy_project(project)
    await cluster.step()
    assert not await cluster.allocs("api")
    assert (await cluster.jobs.waiting("api"))["api"]["reason"] == "waiting for db to be healthy"
    assert (await cluster.jobs.waiting())["api"]["indexes"] == [0, 1]
    await cluster.report("running", "db")
    await cluster.step()
    assert not await cluster.allocs("api")
    await cluster.report("healthy", "db", only_new=False)
    await cluster.step()
    assert len(await cluster.live("api")) == 2 and await cluster.jobs.waiting() == {}


async def test_conflicting_change_is_refused_unless_forced(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service())
    await cluster.step()  # the deployment is running; nothing is healthy yet
    with pytest.raises(Conflict) as refused:
        await cluster.jobs.deploy(service(cmd="sleep 99"))
    assert refused.value.status == 409 and refused.value.detail["deployment"] == "web.v1.g0"
    with pytest.raises(Conflict):
        await cluster.jobs.scale("web", 4)
    with pytest.raises(Conflict):
        await cluster.jobs.restart("web")
    with pytest.raises(Conflict):
        await cluster.jobs.deploy_project(parse_project("services:\n  web:\n    cmd: sleep 99\n"))
    assert (await cluster.jobs.get("web")).version == 1

    forced = await cluster.jobs.deploy(service(cmd="sleep 99"), force=True)
    assert forced.changed and forced.job.version == 2
    await cluster.step()
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.version == 2 and d.active
    await cluster.converge()
    assert {a.version for a in await cluster.live()} == {2}


async def test_canary_waits_for_promotion(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(canary=1, min_healthy_time=5))
    await cluster.converge()  # first version: no old instances, so no canaries
    old_ids = {a.id for a in await cluster.live()}

    await cluster.jobs.deploy(service(cmd="sleep 31", canary=1, min_healthy_time=5))
    plan = await cluster.step()
    assert len(plan.place) == 1 and plan.place[0].canary and not plan.stop
    with pytest.raises(Conflict):  # canary not healthy yet
        await cluster.jobs.promote("web")
    await cluster.report("healthy")
    for _ in range(3):
        cluster.now += 10
        plan = await cluster.step()
        assert not plan.place and not plan.stop  # waits, however long
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.status == "paused-for-promotion"
    assert old_ids <= {a.id for a in await cluster.live()}

    promoted = await cluster.jobs.promote("web")
    assert promoted.promoted
    await cluster.converge()
    live = await cluster.live()
    assert len(live) == 3 and not old_ids & {a.id for a in live}
    with pytest.raises(Conflict):
        await cluster.jobs.promote("web")  # nothing left to promote


async def test_failing_version_reverts_automatically(cluster: Cluster) -> None:
    policy = {"max_parallel": 1, "min_healthy_time": 5, "healthy_deadline": 30, "auto_revert": True}
    await cluster.jobs.deploy(service(**policy))
    await cluster.converge()
    assert (await cluster.jobs.get("web")).stable_version == 1
    old_ids = {a.id for a in await cluster.live()}

    await cluster.jobs.deploy(service(cmd="exit 1", **policy))
    plan = await cluster.step()
    assert len(plan.place) == 1
    await cluster.report("unhealthy")
    cluster.now += 31  # past healthy_deadline
    await cluster.step()
    job = await cluster.jobs.get("web")
    assert job.version == 3 and job.spec.cmd == "sleep 30"  # the stable spec again, as a new version
    assert (await cluster.jobs.versions("web"))[-1].reason.startswith("auto-revert to version 1")
    assert old_ids <= {a.id for a in await cluster.live()}  # the old version kept serving throughout

    await cluster.converge()
    live = await cluster.live()
    assert {a.id for a in live} == old_ids and all(a.version == 3 for a in live)
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.version == 3 and d.status == "successful"


async def test_rollback_goes_to_previous_stable_version(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service())
    await cluster.converge()
    await cluster.jobs.deploy(service(cmd="sleep 31"))
    await cluster.converge()
    job = await cluster.jobs.rollback("web")
    assert job.version == 3 and job.spec.cmd == "sleep 30"
    await cluster.converge()
    assert all(a.version == 3 for a in await cluster.live())


async def test_unplaceable_reason_is_reported(cluster: Cluster) -> None:
    await cluster.jobs.deploy(service(instances=2, memory=999_999))
    plan = await cluster.step()
    assert not plan.place and plan.unplaceable
    record = await cluster.jobs.unplaceable("web")
    assert record is not None and record["indexes"] == [0, 1] and "memory" in record["reason"]
    d = await cluster.jobs.deployment("web")
    assert d is not None and "unplaceable" in d.description
    commits = cluster.loop.commits
    await cluster.step()
    assert cluster.loop.commits == commits  # the same reason again is not a new write (no busy loop)

    await cluster.add_node("big", cpu=4000, memory=2_000_000)
    await cluster.step()
    assert len(await cluster.live()) == 2 and {a.node for a in await cluster.live()} == {"big"}
    assert await cluster.jobs.unplaceable("web") is None


async def test_limits_and_names_are_checked(cluster: Cluster) -> None:
    with pytest.raises(Unprocessable):
        await cluster.jobs.deploy(service(instances=1_000_000))
    with pytest.raises(NotFound):
        await cluster.jobs.get("missing")
    assert await cluster.jobs.list() == []


async def test_two_loops_never_double_place(cluster: Cluster) -> None:
    other = SchedulerLoop(cluster.store, clock=lambda: cluster.now)
    await cluster.jobs.deploy(service(instances=5))
    await asyncio.gather(cluster.loop.run_once(), other.run_once(), cluster.loop.run_once(), other.run_once())
    live = await cluster.live()
    assert sorted(a.index for a in live) == [0, 1, 2, 3, 4]
    raw = await cluster.store.range(ALLOCS, prefix=True)
    assert len(raw.kvs) == 5 and all(decode_alloc(kv.value).desired == "run" for kv in raw.kvs)


async def test_running_loop_converges_and_heals_after_restart() -> None:
    """The real loop on the real clock: watches, the recheck timer while rolling, and a restart in between."""
    store = await SqliteStore.open(None)
    try:
        await store.put(node_key("node-1"), encode_node(Node("node-1", 4000, 4096)))
        jobs = JobService(store)
        fast = {"min_healthy_time": 0.1, "max_parallel": 2}

        async def report_healthy() -> None:
            for alloc, status in await jobs.allocations():
                if alloc.desired == "run" and status is None:
                    s = AllocStatus(client="healthy", healthy_since=time.time(), updated_at=time.time())
                    await store.put(alloc_status_key(alloc.node, alloc.id), encode_status(s))
                elif alloc.desired == "stop" and status is not None:
                    await store.delete(alloc_status_key(alloc.node, alloc.id))

        async def until(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + timeout
            while not await check():
                assert time.monotonic() < deadline, "the loop did not converge"
                await report_healthy()
                await asyncio.sleep(0.02)

        async def done(version: int, count: int) -> bool:
            d = await jobs.deployment("web")
            live = [a for a, _ in await jobs.allocations("web")]
            return (d is not None and d.version == version and d.status == "successful" and len(live) == count
                    and all(a.desired == "run" and a.version == version for a in live))

        loop = SchedulerLoop(store)
        await loop.start()
        await jobs.deploy(service(instances=3, **fast))
        await until(lambda: done(1, 3))
        await jobs.deploy(service(cmd="sleep 31", instances=3, **fast))
        await until(lambda: done(2, 3))
        await loop.stop()

        # Changes while no loop runs (a restart, or events missed) are picked up by the next one.
        await jobs.scale("web", 4)
        await asyncio.sleep(0.1)
        assert len(await jobs.allocations("web")) == 3
        loop = SchedulerLoop(store)
        await loop.start()
        await until(lambda: done(3, 4))
        await loop.stop()
    finally:
        await store.close()


# ---- the HTTP API against a real server --------------------------------------------------------------

SLOW_YAML = """
services:
  api-held:
    cmd: sleep 30
    instances: 1
    update:
      min_healthy_time: 1h
"""


def _api(server, path: str) -> str:  # type: ignore[no-untyped-def]
    return f"{server.url}/api/v1{path}"


def _error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["error"]
    return body


def test_http_deploy_inspect_and_delete(server) -> None:  # type: ignore[no-untyped-def]
    yaml_text = "services:\n  api-web:\n    cmd: sleep 30\n    instances: 2\n"
    r = requests.post(_api(server, "/jobs"), data=yaml_text, headers={"Content-Type": "application/yaml"}, timeout=10)
    assert r.status_code == 201, r.text
    [deployed] = r.json()["deployed"]
    assert deployed["changed"] and deployed["job"]["id"] == "api-web" and deployed["job"]["version"] == 1
    again = requests.post(_api(server, "/jobs"), data=yaml_text, timeout=10)
    assert again.status_code == 200 and not again.json()["deployed"][0]["changed"]

    spec = {"name": "api-json", "cmd": "sleep 30", "instances": 1}
    r = requests.post(_api(server, "/jobs"), json=spec, timeout=10)
    assert r.status_code == 201, r.text

    listed = requests.get(_api(server, "/jobs"), timeout=10).json()["jobs"]
    assert {"api-web", "api-json"} <= {j["id"] for j in listed}

    deadline = time.monotonic() + 20
    while True:
        body = requests.get(_api(server, "/jobs/api-web"), timeout=10).json()
        if body["deployment"] is not None:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["job"]["spec"]["instances"] == 2 and body["instances"]["desired"] == 2
    assert "allocations" in body and "unplaceable" in body
    # Placed on the server's node, or reported unplaceable with a reason when no node offers capacity.
    assert len(body["allocations"]) == 2 or body["unplaceable"]["reason"]
    assert requests.get(_api(server, "/deployments"), timeout=10).status_code == 200
    assert requests.get(_api(server, "/allocs?job=api-web"), timeout=10).status_code == 200
    versions = requests.get(_api(server, "/jobs/api-web/versions"), timeout=10).json()["versions"]
    assert [v["version"] for v in versions] == [1]

    r = requests.post(_api(server, "/jobs/api-web/scale"), json={"instances": 1, "force": True}, timeout=10)
    assert r.status_code == 200 and r.json()["job"]["version"] == 2
    assert requests.post(_api(server, "/jobs/api-web/stop"), timeout=10).json()["job"]["status"] == "stopped"
    for job in ("api-web", "api-json"):
        assert requests.delete(_api(server, f"/jobs/{job}"), timeout=10).status_code == 200
    _error(requests.get(_api(server, "/jobs/api-web"), timeout=10), 404)


def test_http_conflict_and_force(server) -> None:  # type: ignore[no-untyped-def]
    assert requests.post(_api(server, "/jobs"), data=SLOW_YAML, timeout=10).status_code == 201
    deadline = time.monotonic() + 20
    while requests.get(_api(server, "/jobs/api-held"), timeout=10).json()["deployment"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    changed = SLOW_YAML.replace("sleep 30", "sleep 31")
    body = _error(requests.post(_api(server, "/jobs"), data=changed, timeout=10), 409)
    assert body["detail"][0]["job"] == "api-held"
    _error(requests.post(_api(server, "/jobs/api-held/restart"), timeout=10), 409)
    _error(requests.post(_api(server, "/jobs/api-held/promote"), timeout=10), 409)  # no canaries
    r = requests.post(_api(server, "/jobs?force=1"), data=changed, timeout=10)
    assert r.status_code == 201 and r.json()["deployed"][0]["job"]["version"] == 2
    r = requests.post(_api(server, "/jobs/api-held/rollback"), timeout=10)
    assert r.status_code == 200 and r.json()["job"]["spec"]["cmd"] == "sleep 30"
    assert requests.delete(_api(server, "/jobs/api-held"), timeout=10).status_code == 200


def test_http_unplaceable_reason_is_visible(server) -> None:  # type: ignore[no-untyped-def]
    spec = {"name": "api-huge", "cmd": "sleep 30", "instances": 2, "resources": {"memory": 50_000_000}}
    assert requests.post(_api(server, "/jobs"), json=spec, timeout=10).status_code == 201
    deadline = time.monotonic() + 20
    while (body := requests.get(_api(server, "/jobs/api-huge"), timeout=10).json())["unplaceable"] is None:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["unplaceable"]["indexes"] == [0, 1] and body["unplaceable"]["reason"]
    assert body["allocations"] == []
    assert requests.delete(_api(server, "/jobs/api-huge"), timeout=10).status_code == 200


def _cli(server, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, *args],
                          capture_output=True, text=True, timeout=60)


def _running(server, job: str) -> list[dict]:  # type: ignore[no-untyped-def]
    allocs = requests.get(_api(server, f"/allocs?job={job}"), timeout=10).json()["allocations"]
    return [a for a in allocs if a["desired"] == "run" and (a["status"] or {}).get("client") == "healthy"]


def _wait(what: str, check, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_cli_scale_after_stop_runs_the_job_again(server) -> None:  # type: ignore[no-untyped-def]
    spec = {"name": "api-again", "cmd": "sleep 60", "instances": 1, "resources": {"cpu": 10, "memory": 16}}
    assert requests.post(_api(server, "/jobs"), json=spec, timeout=10).status_code == 201
    _wait("1 running instance", lambda: len(_running(server, "api-again")) == 1)
    stopped = _cli(server, "stop", "api-again")
    assert stopped.returncode == 0, stopped.stderr
    _wait("no instances", lambda: not requests.get(_api(server, "/allocs?job=api-again"), timeout=10)
          .json()["allocations"])

    scaled = _cli(server, "scale", "api-again", "2")
    assert scaled.returncode == 0 and "scale to 2 done" in scaled.stdout, scaled.stderr  # it waits until done
    _wait("2 running instances", lambda: len(_running(server, "api-again")) == 2)
    job = requests.get(_api(server, "/jobs/api-again"), timeout=10).json()["job"]
    assert job["status"] == "running" and job["spec"]["instances"] == 2
    assert requests.delete(_api(server, "/jobs/api-again"), timeout=10).status_code == 200


def test_http_bad_input_gets_clear_errors(server) -> None:  # type: ignore[no-untyped-def]
    jobs = _api(server, "/jobs")
    body = _error(requests.post(jobs, data="services:\n  web: [unclosed\n", timeout=10), 422)
    assert "invalid YAML" in body["error"] and body["detail"][0]["line"]
    body = _error(requests.post(jobs, data="services:\n  web:\n    cmd: x\n    instances: three\n", timeout=10), 422)
    assert any(p["path"] == "services.web.instances" for p in body["detail"])
    body = _error(requests.post(jobs, json={"cmd": "x"}, timeout=10), 422)
    assert body["detail"][0]["path"] == "name"
    _error(requests.post(jobs, json={"name": "web", "cmd": 5, "instances": -1}, timeout=10), 422)
    _error(requests.post(jobs, json=[1, 2], timeout=10), 422)
    _error(requests.post(jobs, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10), 400)
    _error(requests.post(jobs, data=b"", timeout=10), 400)
    _error(requests.post(jobs, data=b"\xff\xfe\x00bad", headers={"Content-Type": "text/yaml"}, timeout=10), 400)
    _error(requests.post(jobs, data=b"x" * (2 << 20), timeout=30), 413)
    _error(requests.post(jobs + "?force=maybe", data="services:\n  a:\n    cmd: x\n", timeout=10), 400)
    _error(requests.post(jobs, json={"name": "huge", "cmd": "x", "instances": 10**9}, timeout=10), 422)
    # A YAML alias bomb: a few hundred bytes that would expand to 9^9 values.
    bomb = ["x-bomb:", '  a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    bomb += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb += ["services:", "  web:", "    cmd: x", "    tags: *a8"]
    body = _error(requests.post(jobs, data="\n".join(bomb), timeout=60), 422)
    assert "expands" in body["error"]

    _error(requests.get(_api(server, "/jobs/no-such-job"), timeout=10), 404)
    _error(requests.delete(_api(server, "/jobs/no-such-job"), timeout=10), 404)
    _error(requests.post(_api(server, "/jobs/no-such-job/scale"), json={"instances": 2}, timeout=10), 404)
    _error(requests.post(_api(server, "/jobs/no-such-job/promote"), timeout=10), 404)
    _error(requests.post(_api(server, "/jobs/no-such-job/rollback"), timeout=10), 404)
    _error(requests.get(_api(server, "/allocs/no-such-alloc"), timeout=10), 404)

    assert requests.post(jobs, json={"name": "api-bad", "cmd": "sleep 30", "instances": 0}, timeout=10).ok
    scale = _api(server, "/jobs/api-bad/scale")
    _error(requests.post(scale, json={"instances": "x"}, timeout=10), 422)
    _error(requests.post(scale, json={"instances": 1.5}, timeout=10), 422)
    _error(requests.post(scale, json={}, timeout=10), 400)
    _error(requests.post(scale, data=b"[", timeout=10), 400)
    _error(requests.post(scale, json=[1], timeout=10), 400)
    _error(requests.post(scale, data=b"x" * (1 << 20), timeout=30), 413)
    assert requests.delete(_api(server, "/jobs/api-bad"), timeout=10).status_code == 200

    # Still serving, and nothing half-written.
    assert requests.get(server.url + "/v1/status/leader", timeout=10).status_code == 200
    names = {j["id"] for j in requests.get(jobs, timeout=10).json()["jobs"]}
    assert not names & {"web", "huge", "api-bad"}



HOG = "block = b'x' * (64 << 20)\nwhile True:\n    sum(range(10_000))"  # 64 MiB resident and one core busy


def test_http_allocs_usage_is_the_instances_real_cpu_and_memory(server) -> None:  # type: ignore[no-untyped-def]
    """?usage=1: each instance's CPU share and resident memory, read from /proc by the server's node agent."""
    jobs = [{"name": "api-hog", "cmd": f"{sys.executable} -c {shlex.quote(HOG)}", "instances": 1,
             "resources": {"cpu": 10, "memory": 256}},
            {"name": "api-idle", "cmd": "sleep 60", "instances": 1, "resources": {"cpu": 10, "memory": 16}}]
    for spec in jobs:
        assert requests.post(_api(server, "/jobs"), json=spec, timeout=10).status_code == 201

    def usage(job: str) -> dict | None:
        [alloc] = _wait(f"{job} running", lambda: _running(server, job))
        [row] = requests.get(_api(server, f"/allocs?job={job}&usage=1"), timeout=10).json()["allocations"]
        return row["usage"] if row["id"] == alloc["id"] else None

    hog = _wait("the hog's usage with its block resident", lambda: (u := usage("api-hog")) and
                u["rss_bytes"] >= 64 << 20 and u)
    assert hog["cpu_percent"] > 0 and hog["cpu_seconds"] > 0 and hog["processes"] >= 1
    later = _wait("more CPU time on the next reading", lambda: (u := usage("api-hog")) and
                  u["cpu_seconds"] > hog["cpu_seconds"] and u)
    assert later["cpu_percent"] > 0  # measured over the time between the two readings
    idle = _wait("the idle instance's usage", lambda: usage("api-idle"))
    assert 0 < idle["rss_bytes"] < 64 << 20 and idle["cpu_percent"] < later["cpu_percent"]

    alloc_id = _running(server, "api-hog")[0]["id"]
    one = requests.get(_api(server, f"/allocs/{alloc_id}?usage=1"), timeout=10).json()["allocation"]
    assert one["usage"]["rss_bytes"] >= 64 << 20
    plain = requests.get(_api(server, "/allocs?job=api-hog"), timeout=10).json()["allocations"]
    assert all("usage" not in a for a in plain)  # only when asked: it costs a /proc pass
    _error(requests.get(_api(server, "/allocs?usage=maybe"), timeout=10), 400)
    # `shipyard ps --json` has them too.
    listed = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, "ps", "api-hog",
                             "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    [row] = [a for a in json.loads(listed.stdout)["allocations"] if a["desired"] == "run"]
    assert row["usage"]["rss_bytes"] >= 64 << 20
    for spec in jobs:
        assert requests.delete(_api(server, f"/jobs/{spec['name']}"), timeout=10).status_code == 200
