"""The Marathon /v2 API against a real `shipyard server`, driven by the real marathon-python client.

Apps run real processes (python3 -m http.server) started by the server's node agent.
"""

from __future__ import annotations

import collections
import collections.abc
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

# marathon-python 0.13.0 (the newest release) still uses collections.Iterable, removed in Python 3.10.
collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]

from marathon import MarathonClient  # noqa: E402
from marathon.exceptions import ConflictError, MarathonHttpError, NotFoundError  # noqa: E402
from marathon.models import MarathonApp, MarathonHealthCheck  # noqa: E402
from marathon.models.app import PortDefinition  # noqa: E402

from support import ServerProcess  # noqa: E402

# Generous: real processes start, pass health checks, and each rollout waits min_healthy_time.
WAIT = 90.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def marathon(server: ServerProcess) -> MarathonClient:
    return MarathonClient(server.url, timeout=30)


def http_app(instances: int = 2, **extra: Any) -> MarathonApp:
    return MarathonApp(
        cmd="exec python3 -m http.server $PORT0 --bind 127.0.0.1",
        instances=instances,
        cpus=0.1,
        mem=64,
        port_definitions=[PortDefinition(port=0, name="http")],
        health_checks=[MarathonHealthCheck(protocol="HTTP", path="/", port_index=0, interval_seconds=1,
                                           timeout_seconds=1, grace_period_seconds=10, max_consecutive_failures=3)],
        **extra,
    )


def healthy(marathon: MarathonClient, app_id: str, count: int) -> Callable[[], Any]:
    def check() -> Any:
        app = marathon.get_app(app_id)
        running = [t for t in app.tasks if t.state == "TASK_RUNNING"]
        # Every task listed running (none still shutting down), all healthy, and no rollout in progress.
        ok = app.tasks_healthy == count and len(running) == len(app.tasks) == count and not app.deployments
        return app if ok else None
    return check


def test_ping_info_and_leader(marathon: MarathonClient, server: ServerProcess) -> None:
    assert marathon.ping() == b"pong"
    info = marathon.get_info()
    assert info.name == "shipyard" and info.elected is True and info.leader == server.addr
    assert info.http_config.http_port == server.http_port
    assert marathon.get_leader() == {"leader": server.addr}


def test_create_app_runs_healthy_tasks_that_serve(marathon: MarathonClient) -> None:
    created = marathon.create_app("/web", http_app(2, env={"GREETING": "hi"}, labels={"team": "shop"}))
    assert created.id == "/web" and created.instances == 2 and created.cpus == 0.1 and created.mem == 64
    assert created.deployments and created.version
    app = wait_for("2 healthy tasks", healthy(marathon, "/web", 2))
    assert app.env == {"GREETING": "hi"} and app.labels == {"team": "shop"}
    assert app.port_definitions[0].name == "http" and app.health_checks[0].path == "/"
    for task in app.tasks:
        assert task.app_id == "/web" and task.host == "127.0.0.1" and len(task.ports) == 1
        assert task.started_at is not None and task.health_check_results[0].alive is True
        assert requests.get(f"http://{task.host}:{task.ports[0]}/", timeout=5).status_code == 200

    listed = {a.id: a for a in marathon.list_apps(embed_tasks=True)}
    assert len(listed["/web"].tasks) == 2 and listed["/web"].tasks_running == 2
    assert marathon.list_apps(label="team==shop")[0].id == "/web"
    assert marathon.list_apps(label="team==other") == []
    assert {t.id for t in marathon.list_tasks("/web")} == {t.id for t in app.tasks}
    assert {t.id for t in marathon.list_tasks() if t.app_id == "/web"} == {t.id for t in app.tasks}


def test_creating_an_existing_app_is_409(marathon: MarathonClient) -> None:
    marathon.create_app("/dup", MarathonApp(cmd="sleep 1000", instances=0))
    with pytest.raises(ConflictError) as info:
        marathon.create_app("/dup", MarathonApp(cmd="sleep 1000", instances=0))
    assert info.value.status_code == 409 and "already exists" in info.value.error_message


