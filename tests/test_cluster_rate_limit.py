"""A rate limit holds across the gateways of a cluster: two real servers on one real etcd, each with its own gateway
workers, one Kong rate-limiting plugin (100/minute) and requests spread over both gateways.

Each gateway counts locally and syncs through etcd every --gateway-sync seconds, so the cluster may admit a little
more than the limit: at most what the other gateway admitted since its last sync (docs/cluster.md). Without the
sync each gateway would admit 100 on its own, 200 in all.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from support import EtcdProcess, ServerProcess, free_port, need_peer, rabbit_up

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
LIMIT = 100
SYNC = 0.1  # --gateway-sync of the servers under test (the default)
RATE = 100.0  # requests per second sent, in all, over both gateways
SENT = 300
LATENCY_ALLOWANCE = 0.5  # seconds a synced count may take to reach the other gateway on a loaded 2-core machine

pytestmark = pytest.mark.xdist_group("rabbitmq")  # shares RabbitMQ with the other cluster modules, one at a time


def wait_for_status(url: str, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url, timeout=5).status_code
            if last == status:
                return
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status} (last: {last!r})")


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    base = tmp_path_factory.mktemp("cluster-rl")
    etcd = EtcdProcess(base / "etcd").start()
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "http.server", str(upstream_port), "--bind", "127.0.0.1",
                                 "--directory", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[ServerProcess] = []
    try:
        for name in ("gw-a", "gw-b"):
            server = ServerProcess(base / name, "--store", f"etcd://127.0.0.1:{etcd.client_port}/rl-test",
                                   "--bus", RABBIT_URL, "--node", name, "--vault-port", "0",
                                   "--gateway-sync", str(SYNC))
            server.extra += ["--gateway-port", str(server.gateway_port), "--gateway-workers", "2"]
            servers.append(server.start(timeout=40))
        configure(servers[0].url + "/api/gateway", upstream_port)
        for server in servers:  # "ready" was written last: a worker that routes it has the limit too
            for _ in range(8):  # new connections, so both workers of each gateway are asked
                wait_for_status(server.gateway_url + "/ready/", 200)
        yield servers
    finally:
        for server in servers:
            server.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
        etcd.stop()


def configure(admin: str, upstream_port: int) -> None:
    def post(path: str, body: dict[str, Any]) -> None:
        r = requests.post(admin + path, json=body, timeout=10)
        assert r.status_code == 201, r.text

    post("/upstreams", {"name": "files"})
    post("/upstreams/files/targets", {"target": f"127.0.0.1:{upstream_port}"})
    post("/services", {"name": "files", "host": "files"})
    post("/services/files/routes", {"name": "limited", "paths": ["/limited"]})
    post("/routes/limited/plugins", {"name": "rate-limiting", "config": {"minute": LIMIT}})
    post("/services/files/routes", {"name": "ready", "paths": ["/ready"]})


def send_spread(urls: list[str], count: int, rate: float) -> tuple[dict[int, int], float]:
    """`count` GETs at `rate` per second in all, each gateway from its own thread (its own keep-alive connection);
    returns the statuses counted and the seconds it took."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def client(url: str, offset: int) -> None:
        with requests.Session() as session:
            for i in range(offset, count, len(urls)):
                pause = started + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                status = session.get(url, timeout=10).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(url, n)) for n, url in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.monotonic() - started


def test_100_per_minute_holds_across_two_gateways(two_gateways: list[ServerProcess]) -> None:
    # One minute window for the whole run (windows start on the minute): skip to the next one when this one is
    # too far gone for SENT requests at RATE.
    into = time.time() % 60
    if into > 60 - SENT / RATE - 10:
        time.sleep(60 - into + 0.2)
    window = int(time.time() // 60)
    statuses, took = send_spread([s.gateway_url + "/limited/" for s in two_gateways], SENT, RATE)
    assert int(time.time() // 60) == window, "the run crossed a minute boundary"
    assert set(statuses) <= {200, 429}, statuses
    accepted = statuses.get(200, 0)
    per_gateway_rate = SENT / took / len(two_gateways)
    # What one gateway admits before the other hears of it: its requests of one sync period and the latency.
    tolerance = (len(two_gateways) - 1) * per_gateway_rate * (SYNC + LATENCY_ALLOWANCE)
    print(f"accepted {accepted} of {SENT} at {SENT / took:.0f} req/s over 2 gateways "
          f"(limit {LIMIT}, tolerance {tolerance:.0f})")
    assert LIMIT <= accepted <= LIMIT + tolerance, (accepted, tolerance, statuses)
    # Each gateway's remaining count went to 0 with the other's requests included: both refuse now.
    for server in two_gateways:
        r = requests.get(server.gateway_url + "/limited/", timeout=10)
        assert r.status_code == 429 and r.headers["RateLimit-Remaining"] == "0"
