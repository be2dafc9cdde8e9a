"""shipyard.sdk.Service: self-registration with a TTL check against a real server (heartbeats, deregistration on
SIGTERM while in-flight requests finish, critical then removed after kill -9, the health callable failing the check),
scheduled mode leaving registration to the agent; /health, /metrics and correlation ids in front of the app.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from sdk_support import ServiceInstance, health_entries, service_check, statuses, stop_all, wait_catalog
from shipyard.sdk import Service, correlation_id
from support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("sdk-service") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


@pytest.fixture
def instances(server: ServerProcess, tmp_path: Path) -> Iterator[list[ServiceInstance]]:
    started: list[ServiceInstance] = []
    yield started
    stop_all(started)


def launch(started: list[ServiceInstance], server: ServerProcess, name: str, tmp_path: Path,
           **env: str) -> ServiceInstance:
    instance = ServiceInstance(server, name, tmp_path, **env)
    started.append(instance)
    return instance.start()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# ---- against a real server ----------------------------------------------------------------------


def test_registers_heartbeats_and_deregisters_on_sigterm_after_finishing_in_flight(
    server: ServerProcess, instances: list[ServiceInstance], tmp_path: Path
) -> None:
    svc = launch(instances, server, "selfreg", tmp_path, SHIPYARD_CHECK_TTL="1")
    entries = wait_catalog(server, "selfreg", lambda es: statuses(es).get(svc.service_id) == "passing")
    entry = next(e for e in entries if e["Service"]["ID"] == svc.service_id)
    assert entry["Service"]["Port"] == svc.port and entry["Service"]["Address"] == "127.0.0.1"
    assert entry["Service"]["Tags"] == ["sdk-test"]
    check = service_check(entry)
    assert check["CheckID"] == f"service:{svc.service_id}" and check["Type"] == "ttl"
    assert check["Definition"]["TTL"] == "1s" and check["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s"

    # Heartbeats keep a 1 s TTL check passing: a blocking query over 3 s sees no change (or only passing ones).
    entries, index = health_entries(server, "selfreg")
    for _ in range(3):
        entries, index = health_entries(server, "selfreg", index, wait="1s")
        assert statuses(entries) == {svc.service_id: "passing"}

    # A request in flight when SIGTERM arrives still gets its answer; the instance leaves the catalog first.
    answer: dict[str, Any] = {}

    def slow_call() -> None:
        r = requests.get(svc.url + "/slow", params={"seconds": "1.5"}, timeout=20)
        answer.update(status=r.status_code, body=r.json())

    caller = threading.Thread(target=slow_call)
    caller.start()
    metrics_url = svc.url + "/metrics"
    while metric_samples(requests.get(metrics_url, timeout=5).text)[("http_requests_in_flight", ())] < 1:
        time.sleep(0.02)  # until the slow request has reached the app
    stopping = threading.Thread(target=lambda: answer.update(exit_code=svc.terminate()))
    stopping.start()
    wait_catalog(server, "selfreg", lambda es: svc.service_id not in statuses(es), timeout=10)
    caller.join(20)
    stopping.join(20)
    assert answer["status"] == 200 and answer["body"]["slept"] is True
    assert answer["exit_code"] == 0, svc.log_tail()
    assert "deregistered selfreg" in svc.log_tail()


def test_kill9_goes_critical_then_is_removed(
    server: ServerProcess, instances: list[ServiceInstance], tmp_path: Path
) -> None:
    svc = launch(instances, server, "doomed", tmp_path, SHIPYARD_CHECK_TTL="1", SHIPYARD_DEREGISTER_AFTER="2")
    wait_catalog(server, "doomed", lambda es: statuses(es).get(svc.service_id) == "passing")
    svc.kill9()
    entries = wait_catalog(server, "doomed", lambda es: statuses(es).get(svc.service_id) == "critical")
    assert "TTL expired" in service_check(entries[0])["Output"]
    wait_catalog(server, "doomed", lambda es: es == [])


def test_failing_health_callable_fails_the_check_until_it_recovers(
    server: ServerProcess, instances: list[ServiceInstance], tmp_path: Path
) -> None:
    marker = tmp_path / "unhealthy"
    svc = launch(instances, server, "moody", tmp_path, SHIPYARD_CHECK_TTL="1", SDK_TEST_UNHEALTHY_IF=str(marker))
    wait_catalog(server, "moody", lambda es: statuses(es).get(svc.service_id) == "passing")
    assert requests.get(svc.url + "/health", timeout=5).json() == {"status": "ok"}

    marker.touch()
    r = requests.get(svc.url + "/health", timeout=5)
    assert r.status_code == 503 and r.json() == {"status": "failing"}
    entries = wait_catalog(server, "moody", lambda es: statuses(es).get(svc.service_id) == "critical")
    assert "failing" in service_check(entries[0])["Output"]
    passing = requests.get(f"{server.url}/v1/health/service/moody", params={"passing": "1"}, timeout=5).json()
    assert passing == []

    marker.unlink()
    wait_catalog(server, "moody", lambda es: statuses(es).get(svc.service_id) == "passing")


def test_service_started_before_the_server_registers_once_it_answers(
    instances: list[ServiceInstance], tmp_path: Path
) -> None:
    late = ServerProcess(tmp_path / "late-data", "--no-gateway")  # ports chosen, not started yet
    svc = launch(instances, late, "early", tmp_path, SHIPYARD_CHECK_TTL="1")
    assert requests.get(svc.url + "/health", timeout=5).json() == {"status": "ok"}  # serves without a server
    late.start()
    try:
        wait_catalog(late, "early", lambda es: statuses(es).get(svc.service_id) == "passing")
    finally:
        svc.stop()
        late.stop()
    assert "cannot reach the shipyard server" in svc.log_tail()


def test_scheduled_instance_leaves_registration_to_the_agent(
    server: ServerProcess, instances: list[ServiceInstance], tmp_path: Path
) -> None:
    svc = launch(instances, server, "placed", tmp_path, SHIPYARD_ALLOC_ID="alloc-1234", SHIPYARD_CHECK_TTL="1")
    assert requests.get(svc.url + "/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(svc.url + "/whoami", timeout=5).json() == {"id": "alloc-1234", "port": svc.port}
    entries, index = health_entries(server, "placed")
    assert entries == []
    # Registration would follow serving within milliseconds: a 2 s blocking query would wake on it.
    entries, _ = health_entries(server, "placed", index, wait="2s")
    assert entries == []
    assert "scheduled: the agent registers it" in svc.log_tail()
    assert svc.terminate() == 0


async def test_serve_in_process_registers_runs_hooks_and_stops(server: ServerProcess) -> None:
    calls: list[str] = []
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    service = Service(app, name="embedded", port=0, server=server.addr, ttl=2)

    @service.on_startup
    async def started() -> None:
        calls.append("startup")

    @service.on_shutdown
    async def stopped() -> None:
        calls.append("shutdown")

    serving = asyncio.create_task(service.serve())
    # A blocking query may answer after its wait plus Consul's jitter (wait/16): beyond httpx's default 5 s timeout.
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        index = 0
        while True:
            r = await http.get("/v1/health/service/embedded", params={"index": index, "wait": "5s"} if index else {})
            index = int(r.headers["X-Consul-Index"])
            if statuses(r.json()).get(service.service_id) == "passing":
                break
        assert service.port > 0 and service.service_id == f"embedded-127.0.0.1-{service.port}"
        async with httpx.AsyncClient() as direct:
            assert (await direct.get(f"http://127.0.0.1:{service.port}/")).text == "hi"
        service.stop()
        await asyncio.wait_for(serving, 15)
        r = await http.get("/v1/health/service/embedded")
        assert r.json() == []
    assert calls == ["startup", "shutdown"]


# ---- the ASGI middleware, in process ------------------------------------------------------------


def make_service(health: Any = None) -> Service:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"], "correlation": correlation_id()})

    async def boom(request: Request) -> JSONResponse:
        return JSONResponse({"error": "nope"}, status_code=502)

    app = Starlette(routes=[Route("/items/{item_id}", item), Route("/boom", boom)])
    return Service(app, name="inproc", health=health)


async def test_health_endpoint_reflects_the_health_callable() -> None:
    async def transport_get(service: Service, path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service.asgi), base_url="http://t") as c:
            return await c.get(path)

    r = await transport_get(make_service(), "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}

    async def db_down() -> dict[str, Any]:
        return {"ok": False, "db": "unreachable"}

    r = await transport_get(make_service(db_down), "/health")
    assert r.status_code == 503 and r.json() == {"ok": False, "db": "unreachable", "status": "failing"}

    def raises() -> bool:
        raise RuntimeError("disk full")

    r = await transport_get(make_service(raises), "/health")
    assert r.status_code == 503 and r.json() == {"status": "failing", "error": "RuntimeError: disk full"}

    r = await transport_get(make_service(lambda: True), "/health")
    assert r.status_code == 200


async def test_metrics_count_requests_by_route_template_and_status_class() -> None:
    service = make_service()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service.asgi), base_url="http://t") as c:
        for i in range(3):
            assert (await c.get(f"/items/{i}")).status_code == 200
        assert (await c.get("/boom")).status_code == 502
        assert (await c.get("/nowhere")).status_code == 404
        await c.get("/health")
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(r.text)
    key = (("method", "GET"), ("route", "/items/{item_id}"), ("status_class", "2xx"))
    assert samples[("http_requests_total", key)] == 3
    assert samples[("http_requests_total", (("method", "GET"), ("route", "/boom"), ("status_class", "5xx")))] == 1
    assert samples[("http_requests_total", (("method", "GET"), ("route", "<unmatched>"), ("status_class", "4xx")))] == 1
    assert samples[("http_request_duration_seconds_count", (("method", "GET"), ("route", "/items/{item_id}")))] == 3
    assert samples[("http_request_duration_seconds_bucket",
                    (("le", "+Inf"), ("method", "GET"), ("route", "/items/{item_id}")))] == 3
    assert samples[("http_requests_in_flight", ())] == 0
    # /health and /metrics themselves are not counted
    assert not any(dict(labels).get("route") in ("/health", "/metrics") for _, labels in samples)
    # the process metrics of prometheus_client's names, of this very process
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 10 * 2**20 < samples[("process_resident_memory_bytes", ())] <= peak_rss
    assert samples[("process_virtual_memory_bytes", ())] >= samples[("process_resident_memory_bytes", ())]
    assert 0 < samples[("process_cpu_seconds_total", ())] <= time.process_time() + 0.05
    started = samples[("process_start_time_seconds", ())]
    assert time.time() - 3600 < started <= time.time()
    open_fds = samples[("process_open_fds", ())]
    assert open_fds >= 3 and abs(open_fds - (len(os.listdir("/proc/self/fd")) - 1)) <= 2
    assert samples[("process_max_fds", ())] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def test_correlation_id_is_kept_or_made_and_echoed() -> None:
    service = make_service()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service.asgi), base_url="http://t") as c:
        r = await c.get("/items/1", headers={"X-Correlation-ID": "abc-123"})
        assert r.json()["correlation"] == "abc-123" and r.headers["x-correlation-id"] == "abc-123"
        r = await c.get("/items/2")
        made = r.json()["correlation"]
        assert made and r.headers["x-correlation-id"] == made
        assert (await c.get("/items/3")).json()["correlation"] != made


async def test_fastapi_app_keeps_its_openapi_and_routes() -> None:
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI(title="assets", version="1.0")

    @app.get("/assets/{asset_id}")
    async def get_asset(asset_id: int) -> dict[str, int]:
        return {"id": asset_id}

    service = Service(app, name="assets")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service.asgi), base_url="http://t") as c:
        spec = (await c.get("/openapi.json")).json()
        assert spec["info"]["title"] == "assets" and "/assets/{asset_id}" in spec["paths"]
        assert (await c.get("/assets/7")).json() == {"id": 7}
        assert (await c.get("/health")).json() == {"status": "ok"}
        text = (await c.get("/metrics")).text
    samples = metric_samples(text)
    assert samples[("http_requests_total",
                    (("method", "GET"), ("route", "/assets/{asset_id}"), ("status_class", "2xx")))] == 1
