"""Node operations and placement rules on one real server: why an instance fits nowhere (API, `shipyard ps`),
`shipyard node status`, eligibility, a drain with no other node to go to, and their one-line errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server whose node is in rack r1, class web (Consul's -node-meta spelling works too)."""
    proc = ServerProcess(tmp_path_factory.mktemp("nodes") / "data", "--node-meta", "rack:r1", "--node-class", "web",
                         "--no-gateway").start()
    yield proc
    proc.stop()


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.addr, *args],
                          capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def job(server: ServerProcess, name: str) -> dict[str, Any]:
    return dict(requests.get(f"{server.url}/api/v1/jobs/{name}", timeout=10).json())


def deploy(server: ServerProcess, name: str, **extra: Any) -> None:
    spec = {"name": name, "cmd": "sleep 60", "instances": 2, "resources": {"cpu": 10, "memory": 16}, **extra}
    r = requests.post(f"{server.url}/api/v1/jobs", json=spec, timeout=10)
    assert r.status_code == 201, r.text


def running(server: ServerProcess, name: str) -> int:
    return sum(1 for a in job(server, name)["allocations"]
               if a["desired"] == "run" and (a.get("status") or {}).get("client") in ("running", "healthy"))


def test_constraints_place_by_the_nodes_attributes_and_say_why_not(server: ServerProcess) -> None:
    node = requests.get(f"{server.url}/api/v1/nodes", timeout=10).json()["nodes"][0]
    assert node["attributes"]["kernel.name"] == "linux" and node["attributes"]["cpu.arch"]
    assert node["meta"] == {"rack": "r1"} and node["class"] == "web"
    catalog = requests.get(f"{server.url}/v1/catalog/node/{node['name']}", timeout=10).json()
    assert catalog["Node"]["Meta"]["rack"] == "r1"  # the same meta, as Consul's NodeMeta
    deploy(server, "on-linux", constraints=[{"attribute": "${attr.kernel.name}", "value": "linux"},
                                            {"attribute": "${meta.rack}", "value": "r1"},
                                            {"attribute": "${node.class}", "value": "web"}])
    deploy(server, "on-rack9", constraints=[{"attribute": "${meta.rack}", "value": "r9"}])
    wait_for("on-linux running", lambda: running(server, "on-linux") == 2)
    reason = "no node fits (1 node): constraint ${meta.rack} = r9 filtered 1 node (class web: 1)"
    wait_for("on-rack9 unplaceable", lambda: (job(server, "on-rack9")["unplaceable"] or {}).get("reason") == reason)
    listed = {j["id"]: j for j in requests.get(f"{server.url}/api/v1/jobs", timeout=10).json()["jobs"]}
    assert listed["on-rack9"]["unplaceable"]["indexes"] == [0, 1] and listed["on-linux"]["unplaceable"] is None
    ps = cli(server, "ps")
    assert ps.returncode == 0, ps.stderr
    rows = [line.split() for line in ps.stdout.splitlines() if line.strip()]
    assert [row[2] for row in rows if row[0] in ("on-rack9.0", "on-rack9.1")] == ["unplaceable"] * 2, ps.stdout
    assert f"on-rack9.0,1 unplaceable: {reason}" in ps.stdout, ps.stdout
    # A rule that cannot be right is refused with its path, before anything is stored.
    bad = requests.post(f"{server.url}/api/v1/jobs", timeout=10, json={
        "name": "bad-rule", "cmd": "sleep 1", "constraints": [{"attribute": "${meta.rack}", "operator": "regexp",
                                                               "value": "(r"}]})
    assert bad.status_code == 422 and "constraints[0].value: invalid regular expression" in bad.text, bad.text
    for name in ("on-linux", "on-rack9"):
        assert requests.delete(f"{server.url}/api/v1/jobs/{name}", timeout=10).status_code == 200


def test_marathon_constraints_and_the_queue_say_why(server: ServerProcess) -> None:
    app = {"id": "/pinned", "cmd": "sleep 60", "instances": 1, "cpus": 0.01, "mem": 16,
           "constraints": [["hostname", "UNIQUE"], ["rack", "CLUSTER", "r9"]]}
    created = requests.post(f"{server.url}/v2/apps", json=app, timeout=10)
    assert created.status_code == 201, created.text
    assert created.json()["constraints"] == [["hostname", "UNIQUE"], ["rack", "CLUSTER", "r9"]]

    def queued() -> dict[str, Any] | None:
        items = requests.get(f"{server.url}/v2/queue", timeout=10).json()["queue"]
        return next((q for q in items if q["app"]["id"] == "/pinned" and "processedOffersSummary" in q), None)

    item = wait_for("the app queued with its offer summary", queued)
    assert item["count"] == 1
    assert item["processedOffersSummary"]["rejectSummaryLastOffers"][1] == {
        "reason": "UnfulfilledConstraint", "declined": 1, "processed": 1}
    assert item["unplaceable"]["reason"].startswith("no node fits (1 node): constraint ${meta.rack} = r9 filtered")
    refused = requests.put(f"{server.url}/v2/apps/pinned", json={"constraints": [["rack", "NEAR", "r1"]]}, timeout=10)
    assert refused.status_code == 422 and "unknown operator 'NEAR'" in refused.text, refused.text
    assert requests.delete(f"{server.url}/v2/apps/pinned", timeout=10).status_code == 200


def test_eligibility_and_a_drain_with_nowhere_to_go(server: ServerProcess) -> None:
    name = requests.get(f"{server.url}/api/v1/nodes", timeout=10).json()["nodes"][0]["name"]
    status = cli(server, "node", "status")
    assert status.returncode == 0 and name in status.stdout and "eligible" in status.stdout, status.stderr
    deploy(server, "drained")
    wait_for("drained running", lambda: running(server, "drained") == 2)

    off = cli(server, "node", "eligibility", name, "off")
    assert off.returncode == 0 and "keeps its 2 instance(s), gets no new ones" in off.stdout, off.stdout
    requests.post(f"{server.url}/api/v1/jobs/drained/scale", json={"instances": 3, "force": True},
                  timeout=10).raise_for_status()
    wait_for("the third instance unplaceable", lambda: (job(server, "drained")["unplaceable"] or {}).get("reason")
             == "no eligible nodes; 1 node ineligible or draining (class web: 1)")
    assert running(server, "drained") == 2  # the node kept what it ran

    # No other node: the rolling rules could never move them, so the deadline (now) stops them.
    drained = cli(server, "node", "drain", name, "--deadline", "0")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "drain complete" in drained.stdout and "2 instance(s) moved off" in drained.stdout, drained.stdout
    assert job(server, "drained")["allocations"] == []
    refused = cli(server, "node", "eligibility", name, "on")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"is draining; stop the drain to make it eligible (shipyard node drain {name} --disable)" in refused.stderr
    detail = cli(server, "node", "status", name)
    assert "Drain        complete" in detail.stdout and "Eligibility  ineligible" in detail.stdout, detail.stdout

    undrained = cli(server, "node", "drain", name, "--disable")
    assert undrained.returncode == 0 and "drain stopped (eligible)" in undrained.stdout
    wait_for("all 3 running again", lambda: running(server, "drained") == 3)
    missing = cli(server, "node", "drain", "no-such-node")
    assert missing.returncode == 1 and "no node 'no-such-node'" in missing.stderr and "Traceback" not in missing.stderr
    assert requests.delete(f"{server.url}/api/v1/jobs/drained", timeout=10).status_code == 200
