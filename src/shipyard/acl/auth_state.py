"""Auth methods (acl/auth-methods/<name>) and binding rules (acl/binding-rules/<id>) in the store, and login and
logout: a verified bearer JWT becomes a token of the roles, policies and identities its matching rules bind.

It keeps the records and makes tokens through ACLState; the checks and the binding are auth_methods' (pure). Selector
matching is handed in (the ?filter= language lives in registry/, which acl/ does not import).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson

from shipyard.acl.auth_methods import (
    Bindings,
    LoginFailed,
    bind,
    login_description,
    method_record,
    method_validator,
    public_method,
    rule_record,
)
from shipyard.acl.authorizer import ACLNotFound
from shipyard.acl.state import PREFIX, TOKENS, ACLState
from shipyard.errors import BadRequest, ShipyardError
from shipyard.store.base import Compare, Delete, Put

METHODS, RULES = PREFIX + "auth-methods/", PREFIX + "binding-rules/"
Matches = Callable[[str, dict[str, Any]], bool]


class PermissionDenied(ShipyardError):
    status = 403


class AuthMethodStore:
    def __init__(self, state: ACLState, *, check_selector: Callable[[str], None], matches: Matches,
                 datacenter: str) -> None:
        self.state = state
        self.check_selector = check_selector
        self.matches = matches
        self.datacenter = datacenter

    # ---- auth methods ----------------------------------------------------------------------------------------
    async def method(self, name: str) -> dict[str, Any] | None:
        record = await self.state._read(METHODS + name)
        return None if record is None else public_method(record)

    async def methods(self) -> list[dict[str, Any]]:
        return [public_method(r, stub=True) for r in await self.state._list(METHODS)]

    async def put_method(self, body: dict[str, Any], name: str = "") -> dict[str, Any]:
        if name:
            if body.get("Name") and body["Name"] != name:
                raise BadRequest("AuthMethod Name in URL and payload do not match")
            body = {**body, "Name": name}
        existing = await self.state._read(METHODS + str(body.get("Name") or ""))
        if name and existing is None:
            raise BadRequest(f"Invalid Auth Method: cannot find auth method {name!r} to update")
        record = method_record(body, existing)
        await self.state.store.put(METHODS + record["Name"], orjson.dumps(record))
        found = await self.method(record["Name"])
        assert found is not None
        return found

    async def delete_method(self, name: str) -> None:
        """As Consul: its binding rules and the tokens logged in through it go with it."""
        deletes = [Delete(METHODS + name)]
        deletes += [Delete(RULES + r["ID"]) for r in await self.state._list(RULES) if r["AuthMethod"] == name]
        await self.state.store.txn([], deletes)
        for token in await self.state._list(TOKENS):
            if token.get("AuthMethod") == name:
                await self.state.delete_token(token["AccessorID"])

    # ---- binding rules ---------------------------------------------------------------------------------------
    async def rule(self, rule_id: str) -> dict[str, Any] | None:
        return await self.state._read(RULES + rule_id)

    async def rules(self, method: str = "") -> list[dict[str, Any]]:
        return [r for r in await self.state._list(RULES) if not method or r["AuthMethod"] == method]

    async def put_rule(self, body: dict[str, Any], rule_id: str = "") -> dict[str, Any]:
        if body.get("ID") and rule_id and body["ID"] != rule_id:
            raise BadRequest("BindingRule ID in URL and payload do not match")
        existing = await self.rule(rule_id) if rule_id else None
        if rule_id and existing is None:
            raise BadRequest(f"invalid Binding Rule: cannot find binding rule {rule_id}")
        method_name = body.get("AuthMethod")
        if existing is not None and method_name and method_name != existing["AuthMethod"]:
            raise BadRequest("invalid Binding Rule: the AuthMethod field is immutable")
        method_name = method_name or (existing or {}).get("AuthMethod")
        if not method_name:
            raise BadRequest("invalid Binding Rule: no AuthMethod is set")
        method = await self.state._read(METHODS + str(method_name))
        if method is None:
            raise BadRequest(f"invalid Binding Rule: AuthMethod {method_name!r} does not exist")
        validator = method_validator(method["Type"], method["Config"])
        record = rule_record({**body, "AuthMethod": method_name}, validator, self.check_selector)
        record["ID"] = rule_id or str(uuid.uuid4())
        key = RULES + record["ID"]
        # The method must still be there when the rule lands (a concurrent delete would orphan it).
        done = await self.state.store.txn([Compare(METHODS + str(method_name), "create", ">", 0)],
                                          [Put(key, orjson.dumps(record))])
        if not done.succeeded:
            raise BadRequest(f"invalid Binding Rule: AuthMethod {method_name!r} does not exist")
        stored = await self.rule(record["ID"])
        assert stored is not None
        return stored

    async def delete_rule(self, rule_id: str) -> None:
        await self.state.store.delete(RULES + rule_id)

    # ---- login and logout ------------------------------------------------------------------------------------
    async def login(self, body: dict[str, Any]) -> dict[str, Any]:
        """A token for a verified bearer token, bound by the method's matching rules (Consul's ACL.Login)."""
        name = body.get("AuthMethod")
        if not isinstance(name, str) or not name:
            raise BadRequest("Missing auth method name")
        method = await self.state._read(METHODS + name)
        if method is None:
            raise ACLNotFound()
        validator = method_validator(method["Type"], method["Config"])
        try:
            identity = validator.verify(body.get("BearerToken"))
        except LoginFailed as exc:
            raise PermissionDenied(f"Permission denied: {exc}") from None
        bindings = bind(await self.rules(name), identity, self.matches, self.datacenter)
        links = await self._links(bindings)
        if not (links["Policies"] or links["Roles"] or bindings.service_identities or bindings.node_identities
                or bindings.templated_policies):
            raise PermissionDenied("Permission denied")  # Consul makes no token that could do nothing
        fields = {"Description": login_description(body.get("Meta")), **links,
                  "ServiceIdentities": bindings.service_identities, "NodeIdentities": bindings.node_identities,
                  "TemplatedPolicies": bindings.templated_policies,
                  "Local": method.get("TokenLocality") != "global"}
        if method.get("MaxTokenTTL"):
            fields["ExpirationTTL"] = f"{int(method['MaxTokenTTL'])}s"
        return await self.state.create_token(fields, auth_method=name)

    async def _links(self, bindings: Bindings) -> dict[str, list[dict[str, str]]]:
        """Policies and roles by the names the rules computed; a name that names nothing is left out, as in Consul."""
        policies = [p for p in [await self.state.policy_by_name(n) for n in bindings.policy_names] if p]
        roles = [r for r in [await self.state.role_by_name(n) for n in bindings.role_names] if r]
        return {"Policies": [{"ID": p["ID"]} for p in policies], "Roles": [{"ID": r["ID"]} for r in roles]}

    async def logout(self, secret: str) -> None:
        """Deletes the caller's token if a login made it (Consul's ACL.Logout)."""
        if not secret:
            raise ACLNotFound()
        token = await self.state.token_by_secret(secret)
        if not token.get("AuthMethod"):
            raise PermissionDenied("Permission denied: token wasn't created via login")
        await self.state.delete_token(token["AccessorID"])
