"""Authorisation decisions: an Authorizer answers "may this token do <access> on <resource> <name>?" from the rules
of its policies and the default policy, as Consul's policy authorizer does (exact beats prefix, longest prefix wins,
deny wins ties between policies).

Pure: it never reads the store and never speaks HTTP; the resolver builds Authorizers, the API edge asks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shipyard.acl.rules import DENY, LIST, READ, SCALAR, WRITE, Rule
from shipyard.errors import ShipyardError

ANONYMOUS_TOKEN_ID = "00000000-0000-0000-0000-000000000002"
MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"

# Between two policies' rules for the same thing: deny first, then the widest grant (Consul's takesPrecedenceOver).
_PRECEDENCE = {DENY: 4, WRITE: 3, LIST: 2, READ: 1}
# What each rule's word grants (Consul's enforce): write grants all, list grants list and read.
_GRANTS = {WRITE: {READ, LIST, WRITE}, LIST: {READ, LIST}, READ: {READ}, DENY: set()}


class PermissionDenied(ShipyardError):
    status = 403


class ACLNotFound(ShipyardError):
    """Consul's acl.ErrNotFound: the token sent is unknown (or expired); 403 as Consul answers it."""

    status = 403

    def __init__(self) -> None:
        super().__init__("ACL not found")


def _merge(rules: Iterable[Rule]) -> dict[tuple[str, bool, str], str]:
    merged: dict[tuple[str, bool, str], str] = {}
    for rule in rules:
        key = (rule.resource, rule.prefix, rule.name)
        old = merged.get(key)
        if old is None or _PRECEDENCE[rule.access] > _PRECEDENCE[old]:
            merged[key] = rule.access
    return merged


@dataclass
class Authorizer:
    rules: list[Rule]
    default_allow: bool  # the default policy (allow|deny) for anything no rule names
    management: bool = False  # global-management: everything, whatever the rules say
    accessor_id: str = ANONYMOUS_TOKEN_ID
    _exact: dict[tuple[str, str], str] = field(init=False, repr=False)
    _prefixes: dict[str, list[tuple[str, str]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._exact, self._prefixes = {}, {}
        for (resource, prefix, name), access in _merge(self.rules).items():
            if prefix:
                self._prefixes.setdefault(resource, []).append((name, access))
            else:
                self._exact[(resource, name)] = access
        for entries in self._prefixes.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)  # the longest matching prefix is found first

    def rule_for(self, resource: str, name: str = "") -> str | None:
        """The word of the rule that governs name (exact, else the longest prefix), or None when none does."""
        exact = self._exact.get((resource, name))
        if exact is not None:
            return exact
        for prefix, access in self._prefixes.get(resource, ()):
            if name.startswith(prefix):
                return access
        return None

    def allows(self, resource: str, name: str, access: str) -> bool:
        if self.management:
            return True
        word = self.rule_for(resource, "" if resource in SCALAR else name)
        if word is None:
            # Consul's allow-all default still keeps ACL management for management tokens.
            return self.default_allow and resource != "acl"
        return access in _GRANTS[word]

    def allows_write_prefix(self, resource: str, prefix: str) -> bool:
        """Write on prefix and on everything under it (Consul's KeyWritePrefix: a recursive delete)."""
        if self.management:
            return True
        if not self.allows(resource, prefix, WRITE):
            return False
        under = [a for (r, n), a in self._exact.items() if r == resource and n.startswith(prefix)]
        under += [a for n, a in self._prefixes.get(resource, ()) if n.startswith(prefix)]
        return all(a == WRITE for a in under)

    def require(self, resource: str, name: str, access: str) -> None:
        if not self.allows(resource, name, access):
            raise PermissionDenied(denied_message(self.accessor_id, resource, access, name))

    def require_write_prefix(self, resource: str, prefix: str) -> None:
        if not self.allows_write_prefix(resource, prefix):
            raise PermissionDenied(denied_message(self.accessor_id, resource, WRITE, prefix))


def denied_message(accessor_id: str, resource: str, access: str, name: str) -> str:
    """Consul's PermissionDeniedError text, which its clients and users recognise."""
    who = "anonymous token" if accessor_id == ANONYMOUS_TOKEN_ID else f"token with AccessorID '{accessor_id}'"
    text = f"Permission denied: {who} lacks permission '{resource}:{access}'"
    if name and resource not in SCALAR:
        text += f' on "{name}"'
    if accessor_id == ANONYMOUS_TOKEN_ID:
        text += ". The anonymous token is used implicitly when a request does not specify a token."
    return text
