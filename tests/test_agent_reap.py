"""Agents gone for good, as in Consul: a real server (SQLite, --acl, --reconnect-timeout 8s, --node-lost-after 2) and
real `shipyard agent`s on their own loopback addresses, each killed with -9 (a machine that died: its instances go
on under their shims).

- Reaped: a failed agent is removed after --reconnect-timeout from the members, the catalog nodes, placement and the
  store's allocations (its instance had been given up: nowhere else to go); back on the same data dir, it registers
  again, gets the job's instance placed anew and stops the one it still ran (its allocation is gone).
- force-leave: `PUT /v1/agent/force-leave/<node>` (operator:write) makes a failed agent left (3) at once and takes its
  node out of the catalog; `shipyard node force-leave --prune` removes it from the members; back, it registers again;
  a live agent is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent_support import alive
from shipyard.api.local_agent import node_agent_rules
from support import ServerProcess, acl_token, free_port, wait_for

MANAGEMENT = str(uuid.uuid4())
RECONNECT_TIMEOUT = 8  # seconds: the server's --reconnect-timeout here (72h by default)
TTL = 2  # the agents' --heartbeat-ttl


def call(server: ServerProcess, method: str, path: str, token: str = MANAGEMENT, **kw: Any) -> requests.Response:
    return requests.request(method, server.url + path, headers={"X-Consul-Token": token} if token else {},
                            timeout=kw.pop("timeout", 10), **kw)


def make_token(server: ServerProcess, name: str, rules: str) -> str:
    return acl_token(server.url, MANAGEMENT, name, rules)


class Agent:
    """A `shipyard agent` on its own loopback address; kill9 leaves its instances running, as a dead machine's."""

    def __init__(self, server: ServerProcess, base: Path, name: str, address: str) -> None:
        self.server, self.name, self.address = server, name, address
        self.data_dir = base / name
        self.log_path = base / f"{name}.log"
        self.token = make_token(server, f"agent-{name}", node_agent_rules(name))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["SHIPYARD_HTTP_TOKEN"] = self.token
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", self.server.addr, "--node",
                 self.name, "--advertise", self.address, "--port", str(free_port()), "--dns-port", "0",
                 "--http-port", "0", "--heartbeat-ttl", str(TTL), "--drain-delay", "0.2",
                 "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_for(f"{self.name} alive", lambda: self.status() == 1)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # the agent only: its instances' shims go on
        self.proc.wait(10)

    def status(self) -> int | None:
        members = call(self.server, "GET", "/v1/agent/members").json()
        return next((m["Status"] for m in members if m["Name"] == self.name), None)

    def in_catalog(self) -> bool:
        return self.name in {n["Node"] for n in call(self.server, "GET", "/v1/catalog/nodes").json()}

    def shim_pids(self) -> dict[str, int]:
        """Alloc id -> shim pid of each instance this agent's data dir records."""
        out = {}
        for state in (self.data_dir / "agent" / "instances").glob("*/state.json"):
            data = json.loads(state.read_text())
            out[data["alloc_id"]] = int(data["shim_pid"])
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        for pid in self.shim_pids().values():  # instances outlive their agent by design
            if alive(pid):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("reap")
    server = ServerProcess(base / "server", "--acl", "--acl-initial-management", MANAGEMENT, "--no-gateway",
                           "--vault-port", "0", "--node", "srv", "--node-lost-after", "2",
                           "--reconnect-timeout", f"{RECONNECT_TIMEOUT}s")
    server.start()
    try:
        # Nothing of the tests' runs on the server's own node: instances go to the agents or nowhere.
        assert call(server, "POST", "/api/v1/nodes/srv/eligibility", json={"eligible": False}).status_code == 200
        yield server
    finally:
        server.stop()


def instance_tokens(server: ServerProcess, node: str) -> list[str]:
    """Descriptions of the ACL tokens `node`'s agent had made for its instances (one per service)."""
    listed = call(server, "GET", "/v1/acl/tokens").json()
    return [t["Description"] for t in listed if t.get("Description", "").endswith(f"@{node}")]


def allocs_of(server: ServerProcess, node: str) -> list[dict[str, Any]]:
    listed = call(server, "GET", f"/api/v1/store/kv/allocs/{node}/?prefix=1")
    assert listed.status_code == 200, listed.text
    return list(listed.json()["kvs"])


def running_on(server: ServerProcess, node: str) -> list[str]:
    """Ids of the allocations to run on `node` (the node's view in placement; [] once it is gone)."""
    view = call(server, "GET", f"/api/v1/nodes/{node}")
    if view.status_code != 200:
        return []
    return [a["id"] for a in view.json()["node"]["allocations"] if a["desired"] == "run"]


