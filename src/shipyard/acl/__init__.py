"""Consul's ACL system: the rules language, authorisation decisions, and tokens/policies/roles kept in the store.

Rules and decisions are pure; only the state module reads and writes the store, and nothing here speaks HTTP.
"""

from shipyard.acl.authorizer import (
    ANONYMOUS_TOKEN_ID,
    MANAGEMENT_POLICY_ID,
    ACLNotFound,
    Authorizer,
    PermissionDenied,
    denied_message,
)
from shipyard.acl.rules import DENY, LIST, MANAGEMENT_RULES, READ, WRITE, Rule, RulesError, parse_rules

__all__ = [
    "ANONYMOUS_TOKEN_ID", "DENY", "LIST", "MANAGEMENT_POLICY_ID", "MANAGEMENT_RULES", "READ", "WRITE",
    "ACLNotFound", "Authorizer", "PermissionDenied", "Rule", "RulesError", "denied_message", "parse_rules",
]
