"""Marathon gaps tools hit (issue 18), against a real server: Prometheus's /v2/apps/?embed=apps.tasks, servicePorts
(marathon-python's list_endpoints), bulk PUT /v2/apps, /v2/groups, /v2/queue, /v2/eventSubscriptions, /metrics,
and 422s that say which fields are unsupported and why.
"""

from __future__ import annotations

import collections
import collections.abc
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

# marathon-python 0.13.0 still uses collections.Iterable, removed in Python 3.10.
collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]

from marathon import MarathonClient  # noqa: E402
from marathon.exceptions import MarathonHttpError  # noqa: E402

from support import ServerProcess, need_binary  # noqa: E402
from test_marathon_api import wait_for as wait_for_api  # noqa: E402

WAIT = 60.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """test_marathon_api's poll, with this module's shorter default wait."""
    return wait_for_api(what, check, timeout)


def sleeper(app_id: str, instances: int = 2, ports: int = 2) -> dict[str, Any]:
    return {"id": app_id, "cmd": "sleep 3600", "instances": instances, "cpus": 0.01, "mem": 16,
            "portDefinitions": [{"port": 0, "name": f"p{i}"} for i in range(ports)],
            "taskKillGracePeriodSeconds": 1}


@pytest.fixture(scope="module")
def marathon(server: ServerProcess) -> MarathonClient:
    return MarathonClient(server.url, timeout=30)


def running_tasks(server: ServerProcess, app_id: str, count: int) -> list[dict[str, Any]]:
    def check() -> Any:
        tasks = requests.get(server.url + f"/v2/apps{app_id}/tasks", timeout=10).json()["tasks"]
        running = [t for t in tasks if t["state"] == "TASK_RUNNING" and len(t["ports"]) == 2]
        return running if len(running) == count else None
    return wait_for(f"{count} running tasks of {app_id}", check)


@pytest.fixture(scope="module")
def apps(server: ServerProcess) -> list[str]:
    ids = ["/sd/web", "/sd/api", "/lone"]
    for app_id in ids:
        r = requests.post(server.url + "/v2/apps", json=sleeper(app_id), timeout=10)
        assert r.status_code == 201, r.text
    for app_id in ids:
        running_tasks(server, app_id, 2)
    wait_for("the rollouts to finish",
             lambda: requests.get(server.url + "/v2/deployments", timeout=10).json() == [])
    return ids


def test_apps_with_trailing_slash_and_embedded_tasks_as_prometheus_asks(server: ServerProcess,
                                                                        apps: list[str]) -> None:
    # Prometheus's marathon_sd: GET /v2/apps/?embed=apps.tasks, then id, tasks[].host/ports, portDefinitions.
    r = requests.get(server.url + "/v2/apps/?embed=apps.tasks", timeout=10)
    assert r.status_code == 200, r.text
    listed = {a["id"]: a for a in r.json()["apps"]}
    assert set(apps) <= set(listed)
    for app_id in apps:
        app = listed[app_id]
        assert len(app["tasks"]) == 2 and app["tasksRunning"] == 2
        assert [d["name"] for d in app["portDefinitions"]] == ["p0", "p1"]
        for task in app["tasks"]:
            assert task["host"] == "127.0.0.1" and len(task["ports"]) == 2 and all(task["ports"])


def test_prometheus_marathon_sd_decodes_the_apps_and_finds_every_target(server: ServerProcess, apps: list[str],
                                                                        tmp_path: Path) -> None:
    # tests/go/marathon_sd.go decodes the answer into Prometheus's own marathon_sd shapes, compiled here.
    go = need_binary("go")
    binary = tmp_path / "marathon_sd"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0",
           "GOCACHE": os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build")}
    built = subprocess.run([go, "build", "-o", str(binary), str(Path(__file__).parent / "go" / "marathon_sd.go")],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(binary), server.url], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr  # was: non 2xx status '404' response during marathon service discovery
    targets = [line.split() for line in run.stdout.splitlines()]
    tasks = requests.get(server.url + "/v2/tasks", timeout=10).json()["tasks"]
    expected = sorted([t["appId"], f"{t['host']}:{p}"] for t in tasks if t["appId"] in apps for p in t["ports"])
    assert sorted(t for t in targets if t[0] in apps) == expected and len(expected) == 12


def test_tasks_carry_service_ports_and_list_endpoints_works(server: ServerProcess, marathon: MarathonClient,
                                                            apps: list[str]) -> None:
    for task in requests.get(server.url + "/v2/tasks", timeout=10).json()["tasks"]:
        assert len(task["servicePorts"]) == len(task["ports"]) == 2  # was: [] (list_endpoints: IndexError)
    endpoints = marathon.list_endpoints()
    ours = [e for e in endpoints if e.app_id in apps]
    assert len(ours) == 3 * 2 * 2  # 3 apps x 2 tasks x 2 ports
    for endpoint in ours:
        assert endpoint.host == "127.0.0.1" and endpoint.service_port == endpoint.task_port > 0


