"""The shipyard.yaml schema: typed, frozen job specs, their validation with file:line:field errors, and JSON forms.

It must never start, stop or look up anything: parsing a spec is pure, so the CLI, API and scheduler agree on it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from shipyard.errors import Unprocessable

# The field names each section accepts; the JSON Schema and the validator both read these.
PROJECT_FIELDS = ("project", "services", "workers")
TASK_FIELDS = (
    "cmd", "args", "instances", "env", "ports", "health", "resources", "depends_on",
    "update", "restart", "stop_grace", "tags", "meta", "routes", "workdir", "secrets", "vault",
    "constraints", "spread", "distinct_hosts",
)
WORKER_FIELDS = (*(f for f in TASK_FIELDS if f != "routes"), "autoscale")
# Written by the CLI, not by people (so not in the schema): {file: digest} of the working directory, which makes a
# code change a new version.
INTERNAL_FIELDS = ("source",)
HEALTH_FIELDS = ("http", "tcp", "command", "port", "interval", "timeout", "grace", "failures")
RESOURCE_FIELDS = ("cpu", "memory")
UPDATE_FIELDS = ("max_parallel", "min_healthy_time", "healthy_deadline", "auto_revert", "canary")
RESTART_FIELDS = ("initial", "factor", "max", "attempts", "reset_after")
PORT_FIELDS = ("static",)
AUTOSCALE_FIELDS = ("queue", "min", "max", "target_depth", "cooldown")
CONSTRAINT_FIELDS = ("attribute", "operator", "value")
SPREAD_FIELDS = ("attribute", "weight", "targets")
# Nomad's constraint operators (plus not_regexp, which Marathon's UNLIKE needs); "==" is read as "=".
CONSTRAINT_OPERATORS = ("=", "!=", "regexp", "not_regexp", "version", "is_set", "is_not_set", "distinct_hosts",
                        "distinct_property")
# A node attribute as Nomad spells it: ${node.unique.name}, ${node.class}, ${meta.rack}, ${attr.kernel.name}...
ATTRIBUTE_RE = re.compile(r"^\$\{(node\.(unique\.name|unique\.id|name|class|datacenter)"
                          r"|(attr|meta)\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})\}$")
VERSION_PART_RE = re.compile(r"^\s*(=|!=|>=|<=|>|<|~>)?\s*v?(\d+(?:\.\d+){0,3})\s*$")
DEPENDENCY_CONDITIONS = ("started", "healthy")

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PORT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A secret reference: a secrets engine read path, '#', the field (secret/data/mediahub/db#password).
CHANGE_MODES = ("restart", "signal", "noop")
SECRET_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
SECRET_REF_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.@+-]+)+#[^#\s]+$")
DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Bounds on what a spec may say, so every value fits where it goes: a JSON integer (int64) in the store and the
# APIs, Go's time.Duration (int64 nanoseconds) in the Consul check definitions built from it.
MAX_INTEGER = (1 << 63) - 1
MAX_DURATION = MAX_INTEGER / 1e9  # seconds, about 292 years
MAX_YAML_NODES = 200_000  # far beyond any real project file
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")  # the bus's portable queue names


@dataclass(frozen=True)
class Port:
    name: str
    static: int | None = None  # None: the agent picks a free port from its dynamic range


@dataclass(frozen=True)
class HealthCheck:
    kind: str  # "http" | "tcp" | "command"
    target: str  # http: the path; tcp: the port name; command: a shell command
    port: str | None = None  # http: which named port to probe
    interval: float = 10.0
    timeout: float = 2.0
    grace: float = 5.0
    failures: int = 3


@dataclass(frozen=True)
class Resources:
    cpu: int = 100  # MHz
    memory: int = 128  # MB


@dataclass(frozen=True)
class UpdatePolicy:
    max_parallel: int = 1
    min_healthy_time: float = 5.0
    healthy_deadline: float = 60.0
    auto_revert: bool = False
    canary: int = 0


@dataclass(frozen=True)
class RestartPolicy:
    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0
    attempts: int | None = None  # None: restart forever
    reset_after: float = 60.0  # the backoff starts over after an instance has run this long


@dataclass(frozen=True)
class Autoscale:
    """A worker's instance count follows the work waiting in its queue: about target_depth messages each."""

    queue: str
    min: int = 0
    max: int = 10
    target_depth: int = 100
    cooldown: float = 60.0  # seconds without a scaling change before it scales down


@dataclass(frozen=True)
class Constraint:
    """A rule every node of a job's instances must pass (Nomad's constraint block)."""

    attribute: str  # "${meta.rack}"; "" for distinct_hosts
    operator: str = "="
    value: str = ""  # distinct_property: the most instances per value ("1" unless given)


@dataclass(frozen=True)
class Spread:
    """Spread a job's instances over the values of a node attribute: evenly, or by percent per value."""

    attribute: str
    weight: int = 100  # 1-100: how much this spread counts against the job's other spreads
    targets: Mapping[str, int] = field(default_factory=dict)  # value -> percent; the rest is shared by other values


