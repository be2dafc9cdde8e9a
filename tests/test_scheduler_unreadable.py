"""A job record the scheduler cannot decode: quarantined (its instances left alone, the error shown and logged at
ERROR), never taken for a deleted job, and never in the way of any other job's plan; plans commit per job."""

from __future__ import annotations

import logging

import pytest
import requests

from shipyard.errors import Conflict
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.scheduler.records import deployment_key, job_key
from shipyard.store import SqliteStore
from support import ServerProcess
from test_jobs_api import Cluster, service

BROKEN = b'{"id": "web", "version": "not a number", "spec": {}}'


@pytest.fixture
async def cluster():  # type: ignore[no-untyped-def]
    store = await SqliteStore.open(None)
    c = Cluster(store)
    await c.add_node()
    yield c
    await store.close()


async def _web_running(cluster: Cluster) -> set[str]:
    await cluster.jobs.deploy(service("web", instances=2))
    await cluster.converge("web")
    return {a.id for a in await cluster.live("web")}


async def test_an_unreadable_job_is_left_alone_and_blocks_no_other_job(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    web = await _web_running(cluster)
    await cluster.store.put(job_key("web"), BROKEN)
    await cluster.jobs.deploy(service("api", instances=2))
    # A scheduler that never saw web readable (a restarted server): nothing to plan web from.
    fresh = SchedulerLoop(cluster.store, clock=lambda: cluster.now)
    with caplog.at_level(logging.ERROR, logger="shipyard.scheduler"):
        plan, _ = await fresh.run_once()
    assert sorted(a.index for a in plan.place if a.job == "api") == [0, 1], "api was held back by web's record"
    assert not plan.stop, "web's instances must not be stopped as if the job were deleted"
    assert {a.id for a in await cluster.live("web")} == web
    assert sorted(a.index for a in await cluster.live("api")) == [0, 1]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "web" in r.getMessage()]
    assert len(errors) == 1 and "cannot be read" in errors[0].getMessage()
    await cluster.report("healthy", "api")
    await fresh.run_once()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1, "logged once per record version"

    [entry] = await cluster.jobs.unreadable()
    assert entry["id"] == "web" and entry["key"] == job_key("web") and entry["error"]
    with pytest.raises(Conflict, match="cannot be read"):
        await cluster.jobs.get("web")
    # Deleting the job is the way out: its instances then stop.
    await cluster.jobs.delete("web")
    plan, _ = await fresh.run_once()
    assert {s.alloc for s in plan.stop} == web


async def test_a_scheduler_that_saw_the_job_plans_it_from_its_last_good_version(cluster: Cluster) -> None:
    web = await _web_running(cluster)
    await cluster.store.put(job_key("web"), BROKEN)
    # web's instance 0 is lost; the loop (which has web's last good version) replaces it.
    lost = sorted(await cluster.live("web"), key=lambda a: a.index)[0]
    await cluster.report("lost", "web", only_new=False)
    await cluster.jobs.deploy(service("api", instances=1))
    plan, _ = await cluster.loop.run_once()
    assert sorted(a.job for a in plan.place) == ["api", "web", "web"]
    assert lost.id in {s.alloc for s in plan.stop} and web <= {s.alloc for s in plan.stop}
    assert all(a.version == 1 for a in plan.place if a.job == "web")


def test_the_jobs_api_shows_an_unreadable_record(fresh_server: ServerProcess) -> None:
    url = fresh_server.url
    stored = requests.put(f"{url}/api/v1/store/kv/{job_key('broken')}", data=BROKEN, timeout=10,
                          headers={"Content-Type": "application/octet-stream"})
    assert stored.status_code == 200, stored.text
    listing = requests.get(f"{url}/api/v1/jobs", timeout=10).json()
    [entry] = listing["unreadable"]
    assert entry["id"] == "broken" and "ValueError" in entry["error"]
    one = requests.get(f"{url}/api/v1/jobs/broken", timeout=10)
    assert one.status_code == 409
    assert "cannot be read" in one.json()["error"]
    assert "Traceback" not in fresh_server.log_tail()
    assert "cannot be read" in fresh_server.log_tail(20000)


async def test_an_unreadable_deployment_record_is_replaced_not_a_wedge(cluster: Cluster) -> None:
    web = await _web_running(cluster)
    await cluster.store.put(deployment_key("web"), b"\xff not json")
    await cluster.jobs.deploy(service("api", instances=1))
    plan, _ = await cluster.loop.run_once()
    assert [a.job for a in plan.place] == ["api"] and not plan.stop
    await cluster.step()
    d = await cluster.jobs.deployment("web")
    assert d is not None and d.version == 1, "web's deployment record was written afresh"
    assert {a.id for a in await cluster.live("web")} == web
