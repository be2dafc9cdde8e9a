"""Consul's ACL HTTP API (/v1/acl/... and /v1/agent/token/...) for a server started with --acl: bootstrap, policies,
tokens, roles, in Consul's JSON shapes. Mounted instead of acl.py's "ACL support disabled" handler.

It translates HTTP to ACLState calls; who may call which endpoint is decided by the ACL middleware (api/acl_table.py),
never here, except token/self, whose answer is the caller's own token.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from shipyard.acl.state import ACLState
from shipyard.acl.templates import TEMPLATES, render, template_json, variables_of
from shipyard.acl.token_file import TokenFileError, canonical_kind, read_tokens, write_tokens
from shipyard.api.acl_guard import token_of
from shipyard.api.consul.common import ConsulError
from shipyard.api.context import PLATFORM, platform_of
from shipyard.errors import BadRequest

log = logging.getLogger("shipyard.acl")
routes = web.RouteTableDef()
ACL_STATE = "acl"  # platform.extras key


# Go's encoding/json matches field names case-insensitively, and clients rely on it (py-consul sends "name",
# "rules"): the fields of Consul's ACL bodies, by their lower-case spelling.
_FIELDS = {f.lower(): f for f in (
    "ID", "Name", "Description", "Rules", "Datacenters", "AccessorID", "SecretID", "Policies", "Roles",
    "ServiceIdentities", "NodeIdentities", "ServiceName", "NodeName", "Datacenter", "Local", "ExpirationTime",
    "ExpirationTTL", "Token", "BootstrapSecret", "TemplatedPolicies", "TemplateName", "TemplateVariables")}


def canonical_fields(data: Any) -> Any:
    if isinstance(data, dict):
        return {_FIELDS.get(str(k).lower(), k): canonical_fields(v) for k, v in data.items()}
    if isinstance(data, list):
        return [canonical_fields(v) for v in data]
    return data


def state_of(request: web.Request) -> ACLState:
    state = platform_of(request).extras.get(ACL_STATE)
    assert isinstance(state, ACLState)
    return state


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("Request decode failed: body must be a JSON object")
    return dict(canonical_fields(data))


def _found(record: dict[str, Any] | None, what: str) -> web.Response:
    if record is None:
        # A 404, which Consul's clients read as "no such thing" (py-consul: None).
        raise ConsulError(404, f"ACL not found: Requested {what} does not exist")
    return _json(record)


def _id(request: web.Request) -> str:
    """The {id} of the path, which must be a UUID (Consul's 400 otherwise)."""
    value = request.match_info["id"]
    try:
        uuid.UUID(value)
    except ValueError:
        raise BadRequest(f"Invalid ID: {value!r} is not a UUID") from None
    return value


def _policy_stub(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in policy.items() if k != "Rules"}


# ---- bootstrap -------------------------------------------------------------------------------------------------
@routes.put("/v1/acl/bootstrap")
async def bootstrap(request: web.Request) -> web.Response:
    return _json(await state_of(request).bootstrap())


# ---- policies --------------------------------------------------------------------------------------------------
@routes.put("/v1/acl/policy")
async def policy_create(request: web.Request) -> web.Response:
    body = await _body(request)
    if body.get("ID"):
        raise BadRequest("Cannot specify an ID when creating a policy")
    return _json(await state_of(request).put_policy(body))


@routes.get("/v1/acl/policies")
async def policy_list(request: web.Request) -> web.Response:
    return _json([_policy_stub(p) for p in await state_of(request).policies()])


@routes.get("/v1/acl/policy/name/{name}")
async def policy_by_name(request: web.Request) -> web.Response:
    return _found(await state_of(request).policy_by_name(request.match_info["name"]), "policy")


@routes.get("/v1/acl/policy/{id}")
async def policy_read(request: web.Request) -> web.Response:
    return _found(await state_of(request).policy(_id(request)), "policy")


@routes.put("/v1/acl/policy/{id}")
async def policy_update(request: web.Request) -> web.Response:
    state, policy_id = state_of(request), request.match_info["id"]
    if await state.policy(policy_id) is None:
        raise BadRequest(f"Cannot find policy {policy_id}")
    return _json(await state.put_policy(await _body(request), policy_id))


@routes.delete("/v1/acl/policy/{id}")
async def policy_delete(request: web.Request) -> web.Response:
    await state_of(request).delete_policy(request.match_info["id"])
    return _json(True)


# ---- tokens ----------------------------------------------------------------------------------------------------
@routes.put("/v1/acl/token")
async def token_create(request: web.Request) -> web.Response:
    return _json(await state_of(request).create_token(await _body(request)))


@routes.get("/v1/acl/tokens")
async def token_list(request: web.Request) -> web.Response:
    query = request.query
    tokens = await state_of(request).tokens(query.get("policy", ""), query.get("role", ""),
                                            query.get("servicename", ""))
    return _json(tokens)


@routes.get("/v1/acl/token/self")
async def token_self(request: web.Request) -> web.Response:
    secret = token_of(request)
    if not secret:
        raise ConsulError(403, "ACL not found")
    return _json(await state_of(request).token_by_secret(secret))


@routes.put("/v1/acl/token/{id}/clone")
async def token_clone(request: web.Request) -> web.Response:
    body = await _body(request)
    return _json(await state_of(request).clone_token(request.match_info["id"], body.get("Description")))


@routes.get("/v1/acl/token/{id}")
async def token_read(request: web.Request) -> web.Response:
    token = await state_of(request).token(_id(request))
    if token is None:
        raise ConsulError(403, "ACL not found")  # Consul's acl.ErrNotFound for tokens (policies and roles: 404)
    return _json(token)


@routes.put("/v1/acl/token/{id}")
async def token_update(request: web.Request) -> web.Response:
    body = await _body(request)
    accessor_id = request.match_info["id"]
    if body.get("AccessorID") and body["AccessorID"] != accessor_id:
        raise BadRequest("Token Accessor ID in URL and payload do not match")
    return _json(await state_of(request).update_token(accessor_id, body))


@routes.delete("/v1/acl/token/{id}")
async def token_delete(request: web.Request) -> web.Response:
    await state_of(request).delete_token(request.match_info["id"])
    return _json(True)


# ---- roles -----------------------------------------------------------------------------------------------------
@routes.put("/v1/acl/role")
async def role_create(request: web.Request) -> web.Response:
    body = await _body(request)
    if body.get("ID"):
        raise BadRequest("Cannot specify an ID when creating a role")
    return _json(await state_of(request).put_role(body))


@routes.get("/v1/acl/roles")
async def role_list(request: web.Request) -> web.Response:
    return _json(await state_of(request).roles(request.query.get("policy", "")))


@routes.get("/v1/acl/role/name/{name}")
async def role_by_name(request: web.Request) -> web.Response:
    return _found(await state_of(request).role_by_name(request.match_info["name"]), "role")


@routes.get("/v1/acl/role/{id}")
async def role_read(request: web.Request) -> web.Response:
    return _found(await state_of(request).role(_id(request)), "role")


@routes.put("/v1/acl/role/{id}")
async def role_update(request: web.Request) -> web.Response:
    state, role_id = state_of(request), request.match_info["id"]
    if await state.role(role_id) is None:
        raise BadRequest(f"Cannot find role {role_id}")
    return _json(await state.put_role(await _body(request), role_id))


@routes.delete("/v1/acl/role/{id}")
async def role_delete(request: web.Request) -> web.Response:
    await state_of(request).delete_role(request.match_info["id"])
    return _json(True)


# ---- the agent's own tokens ------------------------------------------------------------------------------------
@routes.put("/v1/agent/token/{kind}")
async def agent_token(request: web.Request) -> web.Response:
    kind = canonical_kind(request.match_info["kind"])
    if kind is None:
        raise ConsulError(404, f"Token {request.match_info['kind']!r} is unknown")
    token = (await _body(request)).get("Token")
    if not isinstance(token, str):
        raise BadRequest("Request decode failed: Token must be a string")
    state = state_of(request)
    state.set_agent_token(kind, token)
    config = platform_of(request).config
    if config.acl_token_persistence and config.data_dir is not None:
        # As Consul: set in memory first, then the file; a failed write is the request's error (500).
        await asyncio.to_thread(write_tokens, config.data_dir, state.api_tokens())
    return web.Response(status=200)


async def load_persisted_tokens(app: web.Application) -> None:
    """At start, with acl.enable_token_persistence: the tokens an earlier run of this data dir was given through
    the API. As in Consul they win over the configuration's, and an unreadable file is a warning, not a dead server."""
    platform = app[PLATFORM]
    state = platform.extras.get(ACL_STATE)
    if not isinstance(state, ACLState) or platform.config.data_dir is None:
        return
    try:
        persisted = await asyncio.to_thread(read_tokens, platform.config.data_dir)
    except TokenFileError as exc:
        log.warning("unable to load persisted tokens: %s", exc)
        return
    for kind, token in persisted.items():
        if state.agent_tokens.get(kind) or (kind == "default" and state.default_token):  # the config's
            log.warning("%r token present in both the configuration and persisted token store, using the persisted "
                        "token", kind)
        state.set_agent_token(kind, token)


# ---- templated policies ----------------------------------------------------------------------------------------
@routes.get("/v1/acl/templated-policies")
async def templated_policy_list(request: web.Request) -> web.Response:
    return _json({name: template_json(name) for name in TEMPLATES})


@routes.get("/v1/acl/templated-policy/name/{name:.+}")
async def templated_policy_read(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in TEMPLATES:
        raise ConsulError(404, f"ACL not found: Requested templated policy {name} does not exist")
    return _json(template_json(name))


@routes.post("/v1/acl/templated-policy/preview/{name:.+}")
async def templated_policy_preview(request: web.Request) -> web.Response:
    """The policy a template renders to with these variables, as Consul shows it (a synthetic policy)."""
    name = request.match_info["name"]
    variables = variables_of(name, await _body(request))
    rules = render(name, variables)
    return _json({"ID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}:{variables}")),
                  "Name": f"synthetic-policy-{uuid.uuid4().hex[:16]}", "Description": f"synthetic policy of {name}",
                  "Rules": rules})


@routes.route("*", "/v1/acl/{tail:.*}")
async def acl_unsupported(request: web.Request) -> web.Response:
    """What Shipyard's ACL system lacks (e.g. /v1/acl/replication, /v1/acl/authorize): Consul's 404 shape."""
    raise ConsulError(404, f"{request.path} is not supported by Shipyard's ACL system")