def parse_version_constraint(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'>= 1.2, < 2' -> (('>=', (1, 2)), ('<', (2,))); ValueError when a part is not '[op] number[.number...]'."""
    parts = []
    for piece in text.split(","):
        match = VERSION_PART_RE.match(piece)
        if match is None:
            raise ValueError(piece.strip() or text)
        parts.append((match.group(1) or "=", tuple(int(n) for n in match.group(2).split("."))))
    return tuple(parts)


@dataclass(frozen=True)
class TaskSpec:
    """One service or worker: what the scheduler calls a job."""

    name: str
    kind: str  # "service" | "worker"
    cmd: str | None = None
    args: tuple[str, ...] = ()
    instances: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[Port, ...] = ()
    health: HealthCheck | None = None
    resources: Resources = Resources()
    depends_on: Mapping[str, str] = field(default_factory=dict)
    update: UpdatePolicy = UpdatePolicy()
    restart: RestartPolicy = RestartPolicy()
    stop_grace: float = 5.0
    workdir: str | None = None  # where the command runs; `shipyard up` resolves it against the project dir
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    routes: tuple[Mapping[str, Any], ...] = ()
    autoscale: Autoscale | None = None  # workers only
    source: Mapping[str, str] = field(default_factory=dict)  # the working directory's files as deployed
    secrets: Mapping[str, str] = field(default_factory=dict)  # env name -> "engine/path#field" (secrets engine)
    vault_policies: tuple[str, ...] = ()  # the secrets engine policies of each instance's token
    vault_change_mode: str = "restart"  # when a secret it reads changes: restart | signal | noop (Nomad's change_mode)
    vault_change_signal: str = "SIGHUP"  # the signal of change_mode: signal
    vault_files: Mapping[str, str] = field(default_factory=dict)  # file name -> "engine/path#field", on tmpfs
    constraints: tuple[Constraint, ...] = ()  # where instances may run (node attributes, meta, distinct...)
    spread: tuple[Spread, ...] = ()
    distinct_hosts: bool = False  # at most one instance of the job per node

    @property
    def has_placement_rules(self) -> bool:
        return bool(self.constraints or self.spread or self.distinct_hosts)

    def to_dict(self) -> dict[str, Any]:
        return task_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """Rebuild from to_dict() output (as stored in the store); validates like a file does."""
        name, kind = data.get("name"), data.get("kind", "service")
        if not isinstance(name, str):
            raise SpecError([SpecProblem("<stored job>", None, "name", f"expected a job name, got {_describe(name)}")])
        body = {k: v for k, v in data.items() if k not in ("name", "kind")}
        section = "workers" if kind == "worker" else "services"
        project = _Validator("<stored job>", {}, check_references=False).project({section: {name: body}})
        return (project.workers if kind == "worker" else project.services)[name]

    def content_hash(self) -> str:
        """Stable over re-parsing and key order: an unchanged spec gives the same hash, so no new version."""
        return _digest(self.to_dict())

    def template_hash(self) -> str:
        """The hash of what a running instance depends on: a change here replaces instances, others don't."""
        data = self.to_dict()
        for key in ("instances", "update", "depends_on", "autoscale"):
            data.pop(key, None)
        return _digest(data)


@dataclass(frozen=True)
class ProjectSpec:
    services: Mapping[str, TaskSpec] = field(default_factory=dict)
    workers: Mapping[str, TaskSpec] = field(default_factory=dict)
    project: str | None = None

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return {**self.services, **self.workers}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.project is not None:
            out["project"] = self.project
        out["services"] = {n: _without_identity(t.to_dict()) for n, t in self.services.items()}
        out["workers"] = {n: _without_identity(t.to_dict()) for n, t in self.workers.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<json>") -> ProjectSpec:
        return _Validator(source, {}).project(data)

    def content_hash(self) -> str:
        return _digest(self.to_dict())


@dataclass(frozen=True)
class SpecProblem:
    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Unprocessable):
    """A spec with problems; all of them are listed, each naming file, line and field path."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(str(p) for p in problems),
            [{"file": p.source, "line": p.line, "path": p.path, "message": p.message} for p in problems],
        )


def parse_project(text: str, source: str = "shipyard.yaml") -> ProjectSpec:
    """Parse and validate shipyard.yaml text; raise SpecError listing every problem found."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise SpecError([SpecProblem(source, line, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem(source, None, "", f"invalid YAML: {exc}")]) from None
    lines: dict[tuple[Any, ...], int] = {}
    problems: list[SpecProblem] = []
    data = {} if node is None else _plain(node, (), lines, problems, source)
    validator = _Validator(source, lines)
    validator.problems.extend(problems)
    return validator.project(data)


def load_project(path: str) -> ProjectSpec:
    with open(path, encoding="utf-8") as fh:
        return parse_project(fh.read(), source=path)


def parse_duration(value: Any) -> float:
    """'1m30s' / '500ms' / 10 -> seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and DURATION_RE.match(value):
        seconds = sum(float(n) * DURATION_UNITS[u] for n, u in DURATION_PART_RE.findall(value))
    else:
        raise ValueError(value)
    if not 0 <= seconds <= MAX_DURATION:  # also NaN and YAML's .inf
        raise ValueError(value)
    return seconds


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _without_identity(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("name", "kind")}


def task_to_dict(t: TaskSpec) -> dict[str, Any]:
    """The canonical JSON form: every field written out, so defaults changing later don't alter stored jobs."""
    out: dict[str, Any] = {"name": t.name, "kind": t.kind}
    if t.cmd is not None:
        out["cmd"] = t.cmd
    else:
        out["args"] = list(t.args)
    out["instances"] = t.instances
    out["env"] = dict(sorted(t.env.items()))
    out["ports"] = {p.name: ({"static": p.static} if p.static is not None else {}) for p in t.ports}
    if t.health is not None:
        h = t.health
        out["health"] = {h.kind: h.target, "interval": h.interval, "timeout": h.timeout,
                         "grace": h.grace, "failures": h.failures}
        if h.port is not None:
            out["health"]["port"] = h.port
    out["resources"] = {"cpu": t.resources.cpu, "memory": t.resources.memory}
    out["depends_on"] = dict(sorted(t.depends_on.items()))
    u, r = t.update, t.restart
    out["update"] = {"max_parallel": u.max_parallel, "min_healthy_time": u.min_healthy_time,
                     "healthy_deadline": u.healthy_deadline, "auto_revert": u.auto_revert, "canary": u.canary}
    out["restart"] = {"initial": r.initial, "factor": r.factor, "max": r.max, "attempts": r.attempts,
                      "reset_after": r.reset_after}
    out["stop_grace"] = t.stop_grace
    if t.workdir is not None:
        out["workdir"] = t.workdir
    out["tags"] = list(t.tags)
    out["meta"] = dict(sorted(t.meta.items()))
    if t.kind == "service":
        out["routes"] = [dict(r) for r in t.routes]
    if t.autoscale is not None:  # only when set: jobs stored before autoscaling existed keep their hashes
        a = t.autoscale
        out["autoscale"] = {"queue": a.queue, "min": a.min, "max": a.max, "target_depth": a.target_depth,
                            "cooldown": float(a.cooldown)}
    if t.source:  # only when set, like autoscale: jobs deployed without it keep their hashes
        out["source"] = dict(sorted(t.source.items()))
    if t.secrets:  # only when set, like source
        out["secrets"] = dict(sorted(t.secrets.items()))
    if t.vault_policies or t.vault_change_mode != "restart" or t.vault_change_signal != "SIGHUP" or t.vault_files:
        out["vault"] = {"policies": list(t.vault_policies), "change_mode": t.vault_change_mode,
                        "change_signal": t.vault_change_signal}
        if t.vault_files:
            out["vault"]["files"] = dict(sorted(t.vault_files.items()))
    _placement_to_dict(t, out)
    return out


def _placement_to_dict(t: TaskSpec, out: dict[str, Any]) -> None:
    # Only when set, like source: jobs stored before placement rules existed keep their hashes.
    if t.constraints:
        out["constraints"] = [{k: v for k, v in (("attribute", c.attribute), ("operator", c.operator),
                                                 ("value", c.value)) if v} for c in t.constraints]
    if t.spread:
        out["spread"] = [{"attribute": s.attribute, "weight": s.weight, "targets": dict(sorted(s.targets.items()))}
                         for s in t.spread]
    if t.distinct_hosts:
        out["distinct_hosts"] = True


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


_SCALARS = yaml.SafeLoader("")


def _plain(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int],
           problems: list[SpecProblem], source: str) -> Any:
    """YAML node tree -> plain data, remembering each path's line and reporting duplicate keys."""
    lines.setdefault(path, node.start_mark.line + 1)
    if len(lines) > MAX_YAML_NODES:  # aliases can expand a small file exponentially ("billion laughs")
        raise SpecError([SpecProblem(source, node.start_mark.line + 1, _dotted(path),
                                     f"document expands to more than {MAX_YAML_NODES} values (alias bomb?)")])
    if isinstance(node, yaml.MappingNode):
        try:
            _SCALARS.flatten_mapping(node)  # resolves '<<: *defaults' merge keys
        except yaml.MarkedYAMLError as exc:
            line = node.start_mark.line + 1
            problems.append(SpecProblem(source, line, _dotted(path), f"invalid merge: {exc.problem}"))
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, path, problems, source) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.append(SpecProblem(source, key_node.start_mark.line + 1, _dotted(path),
                                            f"keys must be strings, got {_describe(key)}"))
                continue
            child = (*path, key)
            if key in out:
                problems.append(SpecProblem(source, key_node.start_mark.line + 1, _dotted(child), "duplicate key"))
                continue
            lines[child] = key_node.start_mark.line + 1
            out[key] = _plain(value_node, child, lines, problems, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, (*path, i), lines, problems, source) for i, item in enumerate(node.value)]
    return _scalar(node, path, problems, source)


