"""shipyard.sdk.client against real instances registered with a real server: round-robin, a kill -9ed instance
retried past and then dropped, a new instance picked up from the blocking query, the circuit breaker, correlation
headers carried from an incoming request to an outgoing call, retries of 503s held to the retry budget; the budget
and breaker rules also in isolation.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sdk_support import ServiceInstance, statuses, stop_all, wait_catalog
from shipyard.sdk import ServiceUnavailable
from shipyard.sdk import client as service_client
from shipyard.sdk.client import CircuitBreaker, RetryBudget
from support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("sdk-client") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


@pytest.fixture
def fleet(server: ServerProcess, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(server, tmp_path)
    yield fleet
    stop_all(fleet.started)


class Fleet:
    def __init__(self, server: ServerProcess, log_dir: Path) -> None:
        self.server, self.log_dir = server, log_dir
        self.started: list[ServiceInstance] = []

    def launch(self, name: str, count: int = 1, **env: str) -> list[ServiceInstance]:
        out = [ServiceInstance(self.server, name, self.log_dir, SHIPYARD_CHECK_TTL="1", **env) for _ in range(count)]
        self.started += out
        for instance in out:
            instance.spawn()
        for instance in out:
            instance.wait_ready()
        ids = {i.service_id for i in out}
        wait_catalog(self.server, name, lambda es: ids <= {k for k, v in statuses(es).items() if v == "passing"})
        return out


async def test_round_robin_across_instances(server: ServerProcess, fleet: Fleet) -> None:
    instances = fleet.launch("rr", 3)
    rr = service_client("rr", server=server.addr)
    seen = collections.Counter()
    for _ in range(30):
        r = await rr.get("/whoami")
        assert r.status_code == 200
        seen[r.json()["id"]] += 1
    assert seen == {i.service_id: 10 for i in instances}
    await rr.aclose()


async def test_killed_instance_is_retried_past_then_dropped_and_a_new_one_is_picked_up(
    server: ServerProcess, fleet: Fleet
) -> None:
    first = fleet.launch("churn", 3)
    churn = service_client("churn", server=server.addr)
    assert {i.id for i in await churn.instances()} == {i.service_id for i in first}

    victim = first[0]
    victim.kill9()
    # Still listed as passing until its TTL runs out: calls that land on it are retried on another instance.
    for _ in range(9):
        r = await churn.get("/whoami")
        assert r.status_code == 200 and r.json()["id"] != victim.service_id
    # A refused connection means the request never left: even a POST is safely sent to another instance.
    for n in range(3):
        r = await churn.post("/echo", content=f"payload {n}".encode())
        assert r.status_code == 200 and r.json()["body"] == f"payload {n}"
    await churn.wait_for_instances(lambda found: victim.service_id not in {i.id for i in found})

    newcomer = fleet.launch("churn", 1)[0]
    # The client's blocking query wakes on the registration; nothing here asks the server again.
    found = await churn.wait_for_instances(lambda found: newcomer.service_id in {i.id for i in found})
    assert {i.id for i in found} == {first[1].service_id, first[2].service_id, newcomer.service_id}
    ids = collections.Counter()
    for _ in range(6):
        ids[(await churn.get("/whoami")).json()["id"]] += 1
    assert ids[newcomer.service_id] == 2
    await churn.aclose()


async def test_circuit_opens_on_a_failing_instance(server: ServerProcess, fleet: Fleet) -> None:
    good = fleet.launch("flaky")[0]
    bad = fleet.launch("flaky", SDK_TEST_FAIL="1")[0]
    flaky = service_client("flaky", server=server.addr, circuit_reset=300)
    statuses_seen = collections.Counter()
    for _ in range(30):
        statuses_seen[(await flaky.get("/whoami")).status_code] += 1
    # 500 is not retried (only 502-504 are), so the first five failures reach the caller; then the circuit opens.
    assert statuses_seen == {500: 5, 200: 25}
    assert flaky.breakers[bad.service_id].is_open and not flaky.breakers[good.service_id].is_open
    bad_metrics = requests.get(bad.url + "/metrics", timeout=5).text
    assert 'http_requests_total{method="GET",route="/whoami",status_class="5xx"} 5' in bad_metrics
    await flaky.aclose()


def _whoami_served(instance: ServiceInstance) -> int:
    """/whoami requests an instance answered, by its own /metrics."""
    text = requests.get(instance.url + "/metrics", timeout=5).text
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "http_requests_total" and s.labels.get("route") == "/whoami"))


async def test_retries_of_overloaded_answers_stay_within_the_budget(server: ServerProcess, fleet: Fleet) -> None:
    """An instance answering 503 (overloaded): a GET that lands on it is retried on the other instance, but only as
    many times as the budget allows (20% of the requests, no floor here); the rest get the 503."""
    good = fleet.launch("overloaded")[0]
    bad = fleet.launch("overloaded", SDK_TEST_FAIL="503")[0]
    overloaded = service_client("overloaded", server=server.addr, circuit_threshold=1_000_000,
                                retry_budget=RetryBudget(ratio=0.2, per_second=0.0, window=600.0))
    seen = collections.Counter()
    for _ in range(40):
        seen[(await overloaded.get("/whoami")).status_code] += 1
    on_bad, on_good = _whoami_served(bad), _whoami_served(good)
    retried = on_good + on_bad - 40  # answers the caller never saw: each was retried on the good instance
    assert seen[200] + seen[503] == 40 and seen[503] == on_bad - retried
    assert on_bad >= 15 and 1 <= retried <= 8  # round-robin sends about half to the bad one; 20% of 40 is 8
    await overloaded.aclose()


async def test_correlation_headers_travel_from_incoming_request_to_outgoing_call(
    server: ServerProcess, fleet: Fleet
) -> None:
    fleet.launch("back")
    front = fleet.launch("front")[0]
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = requests.get(front.url + "/relay/back", headers={"X-Correlation-ID": "corr-42", "traceparent": traceparent},
                     timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seen_here"] == "corr-42"
    assert body["downstream"]["headers"]["x-correlation-id"] == "corr-42"
    assert body["downstream"]["headers"]["traceparent"] == traceparent

    # Without one, the front service makes an id and the downstream call carries that same id.
    body = requests.get(front.url + "/relay/back", timeout=10).json()
    assert body["seen_here"] and body["downstream"]["headers"]["x-correlation-id"] == body["seen_here"]


async def test_streamed_response(server: ServerProcess, fleet: Fleet) -> None:
    fleet.launch("streamer")
    streamer = service_client("streamer", server=server.addr)
    async with streamer.stream("POST", "/echo", content=b"x" * 100_000, headers={"X-Request-ID": "r-1"}) as r:
        assert r.status_code == 200
        body = b"".join([chunk async for chunk in r.aiter_bytes()])
    assert len(body) > 100_000 and body.startswith(b'{"body":"xxx')
    await streamer.aclose()


async def test_no_instance_raises_service_unavailable(server: ServerProcess) -> None:
    nobody = service_client("nobody-runs-this", server=server.addr)
    with pytest.raises(ServiceUnavailable, match="no passing instance"):
        await nobody.get("/")
    await nobody.aclose()


def test_retry_budget_allows_a_floor_plus_a_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, per_second=0.5, window=10.0)  # floor: 5 retries per 10 s
    for _ in range(100):
        budget.record_request(0.0)
    allowed = sum(budget.try_retry(1.0) for _ in range(100))
    assert allowed == 25  # 5 + 20% of 100
    assert budget.try_retry(11.5)  # the window moved on: old requests and retries no longer count


def test_circuit_breaker_half_opens_with_a_single_probe() -> None:
    breaker = CircuitBreaker(threshold=3, reset_after=10.0)
    for t in range(3):
        assert breaker.allows(float(t))
        breaker.failed(float(t))
    assert breaker.is_open and not breaker.allows(5.0)
    assert breaker.allows(13.0)  # half-open: one probe
    assert not breaker.allows(13.1)  # and only one
    breaker.failed(13.2)
    assert breaker.is_open and not breaker.allows(20.0)
    assert breaker.allows(23.3)
    breaker.succeeded()
    assert not breaker.is_open and breaker.allows(23.4)
