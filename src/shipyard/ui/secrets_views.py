"""The console's Secrets page (/ui/secrets): the secrets engine's KV mounts browsed by prefix with the viewer's own
Vault token (kept in an HttpOnly cookie like the ACL token), and a secret's values revealed on click only.

Every read goes through the engine's own request path (VaultCore.handle: seal, token, policy, audit) with the
viewer's token, so the console can never show more than that token could read over the Vault API. It never holds a
Vault token of its own, never renders a secret value into a page before the click, and never logs a token or value.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from shipyard.acl import PermissionDenied
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_body
from shipyard.api.vault import VaultService
from shipyard.errors import ShipyardError
from shipyard.secrets.barrier import Sealed
from shipyard.secrets.core import VaultCore
from shipyard.secrets.mounts import Mount
from shipyard.secrets.policy import ACL
from shipyard.secrets.request import Missing, Request
from shipyard.secrets.request import PermissionDenied as VaultDenied
from shipyard.secrets.tokens import TokenEntry
from shipyard.ui.console import FORM, VAULT_COOKIE, check_csrf, render, ui_handler

KV_TYPES = ("kv",)


def engine_of(request: web.Request) -> VaultCore | None:
    vault = platform_of(request).extras.get("vault")
    return vault.core if isinstance(vault, VaultService) else None


def vault_token(request: web.Request) -> str:
    return request.cookies.get(VAULT_COOKIE, "")


async def engine_call(core: VaultCore, token: str, operation: str, path: str) -> dict[str, Any] | None:
    """One request through the engine's own checks, as the Vault API would make it for this token."""
    return await core.handle(Request(operation, path, {}, token, remote_address="console"))


# ---- what the token may see ----------------------------------------------------------------------------------


def _rule_paths(acl: ACL) -> list[str]:
    return [*acl.exact, *(rule.pattern for rule in acl.patterns)]


def mount_visible(acl: ACL, mount_path: str) -> bool:
    """Vault's UI rule for listing mounts to a token without sys/mounts: a mount shows when one of the token's
    policy paths lies under it (or covers it), or starts with a `+` segment."""
    if acl.root:
        return True
    for pattern in _rule_paths(acl):
        stem = pattern.rstrip("*")
        if pattern.startswith("+") or stem.startswith(mount_path) or mount_path.startswith(stem):
            return True
    return False


def kv_version(mount: Mount) -> int:
    return 2 if (mount.options or {}).get("version") == "2" else 1


def list_path(mount: Mount, prefix: str) -> str:
    return f"{mount.path}metadata/{prefix}" if kv_version(mount) == 2 else f"{mount.path}{prefix}"


def read_path(mount: Mount, path: str) -> str:
    return f"{mount.path}data/{path}" if kv_version(mount) == 2 else f"{mount.path}{path}"


def crumbs(prefix: str) -> list[dict[str, str]]:
    out, acc = [], ""
    for part in [p for p in prefix.split("/") if p]:
        acc += part + "/"
        out.append({"name": part, "prefix": acc})
    return out


async def _session(core: VaultCore, token: str) -> tuple[TokenEntry | None, ACL | None]:
    entry = await core.tokens.lookup(token) if token else None
    return (entry, await core.acl(entry)) if entry is not None else (None, None)


async def _listing(core: VaultCore, token: str, mount: Mount, prefix: str) -> list[str]:
    """The keys under prefix (folders end with /); [] when there are none; PermissionDenied without `list`."""
    try:
        answer = await engine_call(core, token, "list", list_path(mount, prefix))
    except Missing:
        return []
    except VaultDenied:
        raise PermissionDenied(f"Your Vault token's policies do not allow listing {list_path(mount, prefix)}") \
            from None
    keys = ((answer or {}).get("data") or {}).get("keys") or []
    return sorted(str(k) for k in keys)


def _signed_out(token: str) -> dict[str, Any]:
    """The page without a (valid) Vault token: the form, and why when a kept token stopped working."""
    return {"who": None, "mounts": [], "mount": "", "prefix": "", "crumbs": [], "folders": [], "keys": [],
            "expired": bool(token)}


def _kv_mounts(core: VaultCore, acl: ACL) -> list[Mount]:
    return [m for p, m in sorted(core.mounts.mounts.items()) if m.type in KV_TYPES and mount_visible(acl, p)]


def _chosen_mount(mounts: list[Mount], name: str) -> Mount | None:
    """The mount asked for (a 403 when the token reaches no such KV mount), else the first one."""
    if not name:
        return mounts[0] if mounts else None
    for mount in mounts:
        if mount.path == name:
            return mount
    raise PermissionDenied(f"No KV mount {name} that your Vault token may use")


def folder_prefix(prefix: str) -> str:
    """A prefix as a folder: no leading slash, a trailing one ("app" lists the folder "app/", as Vault does)."""
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


