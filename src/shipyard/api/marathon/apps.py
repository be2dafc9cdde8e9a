"""Marathon app definitions <-> Shipyard job specs: app ids to job ids and Marathon's fields onto spec.TaskSpec.

Pure translation: it must never read the store or the clock; the spec validator stays the final judge of a job.

Ids: a Marathon id is a path of segments ("/web", "/shop/web"); the job id joins the segments with "--"
("web", "shop--web"), so a segment may not itself contain "--" (nor "." — job names have no dots).
Every job name maps back to one app id and that app id maps back to the same job name.

Fields: cpus x 1000 = resources.cpu (MHz); mem = resources.memory (MB); labels = meta; portDefinitions =
named ports (port 0 = dynamic; an unnamed port i is "port<i>"); one health check; upgradeStrategy's
maximumOverCapacity x instances = update.max_parallel; backoffSeconds/backoffFactor/maxLaunchDelaySeconds =
restart initial/factor/max; taskKillGracePeriodSeconds = stop_grace; dependencies = depends_on (started).
Fields an app leaves out keep the job's current values on an update and Shipyard's defaults on a create
(except portDefinitions, which defaults to one dynamic port as in Marathon). Marathon features Shipyard does
not have (containers, fetch, disk, gpus, secrets, readiness checks) are refused when set, never silently
dropped. constraints map to placement rules (api/marathon/constraints.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from shipyard.api.marathon.constraints import constraints_of, placement_from_constraints
from shipyard.errors import Unprocessable
from shipyard.spec import ENV_NAME_RE, NAME_RE, PORT_NAME_RE, SpecError, TaskSpec

SEGMENT_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
GROUP_SEPARATOR = "--"
# /v2/apps/{id}/restart, /tasks and /versions would be ambiguous if an app's last segment had these names.
RESERVED_LAST_SEGMENTS = frozenset({"restart", "tasks", "versions"})

# Shown by GET and accepted back unchanged on PUT, but they describe state, not the definition.
READ_ONLY_FIELDS = frozenset({
    "version", "versionInfo", "tasks", "tasksRunning", "tasksStaged", "tasksHealthy", "tasksUnhealthy",
    "deployments", "lastTaskFailure", "taskStats", "readinessCheckResults", "counts",
})
# Scheduling hints that change nothing on a Shipyard node; accepted with any value.
IGNORED_FIELDS = frozenset({"role", "killSelection", "unreachableStrategy", "requirePorts"})
MAPPED_FIELDS = frozenset({
    "id", "cmd", "args", "instances", "cpus", "mem", "env", "labels", "portDefinitions", "ports",
    "healthChecks", "upgradeStrategy", "backoffSeconds", "backoffFactor", "maxLaunchDelaySeconds",
    "taskKillGracePeriodSeconds", "dependencies", "constraints",
})
HEALTH_PROTOCOLS = {"HTTP": "http", "MESOS_HTTP": "http", "TCP": "tcp", "MESOS_TCP": "tcp", "COMMAND": "command"}
HEALTH_FIELDS = frozenset({
    "protocol", "path", "portIndex", "port", "command", "intervalSeconds", "timeoutSeconds",
    "gracePeriodSeconds", "maxConsecutiveFailures", "ignoreHttp1xx", "delaySeconds",
})


def _neutral_values() -> dict[str, tuple[Any, ...]]:
    # Marathon fields whose only value Shipyard can honour is "not used": anything else is refused.
    return {
        "disk": (None, 0, 0.0),
        "gpus": (None, 0),
        "executor": (None, "", "//cmd"),
        "uris": (None, []),
        "fetch": (None, []),
        "storeUrls": (None, []),
        "container": (None,),
        "readinessChecks": (None, []),
        "secrets": (None, {}),
        "residency": (None,),
        "acceptedResourceRoles": (None, [], ["*"]),
        "ipAddress": (None,),
        "user": (None,),
        "networks": (None, [], [{"mode": "host"}]),
    }


NEUTRAL_FIELDS = _neutral_values()
# Why Shipyard cannot honour a field, said in the 422 so that nobody takes the refusal for a typo of theirs.
UNSUPPORTED_WHY = {
    "container": "Shipyard runs an app's cmd or args as a process on the node (its exec driver); it has no Docker "
                 "or Mesos containerizer, so a container (image, portMappings, volumes) cannot be run",
    "uris": "Shipyard has no Mesos fetcher to download URIs into a task sandbox; ship the files with the app "
            "(or fetch them in cmd)",
    "fetch": "Shipyard has no Mesos fetcher to download artifacts into a task sandbox; ship the files with the "
             "app (or fetch them in cmd)",
    "storeUrls": "Shipyard has no Mesos fetcher to download artifacts into a task sandbox",
    "secrets": "Marathon secret references need a Mesos secrets plugin; use env values or Shipyard's secrets",
    "readinessChecks": "Shipyard gates rollouts on the app's health check; readiness checks are not supported",
}


class AppInvalid(Unprocessable):
    """Marathon's 422: {"message": "Object is not valid", "details": [{"path", "errors"}]}."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        self.details = details
        text = "; ".join(f"{d['path']}: {', '.join(d['errors'])}" for d in details)
        super().__init__("Object is not valid", details)
        self.summary = text