def test_invalid_apps_are_422_with_marathon_details(marathon: MarathonClient, server: ServerProcess) -> None:
    with pytest.raises(MarathonHttpError) as info:
        marathon.create_app("/bad", MarathonApp(cmd="sleep 1", instances=-1, cpus=0))
    assert info.value.status_code == 422 and info.value.error_message == "Object is not valid"
    assert {d["path"] for d in info.value.error_details} == {"/instances", "/cpus"}
    with pytest.raises(MarathonHttpError) as info:
        marathon.create_app("/bad", MarathonApp(cmd="sleep 1", health_checks=[
            MarathonHealthCheck(protocol="HTTP", port_index=4)]))
    assert info.value.error_details[0]["path"] == "/healthChecks(0)/portIndex"
    raw = requests.post(server.url + "/v2/apps", data=b"{not json", timeout=5)
    assert raw.status_code == 400 and raw.json()["message"] == "Invalid JSON"
    raw = requests.post(server.url + "/v2/apps", json={"id": "/my.app", "cmd": "x"}, timeout=5)
    assert raw.status_code == 422 and raw.json()["details"][0]["path"] == "/id"
    with pytest.raises(NotFoundError):
        marathon.get_app("/bad")
    missing = requests.get(server.url + "/v2/apps/nope", timeout=5)
    assert missing.status_code == 404 and missing.json() == {"message": "App '/nope' does not exist"}


def test_update_is_a_new_version_rolled_out_as_a_deployment(marathon: MarathonClient) -> None:
    marathon.create_app("/upd", http_app(2))
    before = wait_for("v1 healthy", healthy(marathon, "/upd", 2))
    result = marathon.update_app("/upd", MarathonApp(env={"COLOR": "blue"}))
    assert result["version"] != before.version and result["deploymentId"]
    assert result["deploymentId"] in {d.id for d in marathon.list_deployments()} | {
        d.id for d in marathon.get_app("/upd").deployments} or not marathon.get_app("/upd").deployments
    after = wait_for("v2 healthy", healthy(marathon, "/upd", 2))
    assert after.version == result["version"] and after.env == {"COLOR": "blue"}
    assert {t.version for t in after.tasks} == {result["version"]}
    assert not {t.id for t in after.tasks} & {t.id for t in before.tasks}
    assert marathon.list_versions("/upd")[0] == result["version"] and len(marathon.list_versions("/upd")) == 2
    assert marathon.get_version("/upd", before.version).env == {}


def test_scale_restart_and_kill_tasks_with_scale(marathon: MarathonClient) -> None:
    marathon.create_app("/scale", http_app(1))
    wait_for("1 healthy", healthy(marathon, "/scale", 1))
    marathon.scale_app("/scale", instances=3)
    app = wait_for("3 healthy", healthy(marathon, "/scale", 3))
    assert app.instances == 3

    old_ids = {t.id for t in app.tasks}
    restarted = marathon.restart_app("/scale")
    assert restarted["deploymentId"]
    app = wait_for("restarted tasks healthy",
                   lambda: (a := healthy(marathon, "/scale", 3)()) and not {t.id for t in a.tasks} & old_ids and a)

    # Without scale, exactly the named task is replaced by a new one; the others keep running.
    by_index = sorted(app.tasks, key=lambda t: int(t.id.split(".")[1]))
    marathon.kill_task("/scale", by_index[1].id)
    app = wait_for("a replacement for the killed task",
                   lambda: (a := healthy(marathon, "/scale", 3)()) and by_index[1].id not in {t.id for t in a.tasks}
                   and a)
    assert app.instances == 3 and {by_index[0].id, by_index[2].id} < {t.id for t in app.tasks}

    # Exactly the named task goes, whatever its instance index: here the lowest, then the middle one.
    by_index = sorted(app.tasks, key=lambda t: int(t.id.split(".")[1]))
    killed = marathon.kill_task("/scale", by_index[0].id, scale=True)
    assert killed.id == by_index[0].id
    app = wait_for("2 healthy after kill", healthy(marathon, "/scale", 2))
    assert app.instances == 2 and {t.id for t in app.tasks} == {by_index[1].id, by_index[2].id}

    assert marathon.kill_given_tasks([by_index[1].id], scale=True) is True
    app = wait_for("1 healthy after bulk kill", healthy(marathon, "/scale", 1))
    assert app.instances == 1 and [t.id for t in app.tasks] == [by_index[2].id]

    answer = marathon.kill_tasks("/scale", scale=True)
    assert "deploymentId" in answer
    wait_for("no tasks", lambda: marathon.get_app("/scale").instances == 0 and not marathon.list_tasks("/scale"))