def _scalar(node: yaml.Node, path: tuple[Any, ...], problems: list[SpecProblem], source: str) -> Any:
    # Calling the constructor directly (not construct_object) keeps the shared loader free of per-node caches.
    constructor = _SCALARS.yaml_constructors.get(node.tag)
    if constructor is None:
        problems.append(SpecProblem(source, node.start_mark.line + 1, _dotted(path), f"unsupported tag {node.tag}"))
        return None
    try:
        return constructor(_SCALARS, node)
    except (yaml.YAMLError, ValueError) as exc:
        problems.append(SpecProblem(source, node.start_mark.line + 1, _dotted(path), f"invalid value: {exc}"))
        return None


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and abs(value) > MAX_INTEGER:
        return f"{value:.6g}"  # not hundreds of digits
    return str(value)


class _Validator:
    """Walks plain data, collecting every problem before failing, so a user fixes a file in one pass.

    Top-level keys starting with "x-" are ignored, as in docker compose, to hold YAML anchors.
    """

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int], *, check_references: bool = True) -> None:
        self.source = source
        self.lines = lines
        self.check_references = check_references
        self.problems: list[SpecProblem] = []

    def fail(self, path: tuple[Any, ...], message: str) -> None:
        line = None
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        self.problems.append(SpecProblem(self.source, line, _dotted(path), message))

    def expect(self, path: tuple[Any, ...], value: Any, what: str) -> None:
        self.fail(path, f"expected {what}, got {_describe(value)}")

    def mapping(self, path: tuple[Any, ...], value: Any, allowed: tuple[str, ...] | None) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.expect(path, value, "a mapping")
            return None
        if allowed is not None:
            for key in value:
                if key not in allowed and not (path == () and key.startswith("x-")):
                    close = difflib.get_close_matches(key, allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
                    self.fail((*path, key), f"unknown field{hint}")
        return value

    def integer(self, path: tuple[Any, ...], value: Any, minimum: int, maximum: int | None = None) -> int | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if ok and value <= (MAX_INTEGER if maximum is None else maximum):
            return value
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        if maximum is None and ok:
            bound = f"between {minimum} and 2^63-1"
        self.expect(path, value, f"an integer {bound}")
        return None

    def number(self, path: tuple[Any, ...], value: Any, minimum: float) -> float | None:
        # Bounded as integers are: JSON has no infinity (orjson would write YAML's .inf as null).
        if isinstance(value, int | float) and not isinstance(value, bool) and minimum <= value <= MAX_INTEGER:
            return float(value)
        self.expect(path, value, f"a number >= {minimum:g}")
        return None

    def duration(self, path: tuple[Any, ...], value: Any) -> float | None:
        try:
            return parse_duration(value)
        except ValueError:
            self.expect(path, value, 'a duration like "10s", "500ms", "1m" or a number of seconds')
            return None

    def string(self, path: tuple[Any, ...], value: Any, pattern: re.Pattern[str] | None = None,
               what: str = "a non-empty string") -> str | None:
        if isinstance(value, str) and value and (pattern is None or pattern.match(value)):
            return value
        self.expect(path, value, what)
        return None

    def string_map(self, path: tuple[Any, ...], value: Any, key_re: re.Pattern[str] | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, item in (self.mapping(path, value, None) or {}).items():
            if key_re is not None and not key_re.match(key):
                self.fail((*path, key), "invalid name (letters, digits and _, not starting with a digit)")
            elif isinstance(item, str):
                out[key] = item
            elif isinstance(item, int | float) and not isinstance(item, bool):
                out[key] = str(item)  # YAML reads PORT: 8080 as a number; the environment wants its text
            else:
                self.expect((*path, key), item, "a string")
        return out

    def vault(self, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
        vault = self.mapping(path, value, ("policies", "change_mode", "change_signal", "files"))
        if vault is None:
            return {}
        out: dict[str, Any] = {"vault_policies": self.string_list((*path, "policies"), vault.get("policies"))}
        files = self.string_map((*path, "files"), vault.get("files"))
        for name, ref in files.items():
            if not SECRET_FILE_RE.match(name):
                self.fail((*path, "files", name), "invalid file name (letters, digits, . _ -; not starting with .)")
            elif not SECRET_REF_RE.match(ref) or ".." in ref.split("#")[0].split("/"):
                self.fail((*path, "files", name), "expected a secret reference like secret/data/app/db#password")
        out["vault_files"] = files
        mode = vault.get("change_mode", "restart")
        if mode not in CHANGE_MODES:
            self.fail((*path, "change_mode"), f"expected one of {', '.join(CHANGE_MODES)}")
        else:
            out["vault_change_mode"] = mode
        sig = vault.get("change_signal", "SIGHUP")
        if not isinstance(sig, str) or sig not in signal.Signals.__members__:
            self.fail((*path, "change_signal"), "expected a signal name like SIGHUP or SIGUSR1")
        else:
            out["vault_change_signal"] = sig
        return out

    def secret_refs(self, path: tuple[Any, ...], value: Any) -> dict[str, str]:
        refs = self.string_map(path, value, ENV_NAME_RE)
        for name, ref in refs.items():
            if not SECRET_REF_RE.match(ref) or ".." in ref.split("#")[0].split("/"):
                self.fail((*path, name), "expected a secret reference like secret/data/app/db#password")
        return refs

    def string_list(self, path: tuple[Any, ...], value: Any, non_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            self.expect(path, value, "a non-empty list of strings" if non_empty else "a list of strings")
            return ()
        return tuple(s for i, item in enumerate(value)
                     if (s := self.string((*path, i), item, what="a string")) is not None)

    # --- sections -------------------------------------------------------------------------------------------

    def project(self, data: Any) -> ProjectSpec:
        root = self.mapping((), data, PROJECT_FIELDS)
        services: dict[str, TaskSpec] = {}
        workers: dict[str, TaskSpec] = {}
        project_name = None
        if root is not None:
            if "project" in root:
                project_name = self.string(("project",), root["project"], NAME_RE, "a lowercase name")
            service_names = set(root.get("services") or ()) if isinstance(root.get("services"), dict) else set()
            for section, kind, out in (("services", "service", services), ("workers", "worker", workers)):
                for name, body in (self.mapping((section,), root.get(section), None) or {}).items():
                    if not NAME_RE.match(name):
                        self.fail((section, name), "invalid name (lowercase letters, digits and -, at most 63)")
                    elif kind == "worker" and name in service_names:
                        self.fail((section, name), "name already used by a service")
                    else:
                        task = self.task((section, name), name, kind, body)
                        if task is not None:
                            out[name] = task
            if not services and not workers and not self.problems:
                self.fail((), "no services or workers defined")
            if self.check_references:
                self.dependencies(services, workers)
        if self.problems:
            raise SpecError(sorted(self.problems, key=lambda p: p.line or 0))
        return ProjectSpec(services=services, workers=workers, project=project_name)

    def task(self, path: tuple[Any, ...], name: str, kind: str, body: Any) -> TaskSpec | None:
        body, internal = self._task_body(path, kind, body)
        spec = self.mapping(path, body, TASK_FIELDS if kind == "service" else WORKER_FIELDS)
        if spec is None:
            return None
        before = len(self.problems)
        values: dict[str, Any] = {"name": name, "kind": kind}
        # The three parts check fields in the order this method always did: problems on one line keep their order.
        self._task_command(path, spec, values)
        self._task_runtime(path, spec, values)
        self._task_extras(path, kind, spec, internal, values)
        if len(self.problems) > before:
            return None
        return TaskSpec(**values)

    def _task_body(self, path: tuple[Any, ...], kind: str, body: Any) -> tuple[Any, dict[str, Any]]:
        """The body to check against the allowed fields, and its internal fields set apart: those are accepted
        but must not be offered in "unknown field (allowed: ...)", and a worker's routes get their own message."""
        internal = {k: body[k] for k in INTERNAL_FIELDS if k in body} if isinstance(body, dict) else {}
        if internal:
            body = {k: v for k, v in body.items() if k not in internal}
        if kind == "worker" and isinstance(body, dict) and "routes" in body:
            self.fail((*path, "routes"), "unknown field (routes are only for services)")
            body = {k: v for k, v in body.items() if k != "routes"}
        return body, internal

    def _task_command(self, path: tuple[Any, ...], spec: dict[str, Any], values: dict[str, Any]) -> None:
        """What runs and how many: cmd or args (exactly one), instances."""
        if ("cmd" in spec) == ("args" in spec):
            self.fail(path, "exactly one of cmd or args is required")
        elif "cmd" in spec:
            values["cmd"] = self.string((*path, "cmd"), spec["cmd"])
        else:
            values["args"] = self.string_list((*path, "args"), spec["args"], non_empty=True)
        if "instances" in spec:
            values["instances"] = self.integer((*path, "instances"), spec["instances"], 0)

    def _task_runtime(self, path: tuple[Any, ...], spec: dict[str, Any], values: dict[str, Any]) -> None:
        """How each instance runs: environment, ports and their health check, resources, ordering, update and
        restart policies, stop grace, working directory (health needs the ports, so they come first)."""
        values["env"] = self.string_map((*path, "env"), spec.get("env"), ENV_NAME_RE)
        values["ports"] = self.ports((*path, "ports"), spec.get("ports"))
        if spec.get("health") is not None:
            values["health"] = self.health((*path, "health"), spec["health"], values["ports"])
        values["resources"] = self.resources((*path, "resources"), spec.get("resources"))
        values["depends_on"] = self.depends_on((*path, "depends_on"), spec.get("depends_on"))
        values["update"] = self.update((*path, "update"), spec.get("update"))
        values["restart"] = self.restart((*path, "restart"), spec.get("restart"))
        if "stop_grace" in spec:
            values["stop_grace"] = self.duration((*path, "stop_grace"), spec["stop_grace"])
        if spec.get("workdir") is not None:
            values["workdir"] = self.string((*path, "workdir"), spec["workdir"])

    def _task_extras(self, path: tuple[Any, ...], kind: str, spec: dict[str, Any], internal: dict[str, Any],
                     values: dict[str, Any]) -> None:
        """What the platform attaches to the task: tags, meta, secrets, vault, a service's routes, a worker's
        autoscale, and the internal source field."""
        if spec.get("tags") is not None:
            values["tags"] = self.string_list((*path, "tags"), spec["tags"])
        values["meta"] = self.string_map((*path, "meta"), spec.get("meta"))
        values["secrets"] = self.secret_refs((*path, "secrets"), spec.get("secrets"))
        if spec.get("vault") is not None:
            values.update(self.vault((*path, "vault"), spec["vault"]))
        if kind == "service" and spec.get("routes") is not None:
            values["routes"] = self.routes((*path, "routes"), spec["routes"])
        if kind == "worker" and spec.get("autoscale") is not None:
            values["autoscale"] = self.autoscale((*path, "autoscale"), spec["autoscale"])
        if internal.get("source") is not None:
            values["source"] = self.string_map((*path, "source"), internal["source"])
        self._task_placement(path, spec, values)

    def _task_placement(self, path: tuple[Any, ...], spec: dict[str, Any], values: dict[str, Any]) -> None:
        """Where instances may run: constraints, spread, distinct_hosts."""
        if spec.get("constraints") is not None:
            values["constraints"] = self.constraints((*path, "constraints"), spec["constraints"])
        if spec.get("spread") is not None:
            values["spread"] = self.spreads((*path, "spread"), spec["spread"])
        if spec.get("distinct_hosts") is not None:
            if isinstance(spec["distinct_hosts"], bool):
                values["distinct_hosts"] = spec["distinct_hosts"]
            else:
                self.expect((*path, "distinct_hosts"), spec["distinct_hosts"], "true or false")

    def constraints(self, path: tuple[Any, ...], value: Any) -> tuple[Constraint, ...]:
        if not isinstance(value, list):
            self.expect(path, value, "a list of constraints (attribute, operator, value)")
            return ()
        out = []
        for i, item in enumerate(value):
            constraint = self.constraint((*path, i), item)
            if constraint is not None:
                out.append(constraint)
        return tuple(out)

    def constraint(self, path: tuple[Any, ...], value: Any) -> Constraint | None:
        spec = self.mapping(path, value, CONSTRAINT_FIELDS)
        if spec is None:
            return None
        operator = spec.get("operator", "=")
        operator = "=" if operator == "==" else operator
        if operator not in CONSTRAINT_OPERATORS:
            self.expect((*path, "operator"), operator, "one of " + ", ".join(CONSTRAINT_OPERATORS))
            return None
        attribute = self._constraint_attribute(path, spec, operator)
        text = self._constraint_value(path, spec, operator)
        if attribute is None or text is None:
            return None
        return Constraint(attribute, operator, text)

    def _constraint_attribute(self, path: tuple[Any, ...], spec: dict[str, Any], operator: str) -> str | None:
        if operator == "distinct_hosts":
            if "attribute" in spec:
                self.fail((*path, "attribute"), "distinct_hosts takes no attribute (it is about nodes)")
                return None
            return ""
        if "attribute" not in spec:
            self.fail(path, "attribute is required (e.g. ${meta.rack}, ${node.class}, ${attr.kernel.name})")
            return None
        return self.string((*path, "attribute"), spec["attribute"], ATTRIBUTE_RE,
                           "a node attribute like ${meta.rack}, ${node.class}, ${node.unique.name}, "
                           "${attr.kernel.name} or ${attr.cpu.arch}")

    def _constraint_value(self, path: tuple[Any, ...], spec: dict[str, Any], operator: str) -> str | None:
        """The value as text, checked for what the operator needs (a regexp that compiles, a version range...)."""
        where, raw = (*path, "value"), spec.get("value")
        if operator in ("is_set", "is_not_set") or (operator == "distinct_hosts" and raw in (None, True, "true")):
            if raw is not None and operator != "distinct_hosts":
                self.fail(where, f"{operator} takes no value")
                return None
            return ""
        if operator in ("distinct_hosts", "distinct_property"):
            if operator == "distinct_hosts":
                self.expect(where, raw, "true (or no value)")
                return None
            if raw is None:
                return "1"
            # Stored specs (and Marathon's MAX_PER) carry the count as text.
            count = self.integer(where, int(raw) if isinstance(raw, str) and raw.isdigit() else raw, 1)
            return None if count is None else str(count)
        if isinstance(raw, bool) or not isinstance(raw, str | int | float) or raw == "":
            self.expect(where, raw, f"a value for {operator} (a string)")
            return None
        return self._checked_value(where, operator, str(raw))

    def _checked_value(self, where: tuple[Any, ...], operator: str, text: str) -> str | None:
        if operator in ("regexp", "not_regexp"):
            try:
                re.compile(text)
            except re.error as exc:
                self.fail(where, f"invalid regular expression: {exc}")
                return None
        elif operator == "version":
            try:
                parse_version_constraint(text)
            except ValueError as exc:
                self.fail(where, f"invalid version range at {str(exc)!r} "
                                 "(expected e.g. \">= 1.2, < 2\" or \"~> 5.10\")")
                return None
        return text

    def spreads(self, path: tuple[Any, ...], value: Any) -> tuple[Spread, ...]:
        if not isinstance(value, list):
            self.expect(path, value, "a list of spreads (attribute, weight, targets)")
            return ()
        out = []
        for i, item in enumerate(value):
            spread = self.spread((*path, i), item)
            if spread is not None:
                out.append(spread)
        return tuple(out)

    def spread(self, path: tuple[Any, ...], value: Any) -> Spread | None:
        spec = self.mapping(path, value, SPREAD_FIELDS)
        if spec is None:
            return None
        if "attribute" not in spec:
            self.fail(path, "attribute is required (e.g. ${meta.rack})")
            return None
        attribute = self.string((*path, "attribute"), spec["attribute"], ATTRIBUTE_RE,
                                "a node attribute like ${meta.rack} or ${node.datacenter}")
        weight = self.integer((*path, "weight"), spec["weight"], 1, 100) if "weight" in spec else 100
        targets: dict[str, int] = {}
        for name, percent in (self.mapping((*path, "targets"), spec.get("targets"), None) or {}).items():
            n = self.integer((*path, "targets", name), percent, 0, 100)
            if n is not None:
                targets[str(name)] = n
        if sum(targets.values()) > 100:
            self.fail((*path, "targets"), f"percentages add up to {sum(targets.values())}, more than 100")
            return None
        if attribute is None or weight is None:
            return None
        return Spread(attribute, weight, targets)

    def ports(self, path: tuple[Any, ...], value: Any) -> tuple[Port, ...]:
        if value is None:
            return ()
        entries: list[tuple[tuple[Any, ...], str, Any]] = []
        if isinstance(value, list):
            entries = [((*path, i), item, None) for i, item in enumerate(value)]
        elif isinstance(value, dict):
            entries = [((*path, name), name, body) for name, body in value.items()]
        else:
            self.expect(path, value, "a mapping of port names or a list of port names")
            return ()
        ports: list[Port] = []
        seen_static: dict[int, str] = {}
        for where, name, body in entries:
            if not isinstance(name, str) or not PORT_NAME_RE.match(name):
                self.expect(where, name, "a port name (lowercase letters, digits and _)")
                continue
            if any(p.name == name for p in ports):
                self.fail(where, "duplicate port name")
                continue
            options = self.mapping(where, body, PORT_FIELDS)
            static = None
            if options and options.get("static") is not None:
                static = self.integer((*where, "static"), options["static"], 1, 65535)
                if static is not None and static in seen_static:
                    self.fail((*where, "static"), f"port {static} is already used by port {seen_static[static]!r}")
                elif static is not None:
                    seen_static[static] = name
            ports.append(Port(name, static))
        return tuple(ports)

    def health(self, path: tuple[Any, ...], value: Any, ports: tuple[Port, ...]) -> HealthCheck | None:
        spec = self.mapping(path, value, HEALTH_FIELDS)
        if spec is None:
            return None
        kinds = [k for k in ("http", "tcp", "command") if k in spec]
        if len(kinds) != 1:
            self.fail(path, "exactly one of http, tcp or command is required")
            return None
        kind = kinds[0]
        if kind == "http":
            target, port = self._http_check_target(path, spec, ports)
        else:
            target, port = self._tcp_or_command_target(path, spec, kind, ports), None
        values = self._health_timings(path, spec)
        if target is None or None in values.values():
            return None
        return HealthCheck(kind=kind, target=target, port=port, **values)

    def _http_check_target(self, path: tuple[Any, ...], spec: dict[str, Any], ports: tuple[Port, ...]
                           ) -> tuple[str | None, str | None]:
        """An http check's path and the port it is sent to: the named one, else the task's first port."""
        port_names = [p.name for p in ports]
        port = None
        target = self.string((*path, "http"), spec["http"], re.compile(r"^/"), 'a path starting with "/"')
        if "port" in spec:
            port = self.string((*path, "port"), spec["port"])
            if port is not None and port not in port_names:
                self.fail((*path, "port"), f"no port named {port!r} (ports: {', '.join(port_names) or 'none'})")
        elif not ports:
            self.fail((*path, "http"), "an http check needs a port; declare one under ports")
        else:
            port = ports[0].name
        return target, port

    def _tcp_or_command_target(self, path: tuple[Any, ...], spec: dict[str, Any], kind: str,
                               ports: tuple[Port, ...]) -> str | None:
        """A tcp check's port name (which must be declared) or a command check's command line."""
        port_names = [p.name for p in ports]
        if "port" in spec:
            self.fail((*path, "port"), f"unknown field (port is for http checks; {kind} names its own)")
        target = self.string((*path, kind), spec[kind])
        if kind == "tcp" and target is not None and target not in port_names:
            self.fail((*path, "tcp"), f"no port named {target!r} (ports: {', '.join(port_names) or 'none'})")
        return target

    def _health_timings(self, path: tuple[Any, ...], spec: dict[str, Any]) -> dict[str, Any]:
        """The check's interval, timeout, grace and failure count that the file sets (None where one is invalid,
        which makes the whole check invalid)."""
        values: dict[str, Any] = {}
        for key in ("interval", "timeout", "grace"):
            if key in spec:
                values[key] = self.duration((*path, key), spec[key])
        if "failures" in spec:
            values["failures"] = self.integer((*path, "failures"), spec["failures"], 1)
        return values

    def resources(self, path: tuple[Any, ...], value: Any) -> Resources:
        spec = self.mapping(path, value, RESOURCE_FIELDS) or {}
        values = {k: self.integer((*path, k), spec[k], 1) for k in RESOURCE_FIELDS if k in spec}
        return Resources(**{k: v for k, v in values.items() if v is not None})

    def depends_on(self, path: tuple[Any, ...], value: Any) -> dict[str, str]:
        if isinstance(value, list):  # a plain list means "started", as in docker compose
            value = {name: "started" for name in self.string_list(path, value)}
        out: dict[str, str] = {}
        for name, condition in (self.mapping(path, value, None) or {}).items():
            if condition not in DEPENDENCY_CONDITIONS:
                self.expect((*path, name), condition, "started or healthy")
            else:
                out[name] = condition
        return out

    def update(self, path: tuple[Any, ...], value: Any) -> UpdatePolicy:
        spec = self.mapping(path, value, UPDATE_FIELDS) or {}
        values: dict[str, Any] = {}
        if "max_parallel" in spec:
            values["max_parallel"] = self.integer((*path, "max_parallel"), spec["max_parallel"], 1)
        if "canary" in spec:
            values["canary"] = self.integer((*path, "canary"), spec["canary"], 0)
        for key in ("min_healthy_time", "healthy_deadline"):
            if key in spec:
                values[key] = self.duration((*path, key), spec[key])
        if "auto_revert" in spec:
            if isinstance(spec["auto_revert"], bool):
                values["auto_revert"] = spec["auto_revert"]
            else:
                self.expect((*path, "auto_revert"), spec["auto_revert"], "true or false")
        return UpdatePolicy(**{k: v for k, v in values.items() if v is not None})

    def restart(self, path: tuple[Any, ...], value: Any) -> RestartPolicy:
        spec = self.mapping(path, value, RESTART_FIELDS) or {}
        values: dict[str, Any] = {}
        for key in ("initial", "max", "reset_after"):
            if key in spec:
                values[key] = self.duration((*path, key), spec[key])
        if "factor" in spec:
            values["factor"] = self.number((*path, "factor"), spec["factor"], 1)
        if spec.get("attempts") is not None:
            values["attempts"] = self.integer((*path, "attempts"), spec["attempts"], 0)
        return RestartPolicy(**{k: v for k, v in values.items() if v is not None})

    def autoscale(self, path: tuple[Any, ...], value: Any) -> Autoscale | None:
        spec = self.mapping(path, value, AUTOSCALE_FIELDS)
        if spec is None:
            return None
        if "queue" not in spec:
            self.fail(path, "queue is required (the bus queue whose depth drives the instance count)")
            return None
        values: dict[str, Any] = {
            "queue": self.string((*path, "queue"), spec["queue"], QUEUE_NAME_RE,
                                 "a queue name (1-200 of letters, digits, _ . : -)"),
        }
        for key in ("min", "max"):
            if key in spec:
                values[key] = self.integer((*path, key), spec[key], 0)
        if "target_depth" in spec:
            values["target_depth"] = self.integer((*path, "target_depth"), spec["target_depth"], 1)
        if "cooldown" in spec:
            values["cooldown"] = self.duration((*path, "cooldown"), spec["cooldown"])
        if None in values.values():
            return None
        policy = Autoscale(**values)
        if policy.max < policy.min:
            self.fail((*path, "max"), f"max ({policy.max}) is below min ({policy.min})")
            return None
        if policy.max < 1:
            self.fail((*path, "max"), "max must be at least 1")
            return None
        return policy

    def routes(self, path: tuple[Any, ...], value: Any) -> tuple[Mapping[str, Any], ...]:
        # Opaque here: the gateway owns route semantics; we only promise a list of mappings.
        if not isinstance(value, list):
            self.expect(path, value, "a list of route mappings")
            return ()
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict) and item:
                out.append(item)
            else:
                self.expect((*path, i), item, "a non-empty mapping")
        return tuple(out)

    def dependencies(self, services: dict[str, TaskSpec], workers: dict[str, TaskSpec]) -> None:
        tasks = {**services, **workers}
        for name, task in tasks.items():
            section = "services" if task.kind == "service" else "workers"
            for dep, condition in task.depends_on.items():
                target = tasks.get(dep)
                if dep == name:
                    self.fail((section, name, "depends_on", dep), "a job cannot depend on itself")
                elif target is None:
                    close = difflib.get_close_matches(dep, list(tasks), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    self.fail((section, name, "depends_on", dep), f"no service or worker named {dep!r}{hint}")
                elif condition == "healthy" and target.health is None:
                    self.fail((section, name, "depends_on", dep), f"{dep!r} has no health check to wait for")
        cycle = _find_cycle({n: list(t.depends_on) for n, t in tasks.items()})
        if cycle:
            first = tasks[cycle[0]]
            section = "services" if first.kind == "service" else "workers"
            self.fail((section, cycle[0], "depends_on"), "dependency cycle: " + " -> ".join([*cycle, cycle[0]]))


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None
