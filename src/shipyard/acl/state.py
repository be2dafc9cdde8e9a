"""Tokens, policies and roles in the store (under acl/), in Consul's JSON shapes, and the resolver that turns a
SecretID into an Authorizer through a small cache cleared whenever anything under acl/ changes.

SecretIDs are never stored: a token keeps only the SHA-256 of its secret (acl/secrets/<hash> -> AccessorID), so a
stolen data dir or store backup holds no working token. The secret is shown once, by the write that makes it
(create, clone, bootstrap); reads answer "<hidden>", the value Consul itself shows to readers it will not show it to.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from shipyard.acl.authorizer import ANONYMOUS_TOKEN_ID, MANAGEMENT_POLICY_ID, ACLNotFound, Authorizer
from shipyard.acl.rules import MANAGEMENT_RULES, Rule, parse_rules
from shipyard.acl.templates import render, variables_of
from shipyard.errors import BadRequest, ShipyardError
from shipyard.store import Store
from shipyard.store.base import Compare, Put
from shipyard.store.follow import follow_prefix
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.acl")

PREFIX = "acl/"
TOKENS, POLICIES, ROLES, SECRETS = "acl/tokens/", "acl/policies/", "acl/roles/", "acl/secrets/"
BOOTSTRAP_KEY = "acl/bootstrap"
HIDDEN = "<hidden>"  # Consul's redactedToken
CACHE_SIZE = 4096
_INTERNAL = uuid.UUID("6f1c3c2e-8d5a-4b0e-9a57-5f0c2b1d7e11")  # namespace of the internal tokens' IDs
INTERNAL_KEY_FILE = "acl-internal.key"
_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")  # Consul's validPolicyName / validRoleName


class BootstrapDone(ShipyardError):
    status = 403


def secret_hash(secret: str) -> str:
    # Secrets are random UUIDs (122 bits): a plain SHA-256 cannot be reversed, and a key beside it would be stolen
    # with the data dir anyway.
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _hash(record: dict[str, Any]) -> str:
    import base64

    body = {k: v for k, v in record.items() if k not in ("Hash", "CreateIndex", "ModifyIndex", "SecretHash")}
    return base64.b64encode(hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
                                            digest_size=32).digest()).decode()


def service_identity_rules(name: str) -> list[Rule]:
    """Consul's service identity: write its own service (and sidecar), discover everything."""
    return parse_rules(f'service "{name}" {{ policy = "write" }}\nservice "{name}-sidecar-proxy" '
                       '{ policy = "write" }\nservice_prefix "" { policy = "read" }\n'
                       'node_prefix "" { policy = "read" }')


def node_identity_rules(name: str) -> list[Rule]:
    return parse_rules(f'node "{name}" {{ policy = "write" }}\nservice_prefix "" {{ policy = "read" }}')