def test_rollback_by_deleting_the_deployment(marathon: MarathonClient) -> None:
    marathon.create_app("/roll", http_app(1, env={"V": "1"}))
    wait_for("v1 healthy", healthy(marathon, "/roll", 1))
    # A new version whose instances never become healthy keeps its deployment open.
    broken = MarathonApp(env={"V": "2"}, cmd="sleep 1000")
    update = marathon.update_app("/roll", broken)
    deployments = {d.id: d for d in marathon.list_deployments()}
    assert update["deploymentId"] in deployments
    d = deployments[update["deploymentId"]]
    assert d.affected_apps == ["/roll"] and d.total_steps >= 1 and d.current_actions
    answer = marathon.delete_deployment(update["deploymentId"])
    assert answer["deploymentId"] and answer["version"]
    app = wait_for("v1 back and healthy", healthy(marathon, "/roll", 1))
    assert app.env == {"V": "1"} and app.cmd.startswith("exec python3")
    with pytest.raises(NotFoundError):
        marathon.delete_deployment("no-such-deployment")


def test_delete_app_stops_its_tasks(marathon: MarathonClient) -> None:
    marathon.create_app("/gone", http_app(1))
    task = wait_for("healthy", healthy(marathon, "/gone", 1)).tasks[0]
    assert "deploymentId" in marathon.delete_app("/gone")
    with pytest.raises(NotFoundError):
        marathon.get_app("/gone")
    assert "/gone" not in {a.id for a in marathon.list_apps()}

    def stopped() -> bool:
        try:
            requests.get(f"http://127.0.0.1:{task.ports[0]}/", timeout=1)
        except requests.ConnectionError:
            return True
        return False
    wait_for("the process to stop serving", stopped)
    wait_for("its task to leave /v2/tasks", lambda: task.id not in {t.id for t in marathon.list_tasks()})


def test_group_ids_map_to_jobs_and_back(marathon: MarathonClient, server: ServerProcess) -> None:
    marathon.create_app("/shop/cart", MarathonApp(cmd="sleep 1000", instances=0))
    assert marathon.get_app("/shop/cart").id == "/shop/cart"
    native = requests.get(server.url + "/api/v1/jobs/shop--cart", timeout=5)
    assert native.status_code == 200 and native.json()["job"]["id"] == "shop--cart"
    # A job deployed through the native API shows up as a Marathon app under its group path.
    spec = {"name": "team--worker", "kind": "service", "cmd": "sleep 1000", "instances": 0}
    assert requests.post(server.url + "/api/v1/jobs", json=spec, timeout=5).status_code in (200, 201)
    assert marathon.get_app("/team/worker").cmd == "sleep 1000"
    assert {"/shop/cart", "/team/worker"} <= {a.id for a in marathon.list_apps()}
    marathon.delete_app("/shop/cart")
    marathon.delete_app("/team/worker")


def test_event_stream_reports_marathon_event_types(marathon: MarathonClient) -> None:
    events: queue.Queue[Any] = queue.Queue()
    wanted = ["api_post_event", "deployment_info", "deployment_success", "status_update_event",
              "health_status_changed_event", "app_terminated_event"]

    def listen() -> None:
        try:
            for event in marathon.event_stream(event_types=[*wanted, "event_stream_attached"]):
                events.put(event)
        except Exception as exc:  # surfaces in the main thread as a missing event with the reason
            events.put(exc)

    threading.Thread(target=listen, daemon=True).start()
    first = events.get(timeout=30)
    assert not isinstance(first, Exception) and first.event_type == "event_stream_attached"

    seen: dict[str, Any] = {}
    marathon.create_app("/evt", http_app(1))

    def about_evt(event: Any) -> bool:
        # Other tests' apps share this server; only events about /evt count here.
        if event.event_type == "api_post_event":
            return event.app_definition["id"] == "/evt"
        if event.event_type == "deployment_info":
            return event.plan.id.startswith("evt.")
        if event.event_type == "deployment_success":
            return event.id.startswith("evt.")
        return getattr(event, "app_id", None) == "/evt"

    def collect(until: set[str]) -> None:
        deadline = time.monotonic() + WAIT
        while not until <= set(seen) and time.monotonic() < deadline:
            try:
                event = events.get(timeout=1)
            except queue.Empty:
                continue
            assert not isinstance(event, Exception), event
            if about_evt(event):
                seen.setdefault(event.event_type, event)
        assert until <= set(seen), f"missing {until - set(seen)}"

    collect({"api_post_event", "deployment_info", "deployment_success", "status_update_event",
             "health_status_changed_event"})
    assert seen["api_post_event"].app_definition["id"] == "/evt"
    assert seen["deployment_info"].plan.steps and seen["deployment_success"].id
    assert seen["status_update_event"].app_id == "/evt" and seen["status_update_event"].task_status.startswith("TASK_")
    assert seen["health_status_changed_event"].alive is True
    marathon.delete_app("/evt")
    collect({"app_terminated_event"})
    assert seen["app_terminated_event"].app_id == "/evt"
