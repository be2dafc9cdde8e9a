"""Consul's auth method, binding rule, login and logout endpoints (/v1/acl/auth-method(s), /v1/acl/binding-rule(s),
/v1/acl/login, /v1/acl/logout) for a server with --acl; mounted before acl_api's catch-all.

It translates HTTP to AuthMethodStore calls and gives it the ?filter= language for selectors; who may call which
endpoint is the ACL middleware's (acl:read/acl:write; login needs no token, logout the token it ends).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from shipyard.acl.auth_state import AuthMethodStore
from shipyard.api.acl_guard import token_of
from shipyard.api.consul.acl_api import state_of
from shipyard.api.context import platform_of
from shipyard.errors import BadRequest
from shipyard.registry.filter import FilterError, ListOf, MapOf, Schema, compile_filter

routes = web.RouteTableDef()
AUTH_METHODS = "acl-auth-methods"  # platform.extras key
# What a jwt identity offers selectors: value.<ClaimMappings name> and list.<ListClaimMappings name>.
SELECTABLE: dict[str, Schema] = {"value": MapOf("string"), "list": MapOf(ListOf("string"))}
# Go's encoding/json matches top-level field names case-insensitively; nested objects (Config, Meta, BindVars) are
# kept as sent, since their keys are claim names and variables.
_FIELDS = {f.lower(): f for f in (
    "Name", "Type", "DisplayName", "Description", "Config", "MaxTokenTTL", "TokenLocality", "TokenNameFormat", "ID",
    "AuthMethod", "Selector", "BindType", "BindName", "BindVars", "BearerToken", "Meta")}


def check_selector(selector: str) -> None:
    try:
        compile_filter(selector, SELECTABLE)
    except FilterError as exc:
        raise BadRequest(f"invalid Binding Rule: Selector is invalid: {exc}") from None


def selector_matches(selector: str, fields: dict[str, Any]) -> bool:
    """Consul's doesSelectorMatch: a selector that does not compile matches nothing."""
    try:
        return compile_filter(selector, SELECTABLE).matches(fields)
    except FilterError:
        return False


def store_of(request: web.Request) -> AuthMethodStore:
    platform = platform_of(request)
    store = platform.extras.get(AUTH_METHODS)
    if not isinstance(store, AuthMethodStore):
        store = AuthMethodStore(state_of(request), check_selector=check_selector, matches=selector_matches,
                                datacenter=platform.config.datacenter)
        platform.extras[AUTH_METHODS] = store
    return store


async def _body(request: web.Request, what: str) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} decoding failed: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{what} decoding failed: body must be a JSON object")
    return {_FIELDS.get(str(k).lower(), str(k)): v for k, v in data.items()}


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _found(record: dict[str, Any] | None) -> web.Response:
    # Consul writes a bare 404 for a missing auth method or binding rule (py-consul reads it as None).
    return web.Response(status=404) if record is None else _json(record)


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not name:
        raise BadRequest("Missing auth method name")
    return name


# ---- auth methods ----------------------------------------------------------------------------------------------
@routes.get("/v1/acl/auth-methods")
async def method_list(request: web.Request) -> web.Response:
    return _json(await store_of(request).methods())


@routes.put("/v1/acl/auth-method")
async def method_create(request: web.Request) -> web.Response:
    return _json(await store_of(request).put_method(await _body(request, "AuthMethod")))


@routes.get("/v1/acl/auth-method/{name}")
async def method_read(request: web.Request) -> web.Response:
    return _found(await store_of(request).method(_name(request)))


@routes.put("/v1/acl/auth-method/{name}")
async def method_update(request: web.Request) -> web.Response:
    return _json(await store_of(request).put_method(await _body(request, "AuthMethod"), _name(request)))


@routes.delete("/v1/acl/auth-method/{name}")
async def method_delete(request: web.Request) -> web.Response:
    await store_of(request).delete_method(_name(request))
    return _json(True)


# ---- binding rules ---------------------------------------------------------------------------------------------
@routes.get("/v1/acl/binding-rules")
async def rule_list(request: web.Request) -> web.Response:
    return _json(await store_of(request).rules(request.query.get("authmethod", "")))


@routes.put("/v1/acl/binding-rule")
async def rule_create(request: web.Request) -> web.Response:
    body = await _body(request, "BindingRule")
    if body.get("ID"):
        raise BadRequest("BindingRule ID in URL and payload do not match")
    return _json(await store_of(request).put_rule(body))


@routes.get("/v1/acl/binding-rule/{id}")
async def rule_read(request: web.Request) -> web.Response:
    return _found(await store_of(request).rule(request.match_info["id"]))


@routes.put("/v1/acl/binding-rule/{id}")
async def rule_update(request: web.Request) -> web.Response:
    return _json(await store_of(request).put_rule(await _body(request, "BindingRule"), request.match_info["id"]))


@routes.delete("/v1/acl/binding-rule/{id}")
async def rule_delete(request: web.Request) -> web.Response:
    await store_of(request).delete_rule(request.match_info["id"])
    return _json(True)


# ---- login and logout ------------------------------------------------------------------------------------------
@routes.post("/v1/acl/login")
async def login(request: web.Request) -> web.Response:
    return _json(await store_of(request).login(await _body(request, "Login")))


@routes.post("/v1/acl/logout")
async def logout(request: web.Request) -> web.Response:
    await store_of(request).logout(token_of(request))
    return _json(True)