def derived_secret(key: bytes, name: str) -> str:
    """The SecretID of the internal token `name` under `key`: a UUID, the same for as long as the key is kept."""
    digest = hmac.new(key, name.encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def internal_key(data_dir: str | None) -> bytes:
    """The key internal tokens' secrets are derived from: data_dir/acl-internal.key (0600), made on first use; a
    --dev server (no data dir) keeps one in memory."""
    if data_dir is None:
        return os.urandom(32)
    path = os.path.join(data_dir, INTERNAL_KEY_FILE)
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def service_rules(service: str) -> str:
    """What an instance of a service may do besides its service identity (write itself, read the catalog): read
    its KV prefix (`<service>/`), and use the bus (its queues and topics are named by the application)."""
    return f'key_prefix "{service}/" {{ policy = "read" }}\nbus_prefix "" {{ policy = "write" }}'


GATEWAY_RULES = ('store = "read"\ngateway = "read"\nservice_prefix "" { policy = "read" }\n'
                 'node_prefix "" { policy = "read" }')


def gateway_token_name(node: str) -> str:
    """The internal token of an agent's gateway workers (GATEWAY_RULES), one per node."""
    return f"gateway@{node}"


def _uuid_or_400(value: Any, what: str) -> str:
    """A client-chosen ID, checked to be a UUID and kept as written (Consul compares IDs and secrets as strings)."""
    try:
        uuid.UUID(str(value))
    except ValueError:
        raise BadRequest(f"Invalid {what}: {value!r} is not a UUID") from None
    return str(value)


class ACLState:
    """CRUD of the ACL objects; every write clears the resolver's cache on this server at once."""

    def __init__(self, store: Store, *, default_allow: bool) -> None:
        self.store = store
        self.default_allow = default_allow
        self.default_token = ""  # /v1/agent/token/default: used for requests that send no token
        self.agent_tokens: dict[str, str] = {}  # by Consul's kind (token_file.PERSISTED_KINDS)
        self.tokens_from_api: set[str] = set()  # the kinds set through the API: what token persistence keeps
        self.generation = 0  # bumped by every invalidation: caches of decisions (DNS's cut views) follow it
        self._cache: dict[str, tuple[Authorizer, float]] = {}
        self._follow: asyncio.Task[None] | None = None

    # ---- the agent's own tokens (/v1/agent/token/<kind>) ------------------------------------------------------
    def set_agent_token(self, kind: str, token: str, *, from_api: bool = True) -> None:
        """`kind` is canonical (token_file.canonical_kind). The default token answers requests that send none; the
        dns token answers the DNS interface (else the default token does, as in Consul)."""
        self.agent_tokens[kind] = token
        if from_api:
            self.tokens_from_api.add(kind)
        if kind == "default":
            self.default_token = token
        self.invalidate()

    def api_tokens(self) -> dict[str, str]:
        return {kind: self.agent_tokens[kind] for kind in self.tokens_from_api if self.agent_tokens.get(kind)}

    @property
    def dns_token(self) -> str:
        """The SecretID DNS answers as ("": the default token, else anonymous)."""
        return self.agent_tokens.get("dns", "")

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, initial_management: str = "") -> None:
        await self._ensure_builtins()
        if initial_management:
            await self._ensure_management_token(initial_management)
        self._follow = asyncio.create_task(
            follow_prefix(self.store, PREFIX, lambda _events: self.invalidate(), self._resync, name="acl"))

    async def stop(self) -> None:
        await cancel_and_wait(self._follow)

    async def _resync(self) -> int:
        self.invalidate()
        return self.store.revision

    def invalidate(self) -> None:
        self._cache.clear()
        self.generation += 1

    async def _create_if_absent(self, key: str, record: dict[str, Any]) -> None:
        await self.store.txn([Compare(key, "create", "=", 0)], [Put(key, orjson.dumps(record))])

    async def _ensure_builtins(self) -> None:
        policy = {"ID": MANAGEMENT_POLICY_ID, "Name": "global-management",
                  "Description": "Builtin Policy that grants unlimited access", "Rules": MANAGEMENT_RULES,
                  "Datacenters": None}
        policy["Hash"] = _hash(policy)
        await self._create_if_absent(POLICIES + MANAGEMENT_POLICY_ID, policy)
        anonymous = {"AccessorID": ANONYMOUS_TOKEN_ID, "Description": "Anonymous Token", "Policies": [],
                     "Roles": [], "ServiceIdentities": [], "NodeIdentities": [], "Local": False,
                     "CreateTime": _now(), "SecretHash": secret_hash("anonymous")}
        anonymous["Hash"] = _hash(anonymous)
        await self._create_if_absent(TOKENS + ANONYMOUS_TOKEN_ID, anonymous)

    async def _ensure_management_token(self, secret: str) -> None:
        # As in Consul, a configured initial management token means the ACL system is bootstrapped.
        await self.store.txn([Compare(BOOTSTRAP_KEY, "create", "=", 0)], [Put(BOOTSTRAP_KEY, b"initial")])
        if await self.store.get(SECRETS + secret_hash(secret)) is not None:
            return
        await self._put_token(self._new_token({"Description": "Initial Management Token",
                                               "Policies": [{"ID": MANAGEMENT_POLICY_ID}]}, secret))

    # ---- reads -----------------------------------------------------------------------------------------------
    async def _read(self, key: str) -> dict[str, Any] | None:
        kv = await self.store.get(key)
        if kv is None:
            return None
        record: dict[str, Any] = orjson.loads(kv.value)
        record.setdefault("CreateIndex", kv.create_revision)
        record["ModifyIndex"] = kv.mod_revision
        return record

    async def _list(self, prefix: str) -> list[dict[str, Any]]:
        result = await self.store.range(prefix, prefix=True)
        out = []
        for kv in result.kvs:
            record = orjson.loads(kv.value)
            record.setdefault("CreateIndex", kv.create_revision)
            record["ModifyIndex"] = kv.mod_revision
            out.append(record)
        return out

    async def policy(self, policy_id: str) -> dict[str, Any] | None:
        return await self._read(POLICIES + policy_id)

    async def policy_by_name(self, name: str) -> dict[str, Any] | None:
        return next((p for p in await self._list(POLICIES) if p["Name"] == name), None)

    async def policies(self) -> list[dict[str, Any]]:
        return await self._list(POLICIES)

    async def role(self, role_id: str) -> dict[str, Any] | None:
        role = await self._read(ROLES + role_id)
        return None if role is None else await self._named_links(role)

    async def role_by_name(self, name: str) -> dict[str, Any] | None:
        found = next((r for r in await self._list(ROLES) if r["Name"] == name), None)
        return None if found is None else await self._named_links(found)

    async def roles(self, policy: str = "") -> list[dict[str, Any]]:
        roles = [await self._named_links(r) for r in await self._list(ROLES)]
        return [r for r in roles if not policy or any(p["ID"] == policy for p in r["Policies"])]

    async def token(self, accessor_id: str) -> dict[str, Any] | None:
        token = await self._read(TOKENS + accessor_id)
        return None if token is None else await self._public_token(token)

    async def token_by_secret(self, secret: str) -> dict[str, Any]:
        accessor = await self.store.get(SECRETS + secret_hash(secret))
        token = None if accessor is None else await self._read(TOKENS + accessor.value.decode())
        if token is None or _expired(token):
            raise ACLNotFound()
        return await self._public_token(token, secret)

    async def tokens(self, policy: str = "", role: str = "", service: str = "") -> list[dict[str, Any]]:
        out = []
        for token in await self._list(TOKENS):
            public = await self._public_token(token)
            if policy and not any(p["ID"] == policy for p in public["Policies"]):
                continue
            if role and not any(r["ID"] == role for r in public["Roles"]):
                continue
            if service and not any(s["ServiceName"] == service for s in public["ServiceIdentities"]):
                continue
            out.append(public)
        return out

    async def _named_links(self, record: dict[str, Any]) -> dict[str, Any]:
        """Policy and role links carry the current names (a rename shows everywhere), dangling ones dropped."""
        record = dict(record)
        policies = []
        for link in record.get("Policies") or []:
            policy = await self.policy(link["ID"])
            if policy is not None:
                policies.append({"ID": policy["ID"], "Name": policy["Name"]})
        record["Policies"] = policies
        if "Roles" in record:
            roles = []
            for link in record.get("Roles") or []:
                role = await self._read(ROLES + link["ID"])
                if role is not None:
                    roles.append({"ID": role["ID"], "Name": role["Name"]})
            record["Roles"] = roles
        return record

    async def _public_token(self, token: dict[str, Any], secret: str = HIDDEN) -> dict[str, Any]:
        public = await self._named_links({k: v for k, v in token.items() if k != "SecretHash"})
        public["SecretID"] = "anonymous" if token["AccessorID"] == ANONYMOUS_TOKEN_ID else secret
        return public

    # ---- writes ----------------------------------------------------------------------------------------------
    async def _links(self, links: Any, kind: str) -> list[dict[str, str]]:
        """Token/role links given by ID or Name, resolved to IDs; an unknown one is a 400 as in Consul."""
        if links is None:
            return []
        if not isinstance(links, list) or not all(isinstance(x, dict) for x in links):
            raise BadRequest(f"{kind}s must be a list of objects with ID or Name")
        out = []
        for link in links:
            if link.get("ID"):
                found = await (self.policy(link["ID"]) if kind == "Policy" else self._read(ROLES + link["ID"]))
                what = f"ID {link['ID']}"
            else:
                found = await (self.policy_by_name(str(link.get("Name"))) if kind == "Policy"
                               else self.role_by_name(str(link.get("Name"))))
                what = f"name {link.get('Name')}"
            if found is None:
                raise BadRequest(f"No such ACL {kind.lower()} with {what}")
            out.append({"ID": found["ID"], "Name": found["Name"]})
        return out

    def _new_token(self, body: dict[str, Any], secret: str) -> dict[str, Any]:
        token = {"AccessorID": str(uuid.uuid4()), "SecretHash": secret_hash(secret),
                 "Description": str(body.get("Description") or ""), "Policies": body.get("Policies") or [],
                 "Roles": body.get("Roles") or [], "ServiceIdentities": body.get("ServiceIdentities") or [],
                 "NodeIdentities": body.get("NodeIdentities") or [], "Local": bool(body.get("Local")),
                 "CreateTime": _now()}
        if body.get("ExpirationTime"):
            token["ExpirationTime"] = body["ExpirationTime"]
        if body.get("TemplatedPolicies"):
            token["TemplatedPolicies"] = body["TemplatedPolicies"]
        return token

    async def _put_token(self, token: dict[str, Any], *, new_secret: bool = True) -> None:
        token["Hash"] = _hash(token)
        puts = [Put(TOKENS + token["AccessorID"], orjson.dumps(token))]
        if new_secret:
            puts.append(Put(SECRETS + token["SecretHash"], token["AccessorID"].encode()))
        await self.store.txn([], puts)
        self.invalidate()

    async def _token_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = {"Description": body.get("Description") or "",
                  "Policies": await self._links(body.get("Policies"), "Policy"),
                  "Roles": await self._links(body.get("Roles"), "Role"),
                  "ServiceIdentities": _service_identities(body.get("ServiceIdentities")),
                  "NodeIdentities": body.get("NodeIdentities") or [],
                  "TemplatedPolicies": _templated(body.get("TemplatedPolicies"))}
        ttl = body.get("ExpirationTTL")
        if ttl:
            seconds = _duration(ttl)
            fields["ExpirationTime"] = datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()
        elif body.get("ExpirationTime"):
            fields["ExpirationTime"] = body["ExpirationTime"]
        return fields

    async def create_token(self, body: dict[str, Any], *, auth_method: str = "") -> dict[str, Any]:
        """`auth_method`: the token a login through that method makes (only login sets it, as in Consul)."""
        secret = _uuid_or_400(body["SecretID"], "SecretID") if body.get("SecretID") else str(uuid.uuid4())
        if await self.store.get(SECRETS + secret_hash(secret)) is not None:
            raise BadRequest("Invalid Token: SecretID is already in use")
        token = self._new_token(await self._token_fields(body), secret)
        if body.get("AccessorID"):
            token["AccessorID"] = _uuid_or_400(body["AccessorID"], "AccessorID")
            if await self.store.get(TOKENS + token["AccessorID"]) is not None:
                raise BadRequest("Invalid Token: AccessorID is already in use")
        token["Local"] = bool(body.get("Local"))
        if auth_method:
            token["AuthMethod"] = auth_method
        await self._put_token(token)
        created = await self._read(TOKENS + token["AccessorID"])
        assert created is not None
        return await self._public_token(created, secret)

    async def update_token(self, accessor_id: str, body: dict[str, Any]) -> dict[str, Any]:
        token = await self._read(TOKENS + _uuid_or_400(accessor_id, "AccessorID"))
        if token is None:
            raise ACLNotFound()
        token.update(await self._token_fields(body))
        token.pop("ModifyIndex", None)
        await self._put_token(token, new_secret=False)
        updated = await self.token(accessor_id)
        assert updated is not None
        return updated

    async def clone_token(self, accessor_id: str, description: str | None) -> dict[str, Any]:
        token = await self._read(TOKENS + _uuid_or_400(accessor_id, "AccessorID"))
        if token is None or accessor_id == ANONYMOUS_TOKEN_ID:
            raise ACLNotFound()
        body = {**token, "Description": token["Description"] if description is None else description}
        return await self.create_token({k: v for k, v in body.items() if k not in ("AccessorID", "SecretHash")})

    async def delete_token(self, accessor_id: str) -> None:
        if accessor_id == ANONYMOUS_TOKEN_ID:
            raise BadRequest("Delete operation not permitted on the anonymous token")
        token = await self._read(TOKENS + accessor_id)
        if token is not None:
            await self.store.delete(SECRETS + token["SecretHash"])
            await self.store.delete(TOKENS + accessor_id)
        self.invalidate()

    async def bootstrap(self) -> dict[str, Any]:
        # Consul's text; its clients read the reset index out of it.
        done = "Permission denied: ACL bootstrap no longer allowed (reset index: {})"
        marker = await self.store.get(BOOTSTRAP_KEY)
        if marker is not None:
            raise BootstrapDone(done.format(marker.mod_revision))
        result = await self.store.txn([Compare(BOOTSTRAP_KEY, "create", "=", 0)], [Put(BOOTSTRAP_KEY, b"1")])
        if not result.succeeded:
            raise BootstrapDone(done.format(result.revision))
        return await self.create_token({"Description": "Bootstrap Token (Global Management)",
                                        "Policies": [{"ID": MANAGEMENT_POLICY_ID}]})

    async def _unique_name(self, prefix: str, name: Any, own_id: str, kind: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest(f"Invalid {kind} Name: {name!r} (letters, digits, '-' and '_', at most 128)")
        for record in await self._list(prefix):
            if record["Name"] == name and record["ID"] != own_id:
                raise BadRequest(f"Invalid {kind}: A {kind} with Name {name!r} already exists")
        return name

    async def put_policy(self, body: dict[str, Any], policy_id: str = "") -> dict[str, Any]:
        policy_id = policy_id or str(uuid.uuid4())
        if policy_id == MANAGEMENT_POLICY_ID:
            old = await self.policy(policy_id)
            if old is not None and body.get("Rules", old["Rules"]) != old["Rules"]:
                raise BadRequest("Changing the Rules for the builtin global-management policy is not permitted")
        rules = body.get("Rules") or ""
        if not isinstance(rules, str):
            raise BadRequest("Rules must be a string of HCL or JSON")
        parse_rules(rules)  # a RulesError (400, with the line) before anything is written
        policy = {"ID": policy_id,
                  "Name": await self._unique_name(POLICIES, body.get("Name"), policy_id, "Policy"),
                  "Description": str(body.get("Description") or ""), "Rules": rules,
                  "Datacenters": body.get("Datacenters")}
        policy["Hash"] = _hash(policy)
        await self.store.put(POLICIES + policy_id, orjson.dumps(policy))
        self.invalidate()
        stored = await self.policy(policy_id)
        assert stored is not None
        return stored

    async def delete_policy(self, policy_id: str) -> None:
        if policy_id == MANAGEMENT_POLICY_ID:
            raise BadRequest("Delete operation not permitted on the builtin global-management policy")
        await self.store.delete(POLICIES + policy_id)
        self.invalidate()

    async def put_role(self, body: dict[str, Any], role_id: str = "") -> dict[str, Any]:
        role_id = role_id or str(uuid.uuid4())
        role = {"ID": role_id, "Name": await self._unique_name(ROLES, body.get("Name"), role_id, "Role"),
                "Description": str(body.get("Description") or ""),
                "Policies": await self._links(body.get("Policies"), "Policy"),
                "ServiceIdentities": _service_identities(body.get("ServiceIdentities")),
                "NodeIdentities": body.get("NodeIdentities") or [],
                "TemplatedPolicies": _templated(body.get("TemplatedPolicies"))}
        role["Hash"] = _hash(role)
        await self.store.put(ROLES + role_id, orjson.dumps(role))
        self.invalidate()
        stored = await self.role(role_id)
        assert stored is not None
        return stored

    async def delete_role(self, role_id: str) -> None:
        await self.store.delete(ROLES + role_id)
        self.invalidate()

    # ---- tokens of the platform's own processes ----------------------------------------------------------------
    async def internal_token(self, key: bytes, name: str, rules: str, *, service: str = "") -> str:
        """The SecretID of the token `name` (e.g. "gateway", "service:web") with these rules (and the service
        identity of `service`): derived from the key, so the same across restarts, so that instances adopted by
        the next server keep working; written to the store only when it changed."""
        secret = derived_secret(key, name)
        await self.internal_token_with(secret, name, rules, service=service)
        return secret

    async def internal_token_with(self, secret: str, name: str, rules: str, *, service: str = "") -> None:
        """The token `name` with these rules (and `service`'s identity) holds `secret` (given by its holder: a
        `shipyard agent` derives its instances' tokens from its own key); refused when another token holds it."""
        accessor = str(uuid.uuid5(_INTERNAL, "token:" + name))
        policy_id = str(uuid.uuid5(_INTERNAL, "policy:" + name))
        policy_name = "shipyard-" + re.sub(r"[^A-Za-z0-9\-_]", "-", name)
        existing = await self.policy(policy_id)
        if existing is None or existing["Rules"] != rules:
            await self.put_policy({"Name": policy_name, "Description": f"Shipyard's own {name}", "Rules": rules},
                                  policy_id)
        holder = await self.store.get(SECRETS + secret_hash(secret))
        if holder is not None and holder.value.decode() != accessor:
            raise ShipyardError("this SecretID belongs to another token", status=409)
        token = await self._read(TOKENS + accessor)
        if token is None or token["SecretHash"] != secret_hash(secret) or token.get("ShipyardService") != service:
            if token is not None:
                await self.store.delete(SECRETS + token["SecretHash"])
            fresh = self._new_token({"Description": f"Shipyard's own {name}", "Policies": [{"ID": policy_id}],
                                     "ServiceIdentities": [{"ServiceName": service}] if service else []}, secret)
            fresh["AccessorID"] = accessor
            fresh["ShipyardService"] = service  # its instances also get the operator's policy service-<name>
            await self._put_token(fresh)

    async def delete_internal_token(self, name: str) -> None:
        """The token `name` and its policy are gone (its secret no longer resolves)."""
        await self.delete_token(str(uuid.uuid5(_INTERNAL, "token:" + name)))
        await self.delete_policy(str(uuid.uuid5(_INTERNAL, "policy:" + name)))

    # ---- resolution ------------------------------------------------------------------------------------------
    async def resolve(self, secret: str) -> Authorizer:
        """The Authorizer of the token whose SecretID this is ("" -> the default token or anonymous)."""
        secret = secret or self.default_token or "anonymous"
        cached = self._cache.get(secret)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        authorizer, expires = await self._build(secret)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[secret] = (authorizer, expires)
        return authorizer

    async def _build(self, secret: str) -> tuple[Authorizer, float]:
        if secret == "anonymous":
            token = await self._read(TOKENS + ANONYMOUS_TOKEN_ID)
        else:
            accessor = await self.store.get(SECRETS + secret_hash(secret))
            token = None if accessor is None else await self._read(TOKENS + accessor.value.decode())
        if token is None or _expired(token):
            raise ACLNotFound()
        rules, management = await self._token_rules(token)
        expires = _expiry(token)
        return Authorizer(rules, self.default_allow, management, token["AccessorID"]), expires

    async def _token_rules(self, token: dict[str, Any]) -> tuple[list[Rule], bool]:
        policy_ids = [p["ID"] for p in token.get("Policies") or []]
        rules: list[Rule] = []
        for link in token.get("Roles") or []:
            role = await self._read(ROLES + link["ID"])
            if role is not None:
                policy_ids += [p["ID"] for p in role.get("Policies") or []]
                rules += _identity_rules(role)
        rules += _identity_rules(token)
        if token.get("ShipyardService"):
            # What the operator grants a service's instances beyond the defaults: the policy named service-<name>.
            extra = await self.policy_by_name(f"service-{token['ShipyardService']}")
            policy_ids += [extra["ID"]] if extra is not None else []
        for policy_id in dict.fromkeys(policy_ids):
            policy = await self.policy(policy_id)
            if policy is not None:
                rules += parse_rules(policy["Rules"])
        return rules, MANAGEMENT_POLICY_ID in policy_ids


def _identity_rules(record: dict[str, Any]) -> list[Rule]:
    rules: list[Rule] = []
    for identity in record.get("ServiceIdentities") or []:
        rules += service_identity_rules(identity["ServiceName"])
    for identity in record.get("NodeIdentities") or []:
        rules += node_identity_rules(identity["NodeName"])
    for entry in record.get("TemplatedPolicies") or []:
        rules += parse_rules(render(entry["TemplateName"], entry.get("TemplateVariables") or {}))
    return rules


def _templated(value: Any) -> list[dict[str, Any]]:
    """Consul's TemplatedPolicies: [{TemplateName, TemplateVariables: {name}}], checked against the builtins."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise BadRequest("TemplatedPolicies must be a list of objects with TemplateName")
    return [{"TemplateName": str(x.get("TemplateName")),
             "TemplateVariables": variables_of(str(x.get("TemplateName")), x.get("TemplateVariables"))}
            for x in value]


def _service_identities(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) and isinstance(x.get("ServiceName"), str)
                                              for x in value):
        raise BadRequest("ServiceIdentities must be a list of objects with ServiceName")
    for identity in value:
        if not re.match(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$", identity["ServiceName"]):
            raise BadRequest(f"Service identity {identity['ServiceName']!r} has an invalid name")
    return value


def _duration(value: Any) -> float:
    """Go durations as Consul takes them ("10m", "1h30m", "90s"), or nanoseconds as a number."""
    if isinstance(value, int | float):
        return value / 1e9
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", str(value))
    if not parts or "".join(a + b for a, b in parts) != str(value):
        raise BadRequest(f"Invalid ExpirationTTL {value!r}")
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(a) * scale[b] for a, b in parts)


def _expiry(token: dict[str, Any]) -> float:
    raw = token.get("ExpirationTime")
    if not raw:
        return float("inf")
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")


def _expired(token: dict[str, Any]) -> bool:
    return _expiry(token) <= time.time()
