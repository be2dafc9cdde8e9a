"""The Access page's writes beyond creating a token: edit and delete tokens, create, edit and delete policies,
for a viewer whose token allows `acl = "write"`.

It calls the same ACLState methods the Consul ACL API handlers call, so the rules and the errors are the API's (a
policy whose rules do not parse is refused with the line, shown in the form with the text kept); it never shows a
token's SecretID and never writes without the session's CSRF token.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.acl.authorizer import ANONYMOUS_TOKEN_ID, MANAGEMENT_POLICY_ID
from shipyard.acl.state import ACLState
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_body
from shipyard.errors import ShipyardError
from shipyard.ui.console import FORM, TEMPLATES, acl_of, check_csrf, flash, render, require, ui_handler

# What the API refuses to delete: the forms offer no Delete for them.
TEMPLATES.globals.update(anonymous_token=ANONYMOUS_TOKEN_ID, builtin_policy=MANAGEMENT_POLICY_ID)
# Fields of a token record that the API's update takes back as they are (an update replaces what it is given).
KEPT_TOKEN_FIELDS = ("Roles", "ServiceIdentities", "NodeIdentities", "TemplatedPolicies", "ExpirationTime")


def _state(request: web.Request) -> ACLState:
    acl = acl_of(platform_of(request))
    if not isinstance(acl, ACLState):
        raise web.HTTPNotFound()
    require(request, "acl", "", "write")
    return acl


def _back_to_access() -> web.Response:
    """After a delete or a token edit the lists change: htmx loads the page again."""
    return web.Response(headers={"HX-Redirect": "/ui/access"})


async def _chosen_policies(request: web.Request) -> list[dict[str, str]]:
    return [{"Name": name} for name in (await request.post()).getall("policy", []) if isinstance(name, str)]


@ui_handler
@accepts_body(FORM)
async def token_update(request: web.Request) -> web.StreamResponse:
    """Description and policies; the token's roles, identities and expiry are sent back unchanged."""
    form = await check_csrf(request)
    acl = _state(request)
    accessor = request.match_info["accessor"]
    try:
        current = await acl.token(accessor)
        if current is None:
            return flash(request, "That token no longer exists (deleted meanwhile): reload the page.", ok=False)
        body = {k: current[k] for k in KEPT_TOKEN_FIELDS if current.get(k)}
        body.update(Description=form.get("description", ""), Policies=await _chosen_policies(request))
        await acl.update_token(accessor, body)
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    return _back_to_access()


@ui_handler
@accepts_body(FORM)
async def token_delete(request: web.Request) -> web.StreamResponse:
    await check_csrf(request)
    acl = _state(request)
    try:
        await acl.delete_token(request.match_info["accessor"])
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    return _back_to_access()


@ui_handler
async def token_form(request: web.Request) -> web.StreamResponse:
    """The edit form of one token, fetched by its Edit button."""
    acl = _state(request)
    token = await acl.token(request.match_info["accessor"])
    if token is None:
        return flash(request, "That token no longer exists (deleted meanwhile): reload the page.", ok=False)
    policies = sorted(await acl.policies(), key=lambda p: p.get("Name", ""))
    return render(request, "token_form.html", {"t": token, "policies": policies})


@ui_handler
async def policy_form(request: web.Request) -> web.StreamResponse:
    """The edit form of one policy (or of a new one: id "new"), fetched by its button."""
    acl = _state(request)
    policy_id = request.match_info["id"]
    policy = {"ID": "", "Name": "", "Description": "", "Rules": ""} if policy_id == "new" else await acl.policy(
        policy_id)
    if policy is None:
        return flash(request, "That policy no longer exists (deleted meanwhile): reload the page.", ok=False)
    return render(request, "policy_form.html", policy_form_context(policy))


def policy_form_context(policy: dict[str, Any], *, error: str = "", line: int | None = None,
                        saved: bool = False) -> dict[str, Any]:
    return {"p": policy, "error": error, "line": line, "saved": saved}


@ui_handler
@accepts_body(FORM)
async def policy_save(request: web.Request) -> web.StreamResponse:
    """Creates (no id) or updates a policy; a refusal (rules that do not parse: the line; a name in use) is shown in
    the form, with what was typed kept."""
    form = await check_csrf(request)
    acl = _state(request)
    policy_id = request.match_info.get("id", "")
    typed = {"ID": policy_id, "Name": form.get("name", "").strip(), "Description": form.get("description", ""),
             "Rules": form.get("rules", "")}
    try:
        if policy_id and await acl.policy(policy_id) is None:
            return flash(request, "That policy no longer exists (deleted meanwhile): reload the page.", ok=False)
        saved = await acl.put_policy({k: v for k, v in typed.items() if k != "ID"}, policy_id)
    except ShipyardError as exc:
        line = exc.detail.get("line") if isinstance(exc.detail, dict) else None
        return render(request, "policy_form.html", policy_form_context(typed, error=exc.message, line=line))
    if not policy_id:
        return _back_to_access()  # a new policy: its own editor and every token form's checkboxes
    return render(request, "policy_form.html", policy_form_context(saved, saved=True))


@ui_handler
@accepts_body(FORM)
async def policy_delete(request: web.Request) -> web.StreamResponse:
    await check_csrf(request)
    acl = _state(request)
    try:
        await acl.delete_policy(request.match_info["id"])
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    return _back_to_access()


def add_access_routes(app: web.Application) -> None:
    app.router.add_get("/ui/access/tokens/{accessor}/edit", token_form)
    app.router.add_get("/ui/access/policies/{id}/edit", policy_form)
    app.router.add_post("/ui/access/tokens/{accessor}", token_update)
    app.router.add_post("/ui/access/tokens/{accessor}/delete", token_delete)
    app.router.add_post("/ui/access/policies", policy_save)
    app.router.add_post("/ui/access/policies/{id}", policy_save)
    app.router.add_post("/ui/access/policies/{id}/delete", policy_delete)