def test_bulk_put_creates_and_updates_apps(server: ServerProcess, apps: list[str]) -> None:
    body = [{"id": "/lone", "instances": 1}, sleeper("/bulk/new", instances=1, ports=1)]
    r = requests.put(server.url + "/v2/apps", json=body, timeout=10)
    assert r.status_code == 200, r.text  # was: 405
    assert set(r.json()) == {"deploymentId", "version"}
    assert requests.get(server.url + "/v2/apps/lone", timeout=10).json()["app"]["instances"] == 1
    assert requests.get(server.url + "/v2/apps/bulk/new", timeout=10).json()["app"]["instances"] == 1
    # One invalid app refuses the whole update, naming it by its index.
    bad = [{"id": "/lone", "instances": 3}, {"id": "/bulk/new", "instances": -1}]
    r = requests.put(server.url + "/v2/apps/", json=bad, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["details"] == [{"path": "/1/instances", "errors": ["must be an integer >= 0"]}]
    assert requests.get(server.url + "/v2/apps/lone", timeout=10).json()["app"]["instances"] == 1
    requests.delete(server.url + "/v2/apps/bulk/new?force=true", timeout=10)


def test_groups_show_the_app_tree(server: ServerProcess, marathon: MarathonClient, apps: list[str]) -> None:
    root = requests.get(server.url + "/v2/groups", timeout=10).json()
    assert root["id"] == "/" and "/lone" in [a["id"] for a in root["apps"]]
    sd = next(g for g in root["groups"] if g["id"] == "/sd")
    assert sorted(a["id"] for a in sd["apps"]) == ["/sd/api", "/sd/web"]
    assert [g.id for g in marathon.list_groups()] == [g["id"] for g in root["groups"]]
    assert sorted(a.id for a in marathon.get_group("/sd").apps) == ["/sd/api", "/sd/web"]
    missing = requests.get(server.url + "/v2/groups/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["message"] == "Group '/nope' does not exist"


def test_deleting_a_group_deletes_its_apps(server: ServerProcess) -> None:
    for app_id in ("/gone/a", "/gone/deeper/b"):
        assert requests.post(server.url + "/v2/apps", json=sleeper(app_id, 1, 1), timeout=10).status_code == 201
    r = requests.delete(server.url + "/v2/groups/gone?force=true", timeout=10)
    assert r.status_code == 200, r.text
    assert requests.get(server.url + "/v2/groups/gone", timeout=10).status_code == 404
    for app_id in ("/gone/a", "/gone/deeper/b"):
        assert requests.get(server.url + f"/v2/apps{app_id}", timeout=10).status_code == 404


def test_queue_lists_apps_with_instances_to_launch(server: ServerProcess, marathon: MarathonClient,
                                                   apps: list[str]) -> None:
    assert [q for q in marathon.list_queue() if q.app.id in apps] == []  # all running
    crashing = {"id": "/crashing", "cmd": "exit 3", "instances": 2, "cpus": 0.01, "mem": 16,
                "backoffSeconds": 30, "maxLaunchDelaySeconds": 60}
    assert requests.post(server.url + "/v2/apps", json=crashing, timeout=10).status_code == 201
    try:
        item = wait_for("the crashing app in the queue with a delay", lambda: next(
            (q for q in marathon.list_queue() if q.app.id == "/crashing" and q.delay.time_left_seconds > 0), None))
        assert item.count == 2 and item.app.instances == 2 and item.since
    finally:
        requests.delete(server.url + "/v2/apps/crashing?force=true", timeout=10)


def test_event_subscriptions_answer_as_marathon_without_http_callbacks(server: ServerProcess,
                                                                       marathon: MarathonClient) -> None:
    for method in ("GET", "POST", "DELETE"):
        r = requests.request(method, server.url + "/v2/eventSubscriptions?callbackUrl=http://127.0.0.1:1/x",
                             timeout=10)
        assert r.status_code == 400
        assert "--event_subscriber http_callback" in r.json()["message"] and "/v2/events" in r.json()["message"]
    with pytest.raises(MarathonHttpError):
        marathon.list_event_subscriptions()


def test_metrics_are_marathons_json(server: ServerProcess, marathon: MarathonClient, apps: list[str]) -> None:
    metrics = marathon.get_metrics()
    assert set(metrics) == {"version", "gauges", "counters", "histograms", "meters", "timers"}
    gauges = {k: v["value"] for k, v in metrics["gauges"].items()}
    assert gauges["marathon.apps.active.gauge"] == len(requests.get(server.url + "/v2/apps", timeout=10)
                                                       .json()["apps"])
    assert gauges["marathon.groups.active.gauge"] >= 1  # /sd
    assert gauges["marathon.instances.running.gauge"] >= 5
    assert gauges["marathon.uptime.gauge"] > 0


def test_unsupported_fields_are_named_with_the_reason(server: ServerProcess) -> None:
    app = {**sleeper("/docker-app", 1, 1), "uris": ["file:///root/.dockercfg"],
           "container": {"type": "DOCKER", "docker": {"image": "localhost/fake_docker_url", "network": "BRIDGE"}}}
    r = requests.post(server.url + "/v2/apps", json=app, timeout=10)
    assert r.status_code == 422
    body = r.json()
    assert body["message"] == ("Object is not valid: not supported by Shipyard: container, uris "
                               "(see details for why)")
    why = {d["path"]: " ".join(d["errors"]) for d in body["details"]}
    assert "no Docker or Mesos containerizer" in why["/container"]
    assert "no Mesos fetcher" in why["/uris"]
    assert requests.get(server.url + "/v2/apps/docker-app", timeout=10).status_code == 404
