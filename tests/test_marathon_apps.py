"""Marathon app definitions <-> job specs (api/marathon/apps.py): ids, every mapped field both ways, refusals."""

from __future__ import annotations

import pytest

from shipyard.api.marathon.apps import AppInvalid, app_from_spec, app_id_of, app_id_problems, job_id_of, spec_from_app
from shipyard.spec import HealthCheck, Port, parse_project

PROJECT = """
services:
  web:
    cmd: python3 -m http.server $PORT
    instances: 3
    env: {GREETING: hello, LEVEL: "2"}
    ports: {http: {}, admin: {static: 9123}}
    health: {http: /healthz, port: admin, interval: 2s, timeout: 1s, grace: 3s, failures: 4}
    resources: {cpu: 250, memory: 64}
    update: {max_parallel: 2}
    restart: {initial: 500ms, factor: 1.5, max: 30s}
    stop_grace: 7s
    meta: {team: shop}
  api:
    args: [python3, -m, http.server]
    ports: [main]
    health: {tcp: main}
    depends_on: [web]
  shop--cart:
    cmd: ./cart
    ports: [http]
    health: {command: "test -f /tmp/ok", interval: 500ms}
  lonely:
    cmd: sleep 1000
"""


def specs():
    return parse_project(PROJECT).services


# ---- ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("app_id, job", [("/web", "web"), ("web", "web"), ("/shop/web", "shop--web"),
                                         ("/a/b/c/", "a--b--c"), ("/x-1/y-2", "x-1--y-2")])
def test_app_ids_map_to_job_ids_and_back(app_id: str, job: str) -> None:
    assert app_id_problems(app_id) == []
    assert job_id_of(app_id) == job
    assert app_id_of(job) == "/" + app_id.strip("/")


@pytest.mark.parametrize("job", ["web", "a--b", "a---b", "a-b--c-d", "x", "a--b--c"])
def test_every_job_name_has_an_app_id_that_leads_back_to_it(job: str) -> None:
    assert job_id_of(app_id_of(job)) == job


@pytest.mark.parametrize("app_id, why", [("/my.app", "'.'"), ("/a--b", "'--'"), ("/Web", "regular expression"),
                                         ("/-web", "regular expression"), ("/" + "a" * 64, "too long"),
                                         ("/a/tasks", "reserved"), ("/", "non-empty"), ("", "non-empty"),
                                         (None, "non-empty")])
def test_app_ids_that_cannot_name_a_job_are_refused_with_the_reason(app_id, why: str) -> None:
    problems = app_id_problems(app_id)
    assert problems and why in problems[0]


# ---- app -> spec --------------------------------------------------------------------------------------------


def test_a_full_marathon_app_maps_onto_the_spec() -> None:
    spec = spec_from_app({
        "id": "/shop/web",
        "cmd": "python3 -m http.server $PORT0",
        "instances": 4,
        "cpus": 0.25,
        "mem": 96.5,
        "env": {"A": "1", "B": 2},
        "labels": {"team": "shop"},
        "portDefinitions": [{"port": 0, "name": "http"}, {"port": 8099, "protocol": "tcp"}],
        "healthChecks": [{"protocol": "HTTP", "path": "/ok", "portIndex": 1, "intervalSeconds": 3,
                          "timeoutSeconds": 2, "gracePeriodSeconds": 10, "maxConsecutiveFailures": 5}],
        "upgradeStrategy": {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0.5},
        "backoffSeconds": 2, "backoffFactor": 1.15, "maxLaunchDelaySeconds": 300,
        "taskKillGracePeriodSeconds": 9,
        "dependencies": ["/db"],
        "disk": 0, "requirePorts": False, "constraints": [], "killSelection": "YOUNGEST_FIRST",
    })
    assert spec.name == "shop--web" and spec.kind == "service"
    assert spec.cmd == "python3 -m http.server $PORT0" and spec.args == ()
    assert spec.instances == 4
    assert (spec.resources.cpu, spec.resources.memory) == (250, 97)
    assert dict(spec.env) == {"A": "1", "B": "2"}
    assert dict(spec.meta) == {"team": "shop"}
    assert spec.ports == (Port("http"), Port("port1", 8099))
    assert spec.health == HealthCheck("http", "/ok", "port1", interval=3, timeout=2, grace=10, failures=5)
    assert spec.update.max_parallel == 2
    assert (spec.restart.initial, spec.restart.factor, spec.restart.max) == (2, 1.15, 300)
    assert spec.stop_grace == 9
    assert dict(spec.depends_on) == {"db": "started"}