async def secrets_context(core: VaultCore, token: str, mount_name: str, prefix: str) -> dict[str, Any]:
    entry, acl = await _session(core, token)
    if entry is None or acl is None:
        return _signed_out(token)
    mounts = _kv_mounts(core, acl)
    chosen = _chosen_mount(mounts, mount_name)
    prefix = folder_prefix(prefix)
    keys = await _listing(core, token, chosen, prefix) if chosen is not None else []
    return {"who": {"name": entry.display_name, "policies": entry.policies}, "expired": False,
            "mounts": [{"path": m.path, "version": kv_version(m), "description": m.description} for m in mounts],
            "mount": chosen.path if chosen else "", "prefix": prefix, "crumbs": crumbs(prefix),
            "folders": [k for k in keys if k.endswith("/")], "keys": [k for k in keys if not k.endswith("/")]}


def shown_values(data: dict[str, Any]) -> list[tuple[str, str]]:
    """A secret's fields as text: strings as they are, anything else as JSON."""
    return [(str(k), v if isinstance(v, str) else orjson.dumps(v).decode()) for k, v in sorted(data.items())]


async def reveal(core: VaultCore, token: str, mount_name: str, path: str) -> dict[str, Any]:
    mount = core.mounts.mounts.get(mount_name)
    if mount is None or mount.type not in KV_TYPES:
        raise Missing()
    answer = await engine_call(core, token, "read", read_path(mount, path))
    data = (answer or {}).get("data") or {}
    if kv_version(mount) == 2:
        meta = data.get("metadata") or {}
        return {"values": shown_values(data.get("data") or {}), "version": meta.get("version"),
                "created": meta.get("created_time", "")}
    return {"values": shown_values(data), "version": None, "created": ""}


# ---- routes -----------------------------------------------------------------------------------------------------


def _unavailable(core: VaultCore | None) -> str:
    if core is None:
        return "The secrets engine does not run on this server (start it with --vault-port, or use `shipyard up`)."
    if core.barrier.sealed:
        return "The secrets engine is sealed: unseal it (vault operator unseal, or PUT /v1/sys/unseal) first."
    return ""


@ui_handler
async def secrets_page(request: web.Request) -> web.StreamResponse:
    core = engine_of(request)
    context: dict[str, Any] = {"title": "Secrets", "unavailable": _unavailable(core), "who": None,
                               "expired": False, "request_why": request.query.get("why", "")}
    if core is None or context["unavailable"]:
        return render(request, "secrets.html", context)
    try:
        context.update(await secrets_context(core, vault_token(request), request.query.get("mount", ""),
                                             request.query.get("prefix", "")))
    except Sealed:
        context["unavailable"] = _unavailable(core)
    except PermissionDenied:
        raise  # the 403 view
    except ShipyardError as exc:  # a prefix the engine refuses (`..`, control characters): said on the page
        context["unavailable"] = f"{exc.message} (the prefix {request.query.get('prefix', '')!r} is not a path)"
        return render(request, "secrets.html", context, status=exc.status)
    return render(request, "secrets.html", context)


@ui_handler
@accepts_body(FORM)
async def secrets_reveal(request: web.Request) -> web.StreamResponse:
    """A secret's values, answered to the click only (a POST with the session's CSRF token: never prefetched,
    never cached, never triggered by a link); a token without `read` on it gets the 403 view."""
    form = await check_csrf(request)
    core = engine_of(request)
    mount, path = form.get("mount", ""), form.get("path", "")
    if core is None or _unavailable(core):
        raise PermissionDenied(_unavailable(core))
    context: dict[str, Any] = {"mount": mount, "secret_path": path, "denied": "", "missing": False, "values": [],
                               "version": None, "created": ""}
    try:
        context.update(await reveal(core, vault_token(request), mount, path))
    except VaultDenied:
        context["denied"] = f"Your Vault token's policies do not allow reading {mount}{path}."
    except Missing:
        context["missing"] = True
    except ShipyardError as exc:
        context["denied"] = exc.message
    status = 403 if context["denied"] else 200
    if request.headers.get("HX-Request"):  # htmx swaps only 2xx answers: the 403 is the fragment's own text
        return render(request, "secret_value.html", context)
    return render(request, "secret_page.html", {"title": "Secret", **context}, status=status)


@ui_handler
@accepts_body(FORM)
async def secrets_token(request: web.Request) -> web.StreamResponse:
    """Keeps a Vault token for this console session, once the engine knows it (a typo is said at once)."""
    form = await check_csrf(request)
    core, token = engine_of(request), form.get("token", "").strip()
    if core is None or _unavailable(core):
        raise PermissionDenied(_unavailable(core))
    entry, _ = await _session(core, token)
    if entry is None:
        raise web.HTTPSeeOther("/ui/secrets?" + urlencode({"why": "bad"}))
    response = web.HTTPSeeOther("/ui/secrets")
    response.set_cookie(VAULT_COOKIE, token, httponly=True, samesite="Strict", path="/ui/", secure=request.secure)
    raise response


@ui_handler
@accepts_body(FORM)
async def secrets_forget(request: web.Request) -> web.StreamResponse:
    await check_csrf(request)
    response = web.HTTPSeeOther("/ui/secrets")
    response.del_cookie(VAULT_COOKIE, path="/ui/")
    raise response


def add_secrets_routes(app: web.Application) -> None:
    app.router.add_get("/ui/secrets", secrets_page)
    app.router.add_post("/ui/secrets/reveal", secrets_reveal)
    app.router.add_post("/ui/secrets/token", secrets_token)
    app.router.add_post("/ui/secrets/forget", secrets_forget)
