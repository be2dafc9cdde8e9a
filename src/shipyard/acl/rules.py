"""Consul's ACL rules language (HCL1 or JSON, parsed by pyhcl) turned into typed rules, with Shipyard's own resources.

It owns parsing and validation only: a malformed policy is a RulesError naming its line; it never reads the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import hcl  # type: ignore[import-untyped]

from shipyard.errors import BadRequest

# Access levels in Consul's words; "list" only means something for keys (it grants read too).
DENY, READ, LIST, WRITE = "deny", "read", "list", "write"
POLICY_WORDS = (DENY, READ, LIST, WRITE)

# Resources whose rules name things (exact "key", prefix "key_prefix"). job, bus: Shipyard's (docs/acl.md).
NAMED = ("key", "service", "node", "session", "agent", "event", "query", "job", "bus")
# Resources with one policy word for the whole API they guard. gateway, store: Shipyard's (docs/acl.md).
SCALAR = ("operator", "acl", "keyring", "mesh", "peering", "gateway", "store")
# Fields a named rule block may carry besides policy (Consul's service rules take intentions).
BLOCK_FIELDS = frozenset({"policy", "intentions"})


class RulesError(BadRequest):
    """A policy's rules do not parse or name something Consul's language does not have; 400 with the line."""


@dataclass(frozen=True)
class Rule:
    resource: str  # "key", "service", ... or a SCALAR resource
    name: str  # what the rule names ("" for a scalar resource and for the empty prefix)
    prefix: bool  # key_prefix "a" (True) vs key "a" (False); scalar resources are exact ""
    access: str  # one of POLICY_WORDS


def _line_of(text: str, *needles: str) -> int:
    """The first line where every needle appears (quoted names and policy words), for error messages; 1 if none."""
    for number, line in enumerate(text.splitlines(), 1):
        if all(n in line for n in needles):
            return number
    return 1


def _syntax_error(text: str, exc: Exception) -> RulesError:
    message = str(exc)
    found = re.match(r"Line (\d+), column (\d+): (.*)", message)
    if found:
        line = int(found.group(1))
        return RulesError(f"Failed to parse ACL rules: line {line}: {found.group(3)}", {"line": line})
    line = max(1, len(text.splitlines()))
    return RulesError(f"Failed to parse ACL rules: line {line}: {message}", {"line": line})


def _word(text: str, where: str, value: Any, needle: str) -> str:
    if not isinstance(value, str) or value not in POLICY_WORDS:
        line = _line_of(text, needle, str(value)) if isinstance(value, str) else _line_of(text, needle)
        raise RulesError(f"Failed to parse ACL rules: line {line}: invalid policy {value!r} for {where} "
                         f"(use one of {', '.join(POLICY_WORDS)})", {"line": line})
    return value


def _named_rules(text: str, key: str, body: Any) -> list[Rule]:
    resource, prefix = (key[: -len("_prefix")], True) if key.endswith("_prefix") else (key, False)
    line = _line_of(text, key)
    if not isinstance(body, dict):
        raise RulesError(f"Failed to parse ACL rules: line {line}: {key} must be a block: "
                         f'{key} "name" {{ policy = "read" }}', {"line": line})
    rules = []
    for name, block in body.items():
        where = f'{key} "{name}"'
        if not isinstance(block, dict) or "policy" not in block:
            at = _line_of(text, key, f'"{name}"')
            raise RulesError(f"Failed to parse ACL rules: line {at}: {where} needs a policy", {"line": at})
        unknown = sorted(set(block) - BLOCK_FIELDS)
        if unknown:
            at = _line_of(text, unknown[0])
            raise RulesError(f"Failed to parse ACL rules: line {at}: unknown field {unknown[0]!r} in {where}",
                             {"line": at})
        access = _word(text, where, block["policy"], "policy")
        if "intentions" in block:
            _word(text, where, block["intentions"], "intentions")
        rules.append(Rule(resource, str(name), prefix, access))
    return rules


def parse_rules(text: str) -> list[Rule]:
    """The rules of one policy; RulesError (400) on bad syntax, an unknown resource, or a bad policy word."""
    if not text.strip():
        return []
    try:
        tree = hcl.loads(text)
    except Exception as exc:  # pyhcl raises ValueError, and ply's own errors on some inputs
        raise _syntax_error(text, exc) from None
    if not isinstance(tree, dict):
        raise RulesError("Failed to parse ACL rules: line 1: rules must be an object", {"line": 1})
    rules: list[Rule] = []
    for key, body in tree.items():
        if key in SCALAR:
            rules.append(Rule(key, "", False, _word(text, key, body, key)))
        elif key in NAMED or (key.endswith("_prefix") and key[: -len("_prefix")] in NAMED):
            rules.extend(_named_rules(text, key, body))
        else:
            line = _line_of(text, key)
            raise RulesError(f"Failed to parse ACL rules: line {line}: unknown resource {key!r}", {"line": line})
    return rules


# Consul's builtin global-management policy, with Shipyard's resources added: everything, written.
MANAGEMENT_RULES = "\n".join(
    [f'{r} = "write"' for r in SCALAR] + [f'{r}_prefix "" {{ policy = "write" }}' for r in NAMED]
)