def test_a_failed_agent_is_reaped_after_the_reconnect_timeout_and_registers_again(server: ServerProcess,
                                                                                   tmp_path: Path) -> None:
    agent = Agent(server, tmp_path, "reap-a", "127.0.0.2").start()
    try:
        spec = {"name": "sleeper", "args": [sys.executable, "-c", "import time; time.sleep(600)"], "instances": 1,
                "resources": {"cpu": 10, "memory": 16}, "stop_grace": "1s"}
        assert call(server, "POST", "/api/v1/jobs", json=spec).status_code in (200, 201)
        first = wait_for("the instance on the agent", lambda: running_on(server, agent.name)
                         and agent.shim_pids().keys() >= set(running_on(server, agent.name)) and
                         running_on(server, agent.name), timeout=45)[0]
        assert instance_tokens(server, agent.name) == [f"Shipyard's own service:sleeper@{agent.name}"]
        agent.kill9()
        wait_for("the agent failed", lambda: agent.status() == 4)
        assert agent.in_catalog() and alive(agent.shim_pids()[first])  # failed: still listed; its instance runs
        # After --node-lost-after its node leaves placement (no other node for the instance), after
        # --reconnect-timeout it is gone from the members and the catalog, and nothing of it is left in the store.
        wait_for("the agent reaped", lambda: agent.status() is None and not agent.in_catalog(),
                 timeout=RECONNECT_TIMEOUT + 20)
        assert call(server, "GET", f"/api/v1/nodes/{agent.name}").status_code == 404
        assert allocs_of(server, agent.name) == []
        wait_for("its instances' ACL token deleted", lambda: instance_tokens(server, agent.name) == [])
        assert call(server, "GET", f"/v1/health/node/{agent.name}").json() == []
        job = call(server, "GET", "/api/v1/jobs/sleeper")
        assert job.status_code == 200 and job.json().get("unplaceable"), job.text  # it says why nothing runs
        # Back on the same data dir: it registers cleanly, the instance is placed on it anew, and the one it had
        # kept running (whose allocation was replaced and is gone) is stopped.
        agent.start()
        assert agent.in_catalog()
        second = wait_for("the instance placed again", lambda: running_on(server, agent.name), timeout=30)[0]
        assert second != first
        wait_for("the superseded instance stopped", lambda: not alive(agent.shim_pids().get(first, 0) or 0))
        wait_for("the new instance running", lambda: alive(agent.shim_pids().get(second, 0) or 0))
    finally:
        try:
            call(server, "DELETE", "/api/v1/jobs/sleeper")
            wait_for("the job's instances stopped", lambda: not running_on(server, agent.name))
        finally:
            agent.stop()  # whatever failed above: no agent or instance is left behind


def test_force_leave_and_prune_then_the_agent_returns(server: ServerProcess, tmp_path: Path) -> None:
    agent = Agent(server, tmp_path, "gone-b", "127.0.0.3").start()
    try:
        operator = make_token(server, "operator", 'operator = "write"\nnode_prefix "" { policy = "read" }')
        # A live agent is left alone (as serf: it would rejoin at once); an unknown name is Consul's 500.
        assert call(server, "PUT", f"/v1/agent/force-leave/{agent.name}", token=operator).status_code == 200
        assert agent.status() == 1 and agent.in_catalog()
        missing = call(server, "PUT", "/v1/agent/force-leave/nobody", token=operator)
        assert missing.status_code == 500 and "No node found" in missing.text
        agent.kill9()
        wait_for("the agent failed", lambda: agent.status() == 4)
        # operator:write, as in Consul: the agent's own token may not.
        assert call(server, "PUT", f"/v1/agent/force-leave/{agent.name}", token=agent.token).status_code == 403
        assert call(server, "PUT", f"/v1/agent/force-leave/{agent.name}", token=operator).status_code == 200
        assert agent.status() == 3 and not agent.in_catalog()  # left, at once: no timeout waited for
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env.update(SHIPYARD_HTTP_ADDR=server.addr, SHIPYARD_HTTP_TOKEN=operator)
        pruned = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "node", "force-leave", "--prune",
                                 agent.name], capture_output=True, text=True, timeout=30, env=env)
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        assert "(was left): removed from the members" in pruned.stdout, pruned.stdout
        assert agent.status() is None and not agent.in_catalog()
        # It comes back: registered again, alive, in the catalog with a passing serfHealth.
        agent.start()
        assert agent.in_catalog()
        wait_for("its serfHealth passing", lambda: {
            c["CheckID"]: c["Status"] for c in call(server, "GET", f"/v1/health/node/{agent.name}").json()
        }.get("serfHealth") == "passing")
    finally:
        agent.stop()
