"""shipyard.yaml parsing: valid files, every kind of error with file:line:field, round-trips, hashes, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.errors import Unprocessable
from shipyard.spec import ProjectSpec, SpecError, TaskSpec, load_project, parse_duration, parse_project
from shipyard.spec_schema import json_schema, json_schema_text

FULL = """\
project: shop
x-common: &common
  resources: {cpu: 250, memory: 256}
services:
  api:
    <<: *common
    cmd: python -m shop.api --port $PORT
    instances: 3
    env: {LOG_LEVEL: debug, WORKERS: 4}
    ports:
      http: {}
      admin: {static: 9090}
    health: {http: /health, interval: 5s, timeout: 500ms, grace: 1m, failures: 2}
    depends_on: {db: healthy}
    update: {max_parallel: 2, min_healthy_time: 10s, healthy_deadline: 2m, auto_revert: true, canary: 1}
    restart: {initial: 2s, factor: 1.5, max: 30s, attempts: 10}
    stop_grace: 15
    tags: [v1, public]
    meta: {team: shop}
    routes:
      - {path: /api, strip_prefix: true}
  db:
    args: [postgres, -D, /data]
    ports: [pg]
    health: {tcp: pg}
workers:
  mailer:
    cmd: python -m shop.mailer
    instances: 0
    depends_on: [api]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_project(text)
    return [str(p) for p in caught.value.problems]


def test_full_file_parses_with_every_field() -> None:
    project = parse_project(FULL)
    api = project.services["api"]
    assert project.project == "shop" and set(project.tasks) == {"api", "db", "mailer"}
    assert api.instances == 3 and api.cmd.startswith("python") and api.resources.cpu == 250
    assert api.env == {"LOG_LEVEL": "debug", "WORKERS": "4"}
    assert [(p.name, p.static) for p in api.ports] == [("http", None), ("admin", 9090)]
    assert api.health.kind == "http" and api.health.port == "http" and api.health.timeout == 0.5
    assert api.health.grace == 60 and api.health.failures == 2
    assert api.update.max_parallel == 2 and api.update.healthy_deadline == 120 and api.update.auto_revert
    assert api.restart.factor == 1.5 and api.restart.attempts == 10 and api.stop_grace == 15
    assert api.depends_on == {"db": "healthy"} and api.tags == ("v1", "public") and api.routes[0]["path"] == "/api"
    db = project.services["db"]
    assert db.args == ("postgres", "-D", "/data") and db.health.kind == "tcp" and db.health.target == "pg"
    assert db.resources.cpu == 100 and db.resources.memory == 128 and db.update.max_parallel == 1
    mailer = project.workers["mailer"]
    assert mailer.kind == "worker" and mailer.instances == 0 and mailer.depends_on == {"api": "started"}


def test_minimal_defaults() -> None:
    web = parse_project("services:\n  web:\n    cmd: ./run\n").services["web"]
    assert web.instances == 1 and web.ports == () and web.health is None and web.stop_grace == 5
    assert (web.update.min_healthy_time, web.update.healthy_deadline, web.update.canary) == (5, 60, 0)
    assert (web.restart.initial, web.restart.factor, web.restart.max) == (1, 2, 60)


