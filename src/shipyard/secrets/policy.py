"""Vault's ACL policies: the HCL language, path patterns (exact, `*` suffix, `+` segment) and capabilities.

Pure: parses and decides; it never stores a policy or looks at a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import hcl  # type: ignore[import-untyped]

from shipyard.errors import BadRequest

CAPABILITIES = ("create", "read", "update", "patch", "delete", "list", "sudo", "deny")

# Vault's built-in default policy (vault/policy_store.go defaultPolicy), the parts that apply here.
DEFAULT_POLICY = '''# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its resultant ACL from all policies
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}

# Allow a token to look up the creation time and TTL of a given response-wrapping token
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}

# Allow a token to unwrap a response-wrapping token (passed in the body rather than as its own token)
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}
'''


@dataclass(frozen=True)
class Rule:
    pattern: str
    capabilities: frozenset[str]

    @property
    def glob(self) -> bool:
        return self.pattern.endswith("*")

    def matches(self, path: str) -> bool:
        pattern = self.pattern[:-1] if self.glob else self.pattern
        if "+" not in pattern.split("/"):
            return path.startswith(pattern) if self.glob else path == pattern
        regex = "/".join("[^/]+" if part == "+" else re.escape(part) for part in pattern.split("/"))
        return re.fullmatch(regex + (".*" if self.glob else ""), path, re.DOTALL) is not None

    def priority(self) -> tuple[int, int, int, int, str]:
        """Vault's order among matching non-exact patterns (higher wins): later first wildcard, not ending in
        `*`, fewer `+` segments, longer, then lexicographically greater."""
        wildcard_at = min([i for i in (self.pattern.find("+"), self.pattern.find("*")) if i >= 0], default=10**6)
        return (wildcard_at, 0 if self.glob else 1, -self.pattern.split("/").count("+"), len(self.pattern),
                self.pattern)


@dataclass
class Policy:
    name: str
    text: str
    rules: list[Rule] = field(default_factory=list)


def _capabilities(pattern: str, body: Any) -> frozenset[str]:
    if isinstance(body, list):  # the same path twice in one policy: pyhcl gives a list of bodies
        return frozenset().union(*(_capabilities(pattern, item) for item in body))
    if not isinstance(body, dict):
        raise BadRequest(f"failed to parse policy: path {pattern!r}: a block {{...}} is required")
    caps = body.get("capabilities", [])
    if "policy" in body:  # the deprecated `policy = "read"` shorthand
        caps = list(caps) + {"deny": ["deny"], "read": ["read", "list"],
                             "write": ["create", "read", "update", "delete", "list"],
                             "sudo": ["create", "read", "update", "delete", "list", "sudo"]}.get(body["policy"], [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise BadRequest(f"failed to parse policy: path {pattern!r}: capabilities must be a list of strings")
    unknown = [c for c in caps if c not in CAPABILITIES]
    if unknown:
        raise BadRequest(f"failed to parse policy: path {pattern!r}: invalid capability {unknown[0]!r}")
    return frozenset(caps)


def parse_policy(name: str, text: str) -> Policy:
    """HCL (or its JSON form) into rules; errors are 400 with the parser's line and column."""
    try:
        doc = hcl.loads(text)
    except ValueError as exc:
        raise BadRequest(f"failed to parse policy: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("failed to parse policy: expected path blocks")
    unknown = set(doc) - {"path", "name"}
    if unknown:
        raise BadRequest(f"failed to parse policy: invalid key {sorted(unknown)[0]!r}")
    paths = doc.get("path", {})
    if not isinstance(paths, dict):
        raise BadRequest("failed to parse policy: `path` must be followed by a quoted pattern and a block")
    rules = []
    for pattern, body in paths.items():
        if "*" in pattern[:-1]:
            raise BadRequest(f"failed to parse policy: path {pattern!r}: `*` is allowed only at the end")
        rules.append(Rule(pattern.lstrip("/"), _capabilities(pattern, body)))
    return Policy(name, text, rules)


class ACL:
    """The union of a token's policies, answering "which capabilities on this path" as Vault does."""

    def __init__(self, policies: list[Policy], *, root: bool = False) -> None:
        self.root = root
        merged: dict[str, set[str]] = {}
        for policy in policies:
            for rule in policy.rules:
                merged.setdefault(rule.pattern, set()).update(rule.capabilities)
        self.exact = {p: frozenset(c) for p, c in merged.items() if not p.endswith("*") and "+" not in p.split("/")}
        self.patterns = [Rule(p, frozenset(c)) for p, c in merged.items() if p not in self.exact]

    def capabilities(self, path: str) -> frozenset[str]:
        if self.root:
            return frozenset(["root"])
        caps = self.exact.get(path)
        if caps is None:
            matching = [rule for rule in self.patterns if rule.matches(path)]
            caps = max(matching, key=Rule.priority).capabilities if matching else frozenset()
        return frozenset(["deny"]) if "deny" in caps else caps

    def allows(self, path: str, capability: str) -> bool:
        caps = self.capabilities(path)
        return "root" in caps or capability in caps
