"""Marathon's placement constraints <-> a Shipyard job's placement rules (constraints, spread, distinct_hosts).

Pure translation: it must never read the store or the nodes; the spec validator stays the judge of a rule.

Fields: "hostname" (and "@hostname") is the node's name, ${node.unique.name}; a field written as "${...}" is a
Shipyard node attribute as it is (${attr.kernel.name}, ${node.class}); any other field is an agent attribute in
Mesos terms, which on Shipyard is the node's meta: "rack" is ${meta.rack}.
Operators: UNIQUE (hostname: distinct_hosts; else distinct_property 1), CLUSTER and IS (=), LIKE and UNLIKE (a
regular expression matched against the whole value: regexp / not_regexp "^(?:...)$"), GROUP_BY (an even spread),
MAX_PER n (distinct_property n). Shipyard rules with no Marathon form (version, !=, is_set, spread targets) are
left out of the Marathon view, and an app update that sets constraints replaces all of a job's rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from shipyard.spec import TaskSpec

OPERATORS = ("UNIQUE", "CLUSTER", "IS", "LIKE", "UNLIKE", "GROUP_BY", "MAX_PER")
HOSTNAME = "${node.unique.name}"
WHOLE_RE = re.compile(r"^\^\(\?:(.*)\)\$$", re.DOTALL)  # "^(?:x)$", the form LIKE is stored in


def _attribute(field: str) -> str:
    if field in ("hostname", "@hostname"):
        return HOSTNAME
    if field.startswith("${"):
        return field
    return f"${{meta.{field}}}"


def _field(attribute: str) -> str:
    if attribute in (HOSTNAME, "${node.name}", "${node.unique.id}"):
        return "hostname"
    if attribute.startswith("${meta.") and attribute.endswith("}"):
        return attribute[len("${meta."):-1]
    return attribute


def placement_from_constraints(value: Any, add_problem: Callable[[str, str], None]) -> dict[str, Any]:
    """Marathon's constraints as the spec's {"constraints", "spread", "distinct_hosts"} (each always present)."""
    out: dict[str, Any] = {"constraints": [], "spread": [], "distinct_hosts": False}
    if value is None:
        return out
    if not isinstance(value, list):
        add_problem("/constraints", 'must be a list like [["hostname", "UNIQUE"]]')
        return out
    for i, item in enumerate(value):
        where = f"/constraints({i})"
        if (not isinstance(item, list) or not 2 <= len(item) <= 3 or not all(isinstance(p, str) for p in item)
                or not item[0]):
            add_problem(where, 'must be ["field", "OPERATOR"] or ["field", "OPERATOR", "value"] (strings)')
            continue
        field, operator, arg = item[0], item[1].upper(), (item[2] if len(item) == 3 else None)
        if operator not in OPERATORS:
            add_problem(where, f"unknown operator {item[1]!r} (Shipyard maps: {', '.join(OPERATORS)})")
            continue
        problem = _one(out, _attribute(field), operator, arg)
        if problem:
            add_problem(where, problem)
    return out


def _one(out: dict[str, Any], attribute: str, operator: str, arg: str | None) -> str:
    """Adds one constraint to out; returns why it cannot be mapped ("" when it was)."""
    if operator == "UNIQUE":
        if attribute == HOSTNAME:
            out["distinct_hosts"] = True
        else:
            out["constraints"].append({"attribute": attribute, "operator": "distinct_property", "value": "1"})
        return ""
    if operator == "GROUP_BY":
        out["spread"].append({"attribute": attribute})
        return ""
    if arg is None:
        return f"{operator} needs a value" + (" (CLUSTER without one, 'all on the first value', is not supported)"
                                             if operator == "CLUSTER" else "")
    if operator == "MAX_PER":
        if not arg.isdigit() or int(arg) < 1:
            return "MAX_PER needs a count >= 1"
        out["constraints"].append({"attribute": attribute, "operator": "distinct_property", "value": arg})
    elif operator in ("CLUSTER", "IS"):
        out["constraints"].append({"attribute": attribute, "operator": "=", "value": arg})
    else:
        try:
            re.compile(arg)
        except re.error as exc:
            return f"invalid regular expression: {exc}"
        out["constraints"].append({"attribute": attribute, "operator": "regexp" if operator == "LIKE" else
                                   "not_regexp", "value": f"^(?:{arg})$"})
    return ""


def constraints_of(spec: TaskSpec) -> list[list[str]]:
    """The job's rules that Marathon can express, in Marathon's form."""
    out: list[list[str]] = [["hostname", "UNIQUE"]] if spec.distinct_hosts else []
    for c in spec.constraints:
        field = _field(c.attribute)
        if c.operator == "distinct_hosts":
            out.append(["hostname", "UNIQUE"])
        elif c.operator == "distinct_property":
            out.append([field, "UNIQUE"] if c.value in ("", "1") else [field, "MAX_PER", c.value])
        elif c.operator == "=":
            out.append([field, "CLUSTER", c.value])
        elif c.operator in ("regexp", "not_regexp"):
            whole = WHOLE_RE.match(c.value)
            pattern = whole.group(1) if whole else f".*(?:{c.value}).*"
            out.append([field, "LIKE" if c.operator == "regexp" else "UNLIKE", pattern])
    out += [[_field(s.attribute), "GROUP_BY"] for s in spec.spread]
    return out