class _Problems:
    def __init__(self) -> None:
        self.by_path: dict[str, list[str]] = {}

    def add(self, path: str, message: str) -> None:
        self.by_path.setdefault(path, []).append(message)

    def __bool__(self) -> bool:
        return bool(self.by_path)

    def raise_if_any(self) -> None:
        if self.by_path:
            raise AppInvalid([{"path": p, "errors": e} for p, e in self.by_path.items()])


# ---- ids ----------------------------------------------------------------------------------------------------


def app_id_problems(app_id: Any) -> list[str]:
    """Why an app id cannot name a Shipyard job ([] when it can)."""
    if not isinstance(app_id, str) or not app_id.strip("/"):
        return ["must be a non-empty path like /web or /group/web"]
    segments = app_id.strip("/").split("/")
    problems = []
    for segment in segments:
        if "." in segment:
            problems.append(f"segment {segment!r}: '.' is not supported (relative ids and dots are not allowed)")
        elif GROUP_SEPARATOR in segment:
            problems.append(f"segment {segment!r}: '--' is reserved to join group segments into a job name")
        elif not SEGMENT_RE.match(segment):
            problems.append(f"segment {segment!r} must fully match regular expression '{SEGMENT_RE.pattern}'")
    if not problems and segments[-1] in RESERVED_LAST_SEGMENTS:
        problems.append(f"the last segment may not be {segments[-1]!r} (reserved by the /v2/apps API)")
    if not problems and not NAME_RE.match(GROUP_SEPARATOR.join(segments)):
        problems.append("too long: the joined job name must be at most 63 characters")
    return problems


def job_id_of(app_id: str) -> str:
    """'/shop/web' -> 'shop--web'. Lookups use it for any id; creates check app_id_problems first."""
    return GROUP_SEPARATOR.join(s for s in app_id.strip("/").split("/") if s)


def app_id_of(job_id: str) -> str:
    """'shop--web' -> '/shop/web'; a job name whose parts are not valid segments stays one segment."""
    parts = job_id.split(GROUP_SEPARATOR)
    if len(parts) > 1 and all(SEGMENT_RE.match(p) for p in parts):
        return "/" + "/".join(parts)
    return "/" + job_id