def test_durations() -> None:
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5 and parse_duration(3) == 3
    for bad in ("10", "ten seconds", -1, True, "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_wrong_type_names_file_line_and_field() -> None:
    text = "services:\n  api:\n    cmd: run\n    instances: three\n"
    assert problems(text) == ['shipyard.yaml:4: services.api.instances: expected an integer >= 0, got "three"']


def test_all_problems_are_reported_in_line_order() -> None:
    text = """\
services:
  api:
    cmd: run
    instances: -2
    health: {http: health}
    update:
      max_paralel: 3
      min_healthy_time: soon
    resources: {cpu: 0}
    env: {BAD-NAME: x, OK: [1]}
  Bad_Name:
    cmd: x
"""
    assert problems(text) == [
        "shipyard.yaml:4: services.api.instances: expected an integer >= 0, got -2",
        'shipyard.yaml:5: services.api.health.http: expected a path starting with "/", got "health"',
        "shipyard.yaml:5: services.api.health.http: an http check needs a port; declare one under ports",
        "shipyard.yaml:7: services.api.update.max_paralel: unknown field (did you mean 'max_parallel'?)",
        'shipyard.yaml:8: services.api.update.min_healthy_time: expected a duration like "10s", "500ms", "1m" '
        'or a number of seconds, got "soon"',
        "shipyard.yaml:9: services.api.resources.cpu: expected an integer >= 1, got 0",
        "shipyard.yaml:10: services.api.env.BAD-NAME: invalid name (letters, digits and _, not starting with a digit)",
        "shipyard.yaml:10: services.api.env.OK: expected a string, got a list",
        "shipyard.yaml:11: services.Bad_Name: invalid name (lowercase letters, digits and -, at most 63)",
    ]


def test_unknown_fields_suggest_the_right_one() -> None:
    text = "services:\n  api:\n    cmd: run\n    instance: 2\n    helth: {tcp: x}\n    zzz: 1\n"
    assert problems(text) == [
        "shipyard.yaml:4: services.api.instance: unknown field (did you mean 'instances'?)",
        "shipyard.yaml:5: services.api.helth: unknown field (did you mean 'health'?)",
        "shipyard.yaml:6: services.api.zzz: unknown field (allowed: cmd, args, instances, env, ports, health, "
        "resources, depends_on, update, restart, stop_grace, tags, meta, routes, workdir, secrets, vault, "
        "constraints, spread, distinct_hosts)",
    ]
    assert problems("service:\n  api: {cmd: x}\n") == [
        "shipyard.yaml:1: service: unknown field (did you mean 'services'?)"]


def test_structural_errors() -> None:
    text = """\
services:
  api:
    cmd: run
    args: [run]
    ports: {http: {static: 70000}, web: {static: 8080}, admin: {static: 8080}}
    depends_on: {db: ready, cache: started, api: started}
  tcp:
    cmd: x
    health: {tcp: nope}
  db:
    ports: [pg]
    cmd: x
workers:
  db:
    cmd: y
  jobs:
    cmd: z
    routes: [{path: /}]
"""
    assert problems(text) == [
        "shipyard.yaml:2: services.api: exactly one of cmd or args is required",
        "shipyard.yaml:5: services.api.ports.http.static: expected an integer between 1 and 65535, got 70000",
        "shipyard.yaml:5: services.api.ports.admin.static: port 8080 is already used by port 'web'",
        "shipyard.yaml:6: services.api.depends_on.db: expected started or healthy, got \"ready\"",
        "shipyard.yaml:9: services.tcp.health.tcp: no port named 'nope' (ports: none)",
        "shipyard.yaml:14: workers.db: name already used by a service",
        "shipyard.yaml:18: workers.jobs.routes: unknown field (routes are only for services)",
    ]


def test_dependency_references_and_cycles() -> None:
    text = """\
services:
  a: {cmd: x, depends_on: {b: started, bb: started}}
  b: {cmd: x, depends_on: {a: healthy}}
  c: {cmd: x, depends_on: [c]}
"""
    assert problems(text) == [
        "shipyard.yaml:2: services.a.depends_on.bb: no service or worker named 'bb' (did you mean 'b'?)",
        "shipyard.yaml:2: services.a.depends_on: dependency cycle: a -> b -> a",
        "shipyard.yaml:3: services.b.depends_on.a: 'a' has no health check to wait for",
        "shipyard.yaml:4: services.c.depends_on.c: a job cannot depend on itself",
    ]


def test_yaml_level_errors() -> None:
    assert problems("services:\n  api: {cmd: x\n")[0].startswith("shipyard.yaml:3: invalid YAML:")
    assert problems("services:\n  api: {cmd: x, cmd: y}\n") == ["shipyard.yaml:2: services.api.cmd: duplicate key"]
    assert problems("- a\n- b\n") == ["shipyard.yaml:1: expected a mapping, got a list"]
    assert problems("") == ["shipyard.yaml: no services or workers defined"]


def test_error_is_unprocessable_with_structured_detail(tmp_path: Path) -> None:
    path = tmp_path / "shipyard.yaml"
    path.write_text("services:\n  api:\n    cmd: run\n    instances: three\n")
    with pytest.raises(Unprocessable) as caught:
        load_project(str(path))
    assert caught.value.status == 422
    assert caught.value.detail == [{"file": str(path), "line": 4, "path": "services.api.instances",
                                    "message": 'expected an integer >= 0, got "three"'}]
    assert caught.value.message.startswith(f"{path}:4: services.api.instances:")


def test_round_trip_through_json() -> None:
    project = parse_project(FULL)
    for task in project.tasks.values():
        stored = json.loads(json.dumps(task.to_dict()))
        assert TaskSpec.from_dict(stored) == task
    assert ProjectSpec.from_dict(json.loads(json.dumps(project.to_dict()))) == project


def test_from_dict_validates_too() -> None:
    with pytest.raises(SpecError) as caught:
        ProjectSpec.from_dict({"services": {"api": {"cmd": "x", "instances": "3"}}}, source="api")
    assert [str(p) for p in caught.value.problems] == [
        'api: services.api.instances: expected an integer >= 0, got "3"']


def test_content_hash_is_stable_and_sensitive() -> None:
    project = parse_project(FULL)
    reordered = FULL.replace("env: {LOG_LEVEL: debug, WORKERS: 4}", 'env: {WORKERS: "4", LOG_LEVEL: debug}')
    assert parse_project(reordered).services["api"].content_hash() == project.services["api"].content_hash()
    assert parse_project(FULL.replace("stop_grace: 15", "stop_grace: 15s")).content_hash() == project.content_hash()
    scaled = parse_project(FULL.replace("instances: 3", "instances: 5")).services["api"]
    changed = parse_project(FULL.replace("LOG_LEVEL: debug", "LOG_LEVEL: info")).services["api"]
    api = project.services["api"]
    assert scaled.content_hash() != api.content_hash() and scaled.template_hash() == api.template_hash()
    assert changed.template_hash() != api.template_hash()


def test_schema_file_is_up_to_date() -> None:
    committed = Path(__file__).parent.parent / "docs" / "shipyard.schema.json"
    assert committed.read_text() == json_schema_text(), "regenerate: python -m shipyard.spec_schema > docs/..."


def test_schema_describes_every_field_the_parser_accepts() -> None:
    schema = json_schema()
    service = schema["$defs"]["service"]["properties"]
    worker = schema["$defs"]["worker"]["properties"]
    assert set(service) - set(worker) == {"routes"}
    assert schema["properties"]["services"]["additionalProperties"] == {"$ref": "#/$defs/service"}
    assert schema["$defs"]["update"]["properties"]["max_parallel"]["default"] == 1
    assert schema["additionalProperties"] is False and service["instances"]["minimum"] == 0