def test_health_check_protocols_map_to_spec_kinds() -> None:
    tcp = spec_from_app({"id": "/t", "cmd": "x", "healthChecks": [{"protocol": "TCP"}]})
    assert tcp.health is not None and (tcp.health.kind, tcp.health.target) == ("tcp", "port0")
    mesos = spec_from_app({"id": "/m", "cmd": "x", "healthChecks": [{"protocol": "MESOS_HTTP", "path": "/h"}]})
    assert mesos.health is not None and (mesos.health.kind, mesos.health.port) == ("http", "port0")
    command = spec_from_app({"id": "/c", "args": ["x"], "portDefinitions": [],
                             "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}}]})
    assert command.health is not None and (command.health.kind, command.health.target) == ("command", "true")
    fixed = spec_from_app({"id": "/f", "cmd": "x", "portDefinitions": [{"port": 8111, "name": "web"}],
                           "healthChecks": [{"protocol": "HTTP", "port": 8111}]})
    assert fixed.health is not None and fixed.health.port == "web"


def test_an_app_without_port_definitions_gets_one_dynamic_port_as_in_marathon() -> None:
    assert spec_from_app({"id": "/a", "cmd": "x"}).ports == (Port("port0"),)
    assert spec_from_app({"id": "/a", "cmd": "x", "portDefinitions": []}).ports == ()
    assert spec_from_app({"id": "/a", "cmd": "x", "ports": [0, 8123]}).ports == (Port("port0"), Port("port1", 8123))


def test_omitted_fields_take_shipyard_defaults() -> None:
    spec = spec_from_app({"id": "/plain", "cmd": "sleep 5"})
    default = parse_project("services:\n  plain:\n    cmd: sleep 5\n    ports: [port0]\n").services["plain"]
    assert spec == default


# ---- spec -> app -> spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "api", "shop--cart", "lonely"])
def test_spec_to_app_and_back_is_the_same_spec(name: str) -> None:
    spec = specs()[name]
    app = app_from_spec(spec)
    assert spec_from_app(app) == spec
    assert spec_from_app(app, base=spec) == spec


def test_app_shape_of_a_spec() -> None:
    app = app_from_spec(specs()["web"])
    assert app["id"] == "/web"
    assert (app["cmd"], app["args"]) == ("python3 -m http.server $PORT", None)
    assert (app["instances"], app["cpus"], app["mem"]) == (3, 0.25, 64.0)
    assert app["portDefinitions"] == [{"port": 0, "protocol": "tcp", "name": "http", "labels": {}},
                                      {"port": 9123, "protocol": "tcp", "name": "admin", "labels": {}}]
    assert app["ports"] == [0, 9123] and app["requirePorts"] is True
    assert app["healthChecks"] == [{"protocol": "HTTP", "path": "/healthz", "portIndex": 1, "ignoreHttp1xx": False,
                                    "intervalSeconds": 2, "timeoutSeconds": 1, "gracePeriodSeconds": 3,
                                    "maxConsecutiveFailures": 4}]
    assert app["upgradeStrategy"] == {"minimumHealthCapacity": 1, "maximumOverCapacity": 2 / 3}
    assert (app["backoffSeconds"], app["backoffFactor"], app["maxLaunchDelaySeconds"]) == (0.5, 1.5, 30)
    assert app["taskKillGracePeriodSeconds"] == 7
    assert app["labels"] == {"team": "shop"} and app["env"] == {"GREETING": "hello", "LEVEL": "2"}
    assert app_from_spec(specs()["api"])["args"] == ["python3", "-m", "http.server"]
    assert app_from_spec(specs()["api"])["dependencies"] == ["/web"]
    assert app_from_spec(specs()["shop--cart"])["id"] == "/shop/cart"
    assert app_from_spec(specs()["shop--cart"])["healthChecks"][0]["command"] == {"value": "test -f /tmp/ok"}


def test_app_to_spec_and_back_is_the_same_app() -> None:
    app = {"id": "/shop/web", "cmd": "run", "instances": 2, "cpus": 0.5, "mem": 256.0, "env": {"A": "b"},
           "labels": {"x": "y"}, "portDefinitions": [{"port": 0, "protocol": "tcp", "name": "http", "labels": {}}],
           "healthChecks": [{"protocol": "TCP", "portIndex": 0, "intervalSeconds": 5, "timeoutSeconds": 2,
                             "gracePeriodSeconds": 30, "maxConsecutiveFailures": 3}],
           "upgradeStrategy": {"minimumHealthCapacity": 1, "maximumOverCapacity": 0.5},
           "backoffSeconds": 1, "backoffFactor": 1.15, "maxLaunchDelaySeconds": 300,
           "taskKillGracePeriodSeconds": 3, "dependencies": ["/db"]}
    back = app_from_spec(spec_from_app(app))
    assert {k: back[k] for k in app} == app


def test_a_partial_update_changes_only_what_it_names() -> None:
    base = parse_project("services:\n  web:\n    cmd: run\n    ports: [http]\n    tags: [a, b]\n"
                         "    update: {min_healthy_time: 1s, auto_revert: true}\n"
                         "    depends_on: {db: healthy}\n  db:\n    cmd: db\n    ports: [p]\n"
                         "    health: {tcp: p}\n").services["web"]
    scaled = spec_from_app({"instances": 5}, base=base, app_id="/web")
    assert scaled.instances == 5 and scaled.tags == ("a", "b") and scaled.update == base.update
    assert scaled.ports == base.ports and scaled.depends_on == {"db": "healthy"}
    changed = spec_from_app({"cmd": "run --v2", "dependencies": ["/db"]}, base=base, app_id="/web")
    assert changed.cmd == "run --v2" and changed.depends_on == {"db": "healthy"}
    to_args = spec_from_app({"args": ["run", "--v3"]}, base=base, app_id="/web")
    assert (to_args.cmd, to_args.args) == (None, ("run", "--v3"))
    without_health = spec_from_app({"healthChecks": []}, base=specs()["web"], app_id="/web")
    assert without_health.health is None


# ---- refusals -----------------------------------------------------------------------------------------------


def details(body, **kwargs) -> dict[str, list[str]]:
    with pytest.raises(AppInvalid) as info:
        spec_from_app(body, **kwargs)
    assert info.value.status == 422 and info.value.message == "Object is not valid"
    return {d["path"]: d["errors"] for d in info.value.details}


def test_invalid_apps_are_refused_with_marathon_paths() -> None:
    assert "/" in details({"id": "/a"})
    assert "/" in details({"id": "/a", "cmd": "x", "args": ["y"]})
    assert "/id" in details({"id": "/My.App", "cmd": "x"})
    assert "/id" in details({"cmd": "x"})
    problems = details({"id": "/a", "cmd": "x", "instances": -1, "cpus": 0, "mem": "lots", "bogus": 1,
                        "container": {"type": "DOCKER"}, "env": {"1BAD": "x", "OK": {"secret": "s"}}})
    assert set(problems) == {"/instances", "/cpus", "/mem", "/bogus", "/container", "/env/1BAD", "/env/OK"}
    assert "/healthChecks(0)/portIndex" in details({"id": "/a", "cmd": "x",
                                                    "healthChecks": [{"protocol": "HTTP", "portIndex": 3}]})
    assert "/healthChecks(0)/protocol" in details({"id": "/a", "cmd": "x", "healthChecks": [{"protocol": "HTTPS"}]})
    assert "/healthChecks(0)/maxConsecutiveFailures" in details(
        {"id": "/a", "cmd": "x", "healthChecks": [{"protocol": "TCP", "maxConsecutiveFailures": 0}]})
    assert "/healthChecks" in details({"id": "/a", "cmd": "x", "healthChecks": [{}, {}]})
    assert "/portDefinitions(1)/name" in details({"id": "/a", "cmd": "x",
                                                  "portDefinitions": [{"name": "p"}, {"name": "p"}]})
    assert "/portDefinitions(0)/port" in details({"id": "/a", "cmd": "x", "portDefinitions": [{"port": 70000}]})
    assert "/upgradeStrategy/maximumOverCapacity" in details(
        {"id": "/a", "cmd": "x", "upgradeStrategy": {"maximumOverCapacity": 2}})
    assert "/id" in details({"id": "/b", "instances": 2}, base=specs()["web"], app_id="/web")
    assert "/" in details(["not", "an", "object"])


def test_read_only_fields_from_a_get_are_accepted_back() -> None:
    app = app_from_spec(specs()["web"])
    app.update(version="3", tasksRunning=3, tasks=[], deployments=[], versionInfo={})
    assert spec_from_app(app, base=specs()["web"], app_id="/web") == specs()["web"]