# ---- app -> spec --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def spec_from_app(app: Any, base: TaskSpec | None = None, *, app_id: str | None = None) -> TaskSpec:
    """A Marathon app definition (or, with base, a partial update of it) as a validated TaskSpec.

    app_id names the app when the body has no id (PUT /v2/apps/{id}); a body id must agree with it.
    Raises AppInvalid with Marathon-style paths ("/instances", "/healthChecks(0)/portIndex").
    """
    problems = _Problems()
    if not isinstance(app, Mapping):
        raise AppInvalid([{"path": "/", "errors": ["expected a JSON object"]}])
    body_id = app.get("id")
    if body_id is not None and app_id is not None and job_id_of(str(body_id)) != job_id_of(app_id):
        problems.add("/id", f"the id in the body ({body_id}) differs from the app addressed ({app_id})")
    target = app_id if app_id is not None else body_id
    if base is None:
        for message in app_id_problems(target):
            problems.add("/id", message)
    problems.raise_if_any()
    assert isinstance(target, str)
    name = base.name if base is not None else job_id_of(target)

    for key in app:
        if key in READ_ONLY_FIELDS or key in IGNORED_FIELDS or key in MAPPED_FIELDS:
            continue
        if key in NEUTRAL_FIELDS:
            if app[key] not in NEUTRAL_FIELDS[key]:
                allowed = ", ".join("null" if v is None else repr(v) for v in NEUTRAL_FIELDS[key])
                why = UNSUPPORTED_WHY.get(key, "Shipyard has no equivalent of it")
                problems.add(f"/{key}", f"{key} is not supported by Shipyard: {why} (allowed: {allowed})")
            continue
        problems.add(f"/{key}", "unknown field")

    data: dict[str, Any] = base.to_dict() if base is not None else {"name": name, "kind": "service"}
    data["name"], data["kind"] = name, data.get("kind", "service")

    _command(app, data, problems)
    if "instances" in app:
        if _is_int(app["instances"]) and app["instances"] >= 0:
            data["instances"] = int(app["instances"])
        else:
            problems.add("/instances", "must be an integer >= 0")
    _resources(app, data, problems)
    if "env" in app:
        data["env"] = _string_map(app["env"], "/env", problems, ENV_NAME_RE)
    if "labels" in app:
        data["meta"] = _string_map(app["labels"], "/labels", problems, None)
    port_names = _ports(app, data, problems, creating=base is None)
    if "healthChecks" in app:
        _health(app["healthChecks"], data, port_names, problems)
    _upgrade_strategy(app, data, problems)
    _restart(app, data, problems)
    if "taskKillGracePeriodSeconds" in app:
        value = app["taskKillGracePeriodSeconds"]
        if value is None:
            data.pop("stop_grace", None)
        elif _is_number(value) and value >= 0:
            data["stop_grace"] = float(value)
        else:
            problems.add("/taskKillGracePeriodSeconds", "must be a number >= 0")
    if "dependencies" in app:
        _dependencies(app["dependencies"], data, problems)
    if "constraints" in app:  # they replace every placement rule the job had
        data.update(placement_from_constraints(app["constraints"], problems.add))
    problems.raise_if_any()
    try:
        return TaskSpec.from_dict(data)
    except SpecError as exc:
        raise AppInvalid([{"path": _marathon_path(p.path), "errors": [p.message]} for p in exc.problems]) from None


def _command(app: Mapping[str, Any], data: dict[str, Any], problems: _Problems) -> None:
    cmd, args = app.get("cmd"), app.get("args")
    if cmd is not None and args is not None:
        problems.add("/", "AppDefinition must either contain one of 'cmd' or 'args', not both")
        return
    if cmd is not None:
        if isinstance(cmd, str) and cmd.strip():
            data["cmd"] = cmd
            data.pop("args", None)
        else:
            problems.add("/cmd", "must be a non-empty string")
    elif args is not None:
        if isinstance(args, list) and args and all(isinstance(a, str) for a in args):
            data["args"] = list(args)
            data.pop("cmd", None)
        else:
            problems.add("/args", "must be a non-empty list of strings")
    elif "cmd" not in data and "args" not in data:
        problems.add("/", "AppDefinition must either contain one of 'cmd' or 'args' (containers are not supported)")


