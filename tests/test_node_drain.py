"""`shipyard node drain` between two real servers' nodes on one etcd, under load through a gateway: every instance
moves off the drained node (each replacement healthy before the old one stops) and no request fails.

Each server binds its own loopback address (127.0.0.2-3) as it would its own machine's; RabbitMQ is the bus.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support import EtcdProcess, LoopbackServer, need_peer
from test_cluster_servers import NAMESPACE, RABBIT_URL, loopback_aliases_work, rabbit_up, wait_for

APP = Path(__file__).parent / "apps" / "node_http.py"
SPEC = f"""\
services:
  web:
    cmd: {sys.executable} {APP}
    instances: 3
    ports: [http]
    health: {{http: /health, interval: 1s, timeout: 1s, grace: 30s}}
    resources: {{cpu: 10, memory: 32}}
    update: {{max_parallel: 1, min_healthy_time: 1s, healthy_deadline: 60s}}
    stop_grace: 3s
    routes:
      - paths: [/web]
        strip_path: true
"""


NODE_OF = {"127.0.0.2": "node-a", "127.0.0.3": "node-b"}  # the app answers its address


class NodeServer(LoopbackServer):
    """A server on its own loopback address, as if on its own machine; only the first one runs a gateway."""

    def __init__(self, data_dir: Path, address: str, name: str, etcd: EtcdProcess, gateway: bool) -> None:
        super().__init__(data_dir, address, name, "--store", f"etcd://127.0.0.1:{etcd.client_port}/{NAMESPACE}",
                         "--bus", RABBIT_URL, "--leader-ttl", "2", *([] if gateway else ["--no-gateway"]))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[NodeServer, NodeServer]]:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    need_peer("loopback aliases", loopback_aliases_work(), "cannot bind 127.0.0.2")
    etcd = EtcdProcess(tmp_path / "etcd").start()
    pair = (NodeServer(tmp_path / "a", "127.0.0.2", "node-a", etcd, gateway=True),
            NodeServer(tmp_path / "b", "127.0.0.3", "node-b", etcd, gateway=False))
    try:
        for server in pair:
            server.start(timeout=40)
        yield pair
    finally:
        for server in pair:
            server.stop()
        etcd.stop()


def shipyard(server: NodeServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, *args],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def eligibility(server: NodeServer, node: str, eligible: bool) -> None:
    r = requests.post(f"{server.url}/api/v1/nodes/{node}/eligibility", json={"eligible": eligible}, timeout=10)
    assert r.status_code == 200 and r.json()["node"]["eligibility"] == ("eligible" if eligible else "ineligible")


def healthy_on(server: NodeServer) -> dict[str, int]:
    """Healthy instances of web by node."""
    allocs = requests.get(server.url + "/api/v1/allocs", params={"job": "web"}, timeout=5).json()["allocations"]
    out: dict[str, int] = {}
    for a in allocs:
        if a["desired"] == "run" and (a.get("status") or {}).get("client") == "healthy":
            out[a["node"]] = out.get(a["node"], 0) + 1
    return out


class Load:
    """GETs through the gateway as fast as one client goes; every non-200 or error is a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.nodes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.get(self.url, timeout=5)
            except requests.RequestException as exc:
                self.failures.append(str(exc))
                continue
            if r.status_code != 200:
                self.failures.append(f"{r.status_code} {r.text[:100]}")
                continue
            self.ok += 1
            node = NODE_OF.get(r.text, r.text)
            self.nodes[node] = self.nodes.get(node, 0) + 1
            time.sleep(0.005)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def test_drain_moves_three_instances_under_load_without_a_failed_request(
        servers: tuple[NodeServer, NodeServer]) -> None:
    a, b = servers
    # Everything on node-a first: node-b takes nothing new while it is ineligible (the CLI's eligibility command is
    # tested in test_node_operations; the API is quicker here).
    eligibility(a, "node-b", False)
    deployed = requests.post(a.url + "/api/v1/jobs", data=SPEC, headers={"Content-Type": "application/yaml"},
                             timeout=30)
    assert deployed.status_code == 201, deployed.text
    wait_for("3 healthy instances on node-a", lambda: healthy_on(a) == {"node-a": 3}, 60)
    eligibility(b, "node-b", True)

    with Load(a.gateway_url + "/web/") as load:
        wait_for("traffic through the gateway", lambda: load.ok > 30, 30)
        drained = shipyard(b, "node", "drain", "node-a", "--deadline", "2m")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        wait_for("traffic served from node-b", lambda: load.nodes.get("node-b", 0) > 30, 30)
    assert load.failures == [], load.failures[:5]
    assert load.nodes.get("node-a", 0) > 0 and load.nodes.get("node-b", 0) > 0

    assert "drain complete" in drained.stdout and "3 instance(s) moved off" in drained.stdout, drained.stdout
    assert drained.stdout.count(": now on node-b") == 3, drained.stdout
    assert healthy_on(a) == {"node-b": 3}
    status = requests.get(a.url + "/api/v1/nodes/node-a", timeout=5).json()["node"]
    assert status["eligibility"] == "ineligible" and status["drain"]["complete"] and status["allocs"] == 0
    listing = shipyard(a, "node", "status")
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert rows["node-a"][1:2] == ["ready"] and "ineligible" in rows["node-a"], listing.stdout
    assert rows["node-b"][-3] == "3", listing.stdout  # ALLOCS column
