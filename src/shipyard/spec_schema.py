"""The JSON Schema of shipyard.yaml, built from the same field lists the validator enforces.

It must never be the validator: editors and tools use it; shipyard.spec stays the authority on what is valid.
"""

from __future__ import annotations

import json
from typing import Any

from shipyard import spec

SCHEMA_ID = "https://shipyard.dev/schema/shipyard.schema.json"
DURATION = {"$ref": "#/$defs/duration"}


def _object(properties: dict[str, Any], fields: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    assert set(properties) == set(fields), set(properties) ^ set(fields)  # the schema may not drift from the parser
    return {"type": "object", "additionalProperties": False,
            "properties": {k: properties[k] for k in fields}, **extra}


def _string_map(key_pattern: str | None = None) -> dict[str, Any]:
    value = {"type": ["string", "number"]}
    if key_pattern:
        return {"type": "object", "propertyNames": {"pattern": key_pattern}, "additionalProperties": value}
    return {"type": "object", "additionalProperties": value}


def _task(fields: tuple[str, ...]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "cmd": {"type": "string", "minLength": 1, "description": "Run via /bin/sh -c."},
        "args": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "Run without a shell."},
        "instances": {"type": "integer", "minimum": 0, "default": 1},
        "env": _string_map(spec.ENV_NAME_RE.pattern),
        "ports": {"oneOf": [
            {"type": "array", "items": {"type": "string", "pattern": spec.PORT_NAME_RE.pattern}},
            {"type": "object", "propertyNames": {"pattern": spec.PORT_NAME_RE.pattern},
             "additionalProperties": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/port"}]}},
        ], "description": "Named ports; dynamic unless static is given."},
        "health": {"$ref": "#/$defs/health"},
        "resources": {"$ref": "#/$defs/resources"},
        "depends_on": {"oneOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "object", "additionalProperties": {"enum": list(spec.DEPENDENCY_CONDITIONS)}},
        ]},
        "update": {"$ref": "#/$defs/update"},
        "restart": {"$ref": "#/$defs/restart"},
        "stop_grace": {**DURATION, "default": "5s", "description": "SIGTERM, then SIGKILL after this long."},
        "workdir": {"type": "string", "description": "Working directory of the command; relative paths are "
                    "resolved against the directory of shipyard.yaml when deployed with `shipyard up`/`deploy`."},
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": _string_map(),
        "routes": {"type": "array", "items": {"type": "object", "minProperties": 1},
                   "description": "Gateway routes; their fields belong to the gateway."},
        "autoscale": {"$ref": "#/$defs/autoscale"},
        "secrets": {**_string_map(spec.ENV_NAME_RE.pattern), "description": "Environment variables read from the "
                    "secrets engine at each start: NAME: engine/path#field (secret/data/app/db#password)."},
        "vault": {"type": "object", "additionalProperties": False, "properties": {
            "policies": {"type": "array", "items": {"type": "string"},
                         "description": "Secrets engine policies of each instance's own token (VAULT_TOKEN)."},
            "change_mode": {"enum": list(spec.CHANGE_MODES), "default": "restart",
                            "description": "When a secret in `secrets` changes: a rolling restart, a signal, nothing."},
            "change_signal": {"type": "string", "default": "SIGHUP",
                              "description": "The signal of change_mode: signal."},
            "files": {**_string_map(spec.SECRET_FILE_RE.pattern), "description": "Files in $SECRETS_DIR (tmpfs, "
                      "0600 in a 0700 folder): name: engine/path#field."},
        }},
        "constraints": {"type": "array", "items": {"$ref": "#/$defs/constraint"},
                        "description": "Nodes the instances may run on (all must hold)."},
        "spread": {"type": "array", "items": {"$ref": "#/$defs/spread"},
                   "description": "Spread instances over the values of a node attribute."},
        "distinct_hosts": {"type": "boolean", "default": False,
                           "description": "At most one instance of this job per node."},
    }
    return _object({k: v for k, v in props.items() if k in fields}, fields,
                   oneOf=[{"required": ["cmd"]}, {"required": ["args"]}])


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) for a shipyard.yaml project file."""
    d_update, d_restart = spec.UpdatePolicy(), spec.RestartPolicy()
    d_autoscale = spec.Autoscale(queue="")
    defs = {
        "duration": {"oneOf": [{"type": "string", "pattern": spec.DURATION_RE.pattern},
                               {"type": "number", "minimum": 0}],
                     "description": 'A duration like "10s", "500ms", "1m30s", or a number of seconds.'},
        "port": _object({"static": {"type": "integer", "minimum": 1, "maximum": 65535}}, spec.PORT_FIELDS),
        "health": _object({
            "http": {"type": "string", "pattern": "^/"},
            "tcp": {"type": "string", "description": "The name of a declared port."},
            "command": {"type": "string"},
            "port": {"type": "string", "description": "http only: the port to probe (default: the first)."},
            "interval": {**DURATION, "default": "10s"},
            "timeout": {**DURATION, "default": "2s"},
            "grace": {**DURATION, "default": "5s"},
            "failures": {"type": "integer", "minimum": 1, "default": 3},
        }, spec.HEALTH_FIELDS, oneOf=[{"required": ["http"]}, {"required": ["tcp"]}, {"required": ["command"]}]),
        "resources": _object({
            "cpu": {"type": "integer", "minimum": 1, "default": spec.Resources().cpu, "description": "MHz"},
            "memory": {"type": "integer", "minimum": 1, "default": spec.Resources().memory, "description": "MB"},
        }, spec.RESOURCE_FIELDS),
        "update": _object({
            "max_parallel": {"type": "integer", "minimum": 1, "default": d_update.max_parallel},
            "min_healthy_time": {**DURATION, "default": d_update.min_healthy_time},
            "healthy_deadline": {**DURATION, "default": d_update.healthy_deadline},
            "auto_revert": {"type": "boolean", "default": d_update.auto_revert},
            "canary": {"type": "integer", "minimum": 0, "default": d_update.canary},
        }, spec.UPDATE_FIELDS),
        "restart": _object({
            "initial": {**DURATION, "default": d_restart.initial},
            "factor": {"type": "number", "minimum": 1, "default": d_restart.factor},
            "max": {**DURATION, "default": d_restart.max},
            "attempts": {"type": ["integer", "null"], "minimum": 0, "description": "null: restart forever"},
            "reset_after": {**DURATION, "default": d_restart.reset_after},
        }, spec.RESTART_FIELDS),
        "autoscale": _object({
            "queue": {"type": "string", "pattern": spec.QUEUE_NAME_RE.pattern,
                      "description": "The bus queue whose depth drives the instance count."},
            "min": {"type": "integer", "minimum": 0, "default": d_autoscale.min},
            "max": {"type": "integer", "minimum": 1, "default": d_autoscale.max},
            "target_depth": {"type": "integer", "minimum": 1, "default": d_autoscale.target_depth,
                             "description": "Waiting messages per instance."},
            "cooldown": {**DURATION, "default": d_autoscale.cooldown,
                         "description": "Time without a scaling change before scaling down."},
        }, spec.AUTOSCALE_FIELDS, required=["queue"],
            description="Workers only: scale on queue depth between min and max instances."),
        "constraint": _object({
            "attribute": {"type": "string", "pattern": spec.ATTRIBUTE_RE.pattern,
                          "description": "${node.unique.name}, ${node.class}, ${node.datacenter}, ${meta.<key>}, "
                                         "${attr.<name>} (kernel.name, kernel.version, cpu.arch, os.name...)."},
            "operator": {"enum": [*spec.CONSTRAINT_OPERATORS, "=="], "default": "="},
            "value": {"type": ["string", "number", "boolean"], "description": "regexp: a regular expression; "
                      "version: a range like \">= 1.2, < 2\"; distinct_property: the most instances per value."},
        }, spec.CONSTRAINT_FIELDS),
        "spread": _object({
            "attribute": {"type": "string", "pattern": spec.ATTRIBUTE_RE.pattern},
            "weight": {"type": "integer", "minimum": 1, "maximum": 100, "default": 100},
            "targets": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
                        "description": "value: percent of the instances; values not listed share the rest."},
        }, spec.SPREAD_FIELDS, required=["attribute"]),
        "service": _task(spec.TASK_FIELDS),
        "worker": _task(spec.WORKER_FIELDS),
    }
    name_pattern = spec.NAME_RE.pattern
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "shipyard.yaml",
        **_object({
            "project": {"type": "string", "pattern": name_pattern},
            "services": {"type": "object", "propertyNames": {"pattern": name_pattern},
                         "additionalProperties": {"$ref": "#/$defs/service"}},
            "workers": {"type": "object", "propertyNames": {"pattern": name_pattern},
                        "additionalProperties": {"$ref": "#/$defs/worker"}},
        }, spec.PROJECT_FIELDS, patternProperties={"^x-": {}}),
        "$defs": defs,
    }


def json_schema_text() -> str:
    """The exact text of docs/shipyard.schema.json."""
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(json_schema_text(), end="")