def _resources(app: Mapping[str, Any], data: dict[str, Any], problems: _Problems) -> None:
    resources = dict(data.get("resources") or {})
    if app.get("cpus") is not None:
        cpus = app["cpus"]
        if _is_number(cpus) and cpus >= 0.001:
            resources["cpu"] = max(1, round(cpus * 1000))
        else:
            problems.add("/cpus", "must be a number >= 0.001")
    if app.get("mem") is not None:
        mem = app["mem"]
        if _is_number(mem) and mem >= 1:
            resources["memory"] = math.ceil(mem)
        else:
            problems.add("/mem", "must be a number >= 1 (MB)")
    if resources:
        data["resources"] = resources


def _string_map(value: Any, path: str, problems: _Problems, key_re: re.Pattern[str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, "must be an object of strings")
        return {}
    out: dict[str, str] = {}
    for key, item in value.items():
        if key_re is not None and not key_re.match(key):
            problems.add(f"{path}/{key}", "invalid name (letters, digits and _, not starting with a digit)")
        elif isinstance(item, str):
            out[key] = item
        elif _is_number(item):
            out[key] = str(item)
        else:
            problems.add(f"{path}/{key}", "must be a string (secret references are not supported)")
    return out


def _ports(app: Mapping[str, Any], data: dict[str, Any], problems: _Problems, *, creating: bool) -> list[str]:
    """Sets data["ports"] from portDefinitions or ports; returns the resulting port names in index order."""
    both = app.get("portDefinitions") is not None and app.get("ports") not in (None, [])
    if both and not _same_ports(app["portDefinitions"], app["ports"]):
        # An app read with GET carries both; that is fine as long as they agree.
        problems.add("/", "You cannot specify both ports and port definitions")
        return list(data.get("ports") or {})
    definitions: list[Any] | None = None
    path = "/portDefinitions"
    if app.get("portDefinitions") is not None:
        definitions = app["portDefinitions"]
    elif app.get("ports") is not None:
        path = "/ports"
        raw = app["ports"]
        definitions = [{"port": p} for p in raw] if isinstance(raw, list) else raw
    elif creating:
        definitions = [{"port": 0}]  # Marathon gives an app one dynamic port unless told otherwise
    if definitions is None:
        return list(data.get("ports") or {})
    if not isinstance(definitions, list):
        problems.add(path, "must be a list")
        return list(data.get("ports") or {})
    ports: dict[str, dict[str, int]] = {}
    for i, definition in enumerate(definitions):
        where = f"{path}({i})"
        if not isinstance(definition, Mapping):
            problems.add(where, "must be an object with port, name and protocol")
            continue
        port, name = definition.get("port", 0), definition.get("name") or f"port{i}"
        if not _is_int(port) or not 0 <= port <= 65535:
            problems.add(f"{where}/port", "must be an integer between 0 and 65535 (0 = dynamic)")
            continue
        if not isinstance(name, str) or not PORT_NAME_RE.match(name):
            problems.add(f"{where}/name", f"must fully match regular expression '{PORT_NAME_RE.pattern}'")
            continue
        if definition.get("protocol", "tcp") not in ("tcp", None):
            problems.add(f"{where}/protocol", "only tcp is supported")
            continue
        if name in ports:
            problems.add(f"{where}/name", "port names must be unique")
            continue
        ports[name] = {"static": int(port)} if port else {}
    data["ports"] = ports
    return list(ports)


def _same_ports(definitions: Any, ports: Any) -> bool:
    if not isinstance(definitions, list) or not isinstance(ports, list) or len(definitions) != len(ports):
        return False
    return all(isinstance(d, Mapping) and d.get("port", 0) == p for d, p in zip(definitions, ports, strict=True))


def _health(checks: Any, data: dict[str, Any], port_names: list[str], problems: _Problems) -> None:
    if checks is None or checks == []:
        data.pop("health", None)
        return
    if not isinstance(checks, list):
        problems.add("/healthChecks", "must be a list")
        return
    if len(checks) > 1:
        problems.add("/healthChecks", "Shipyard supports one health check per app")
        return
    check, where = checks[0], "/healthChecks(0)"
    if not isinstance(check, Mapping):
        problems.add(where, "must be an object")
        return
    for key in check:
        if key not in HEALTH_FIELDS:
            problems.add(f"{where}/{key}", "unknown field")
    protocol = check.get("protocol", "HTTP")
    kind = HEALTH_PROTOCOLS.get(protocol) if isinstance(protocol, str) else None
    if kind is None:
        problems.add(f"{where}/protocol", f"must be one of {', '.join(HEALTH_PROTOCOLS)}")
        return
    health: dict[str, Any] = {}
    if kind == "command":
        command = check.get("command")
        value = command.get("value") if isinstance(command, Mapping) else command
        if not isinstance(value, str) or not value.strip():
            problems.add(f"{where}/command", 'a COMMAND check needs command: {"value": "..."}')
            return
        health["command"] = value
    else:
        port = _health_port(check, where, data, port_names, problems)
        if port is None:
            return
        if kind == "http":
            path = check.get("path", "/")
            if not isinstance(path, str) or not path.startswith("/"):
                problems.add(f"{where}/path", 'must be a path starting with "/"')
                return
            health["http"], health["port"] = path, port
        else:
            health["tcp"] = port
    for field, key, minimum in (("intervalSeconds", "interval", 0.001), ("timeoutSeconds", "timeout", 0.001),
                                ("gracePeriodSeconds", "grace", 0)):
        if check.get(field) is not None:
            if _is_number(check[field]) and check[field] >= minimum:
                health[key] = float(check[field])
            else:
                problems.add(f"{where}/{field}", f"must be a number of seconds >= {minimum:g}")
    if check.get("maxConsecutiveFailures") is not None:
        failures = check["maxConsecutiveFailures"]
        if _is_int(failures) and failures >= 1:
            health["failures"] = int(failures)
        else:
            problems.add(f"{where}/maxConsecutiveFailures",
                         "must be an integer >= 1 (0, never restart an unhealthy task, is not supported)")
    data["health"] = health


def _health_port(check: Mapping[str, Any], where: str, data: dict[str, Any], port_names: list[str],
                 problems: _Problems) -> str | None:
    if check.get("port") is not None:
        wanted = check["port"]
        for name, options in (data.get("ports") or {}).items():
            if options.get("static") == wanted:
                return str(name)
        problems.add(f"{where}/port", "must be the fixed port of one of the app's portDefinitions")
        return None
    index = check.get("portIndex", 0)
    if not _is_int(index) or not 0 <= index < len(port_names):
        problems.add(f"{where}/portIndex", f"must index the app's {len(port_names)} port definition(s)")
        return None
    return port_names[int(index)]


def _upgrade_strategy(app: Mapping[str, Any], data: dict[str, Any], problems: _Problems) -> None:
    strategy = app.get("upgradeStrategy")
    if strategy is None:
        return
    if not isinstance(strategy, Mapping):
        problems.add("/upgradeStrategy", "must be an object")
        return
    for key in strategy:
        if key not in ("minimumHealthCapacity", "maximumOverCapacity"):
            problems.add(f"/upgradeStrategy/{key}", "unknown field")
    for key in ("minimumHealthCapacity", "maximumOverCapacity"):
        value = strategy.get(key)
        if value is not None and not (_is_number(value) and 0 <= value <= 1):
            problems.add(f"/upgradeStrategy/{key}", "must be a number between 0 and 1")
            return
    over = strategy.get("maximumOverCapacity")
    if over is not None:
        # Shipyard starts replacements before stopping old instances, so the healthy capacity never drops
        # below the old count; how many are replaced at once is all a strategy can change.
        instances = int(data.get("instances", 1))
        update = dict(data.get("update") or {})
        update["max_parallel"] = max(1, math.ceil(instances * over - 1e-9))
        data["update"] = update


def _restart(app: Mapping[str, Any], data: dict[str, Any], problems: _Problems) -> None:
    restart = dict(data.get("restart") or {})
    for field, key, minimum in (("backoffSeconds", "initial", 0), ("backoffFactor", "factor", 1),
                                ("maxLaunchDelaySeconds", "max", 0)):
        if app.get(field) is not None:
            if _is_number(app[field]) and app[field] >= minimum:
                restart[key] = float(app[field])
            else:
                problems.add(f"/{field}", f"must be a number >= {minimum}")
    if restart:
        data["restart"] = restart


def _dependencies(value: Any, data: dict[str, Any], problems: _Problems) -> None:
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add("/dependencies", "must be a list of app ids")
        return
    old = dict(data.get("depends_on") or {})
    depends: dict[str, str] = {}
    for i, dep in enumerate(value):
        if app_id_problems(dep):
            problems.add(f"/dependencies({i})", "; ".join(app_id_problems(dep)))
            continue
        job = job_id_of(dep)
        depends[job] = old.get(job, "started")  # keeps a "healthy" condition set in shipyard.yaml
    data["depends_on"] = depends


def _marathon_path(spec_path: str) -> str:
    # "services.web.health.port" -> "/health/port": the spec's own field names, under the app.
    parts = spec_path.split(".")[2:] if spec_path.startswith(("services.", "workers.")) else [spec_path]
    return "/" + "/".join(p for p in parts if p)


# ---- spec -> app --------------------------------------------------------------------------------------------


def _seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def app_from_spec(spec: TaskSpec) -> dict[str, Any]:
    """The Marathon definition of a job (no status fields); spec_from_app(app_from_spec(s)) == s for what it maps."""
    port_names = [p.name for p in spec.ports]
    instances = spec.instances
    return {
        "id": app_id_of(spec.name),
        "cmd": spec.cmd,
        "args": list(spec.args) if spec.cmd is None else None,
        "user": None,
        "env": dict(spec.env),
        "instances": instances,
        "cpus": spec.resources.cpu / 1000,
        "mem": float(spec.resources.memory),
        "disk": 0,
        "gpus": 0,
        "executor": "",
        "constraints": constraints_of(spec),
        "uris": [],
        "fetch": [],
        "storeUrls": [],
        "backoffSeconds": _seconds(spec.restart.initial),
        "backoffFactor": spec.restart.factor,
        "maxLaunchDelaySeconds": _seconds(spec.restart.max),
        "container": None,
        "healthChecks": [] if spec.health is None else [_health_check_of(spec, port_names)],
        "readinessChecks": [],
        "dependencies": [app_id_of(d) for d in spec.depends_on],
        "upgradeStrategy": {
            "minimumHealthCapacity": 1,
            "maximumOverCapacity": min(1.0, spec.update.max_parallel / instances) if instances else 1.0,
        },
        "labels": dict(spec.meta),
        "acceptedResourceRoles": None,
        "ipAddress": None,
        "residency": None,
        "secrets": {},
        "taskKillGracePeriodSeconds": _seconds(spec.stop_grace),
        "killSelection": "YOUNGEST_FIRST",
        "requirePorts": any(p.static is not None for p in spec.ports),
        "ports": [p.static or 0 for p in spec.ports],
        "portDefinitions": [
            {"port": p.static or 0, "protocol": "tcp", "name": p.name, "labels": {}} for p in spec.ports
        ],
    }


def _health_check_of(spec: TaskSpec, port_names: list[str]) -> dict[str, Any]:
    h = spec.health
    assert h is not None
    out: dict[str, Any] = {
        "gracePeriodSeconds": _seconds(h.grace),
        "intervalSeconds": _seconds(h.interval),
        "timeoutSeconds": _seconds(h.timeout),
        "maxConsecutiveFailures": h.failures,
    }
    if h.kind == "command":
        out.update(protocol="COMMAND", command={"value": h.target})
    elif h.kind == "http":
        out.update(protocol="HTTP", path=h.target, portIndex=port_names.index(h.port or port_names[0]),
                   ignoreHttp1xx=False)
    else:
        out.update(protocol="TCP", portIndex=port_names.index(h.target))
    return out
