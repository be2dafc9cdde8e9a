"""The web console's HTTP side at /ui/: pages, live fragments (long-polls that answer when what they show changed),
the console's own writes (scale, restart, KV edits with cas, dead-letter retry), login with an ACL token.

It renders what ui/views.py gathers and calls the same service objects the API handlers call; it never reads a token
from anywhere but its own HttpOnly cookie and never accepts a write without the session's CSRF token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from shipyard.acl import ACLNotFound, Authorizer, PermissionDenied
from shipyard.api.consul.acl_api import ACL_STATE
from shipyard.api.context import Platform, platform_of
from shipyard.api.guard import accepts_body
from shipyard.bus import Bus
from shipyard.errors import BadRequest, ShipyardError
from shipyard.scheduler.jobs import JobService
from shipyard.ui import views
from shipyard.ui.gateway_views import gateway_extras

HERE = Path(__file__).parent
COOKIE = "shipyard_ui_token"
VAULT_COOKIE = "shipyard_ui_vault"  # the Secrets page's Vault token (ui/secrets_views.py), same cookie rules
CSRF_HEADER = "X-Shipyard-CSRF"
FORM = "application/x-www-form-urlencoded"
LIVE_WAIT = 25.0  # seconds a live fragment waits for a change before answering unchanged (proxies cut ~30s+)
LIVE_TICK = 2.0  # how often views of what is not in the store (bus depth, logs, gateway counters, CPU) re-render
# The others change only with a store write, which wakes them. The service view shows its instances' CPU and memory.
TICKED_VIEWS = frozenset({"bus", "logs", "gateway", "service"})
SECRET: web.AppKey[bytes] = web.AppKey("ui_csrf_secret", bytes)

TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        undefined=StrictUndefined,  # a name a template uses but no view gives is an error, not ""
                        trim_blocks=True, lstrip_blocks=True)
TEMPLATES.filters["when"] = views.when

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoginNeeded(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


# ---- who is looking ---------------------------------------------------------------------------------------------


def acl_of(platform: Platform) -> Any:
    return platform.extras.get(ACL_STATE)


async def viewer(request: web.Request) -> Authorizer | None:
    """The Authorizer of the cookie's token; None when ACLs are off (no login at all)."""
    acl = acl_of(platform_of(request))
    if acl is None:
        return None
    token = request.cookies.get(COOKIE, "")
    if not token:
        raise LoginNeeded("")
    try:
        authorizer: Authorizer = await acl.resolve(token)
    except ACLNotFound:
        raise LoginNeeded("expired") from None
    return authorizer


def csrf_token(request: web.Request) -> str:
    """Bound to the session's cookie: a page of another origin can neither read it nor send it (a custom header
    needs a CORS preflight, which this server never grants)."""
    return hmac.new(request.app[SECRET], request.cookies.get(COOKIE, "").encode(), hashlib.sha256).hexdigest()


async def check_csrf(request: web.Request) -> dict[str, str]:
    form = {k: str(v) for k, v in (await request.post()).items()}
    sent = request.headers.get(CSRF_HEADER) or form.get("csrf", "")
    if not hmac.compare_digest(sent, csrf_token(request)):
        raise PermissionDenied("the console's form token is missing or stale: reload the page")
    return form


def _login_redirect(request: web.Request, why: str) -> web.StreamResponse:
    target = "/ui/login" + (f"?why={why}" if why else "")
    if request.headers.get("HX-Request"):
        return web.Response(headers={"HX-Redirect": target})
    raise web.HTTPSeeOther(target)


def ui_handler(handler: Handler) -> Handler:
    """Login and 403 handling for every console route."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            request["viewer"] = await viewer(request)
            return await handler(request)
        except LoginNeeded as exc:
            return _login_redirect(request, exc.why)
        except PermissionDenied as exc:
            if request.headers.get("HX-Request"):
                return flash(request, str(exc.message), ok=False)
            return render(request, "denied.html", {"title": "Not allowed", "message": exc.message}, status=403)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    for attr in ("shipyard_body_types",):  # the request guard reads the body types from the routed handler
        if hasattr(handler, attr):
            setattr(wrapped, attr, getattr(handler, attr))
    return wrapped


def auth(request: web.Request) -> Authorizer | None:
    value = request.get("viewer")
    return value if isinstance(value, Authorizer) else None


def require(request: web.Request, resource: str, name: str, access: str) -> None:
    authorizer = auth(request)
    if authorizer is not None:
        authorizer.require(resource, name, access)


# ---- rendering ----------------------------------------------------------------------------------------------------


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    platform = platform_of(request)
    page = TEMPLATES.get_template(template).render(
        **context, csrf=csrf_token(request), acl=acl_of(platform) is not None, node=platform.node.name,
        path=request.path)
    return web.Response(text=page, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": CSP})


# Scripts and styles from the server's own files only (htmx's injected indicator styles are turned off).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def flash(request: web.Request, message: str, *, ok: bool = True) -> web.Response:
    # 200 even for refusals: htmx swaps only 2xx answers, and the message is the answer the user needs.
    return render(request, "flash.html", {"message": message, "ok": ok})


# ---- live fragments -------------------------------------------------------------------------------------------------

Fragment = Callable[[web.Request], Awaitable[tuple[str, dict[str, Any]]]]


async def frag_overview(request: web.Request) -> tuple[str, dict[str, Any]]:
    return "frag_overview.html", await views.overview(platform_of(request), auth(request))


async def frag_service(request: web.Request) -> tuple[str, dict[str, Any]]:
    name = request.query.get("name") or request.match_info.get("name", "")
    require(request, "service", name, "read")
    return "frag_service.html", await views.service(platform_of(request), auth(request), name)


async def frag_gateway(request: web.Request) -> tuple[str, dict[str, Any]]:
    context = await views.gateway(platform_of(request), auth(request))
    return "frag_gateway.html", {**context, **await gateway_extras(request, auth(request))}


async def frag_bus(request: web.Request) -> tuple[str, dict[str, Any]]:
    return "frag_bus.html", await views.bus(platform_of(request), auth(request), request.query.get("queue", ""))


async def frag_logs(request: web.Request) -> tuple[str, dict[str, Any]]:
    alloc, stream, grep = request.query.get("alloc", ""), request.query.get("stream", "stderr"), request.query.get(
        "grep", "")
    job = request.query.get("name", "")
    require(request, "job", job, "read")
    jobs = platform_of(request).jobs
    gone = ""
    if isinstance(jobs, JobService) and alloc:
        try:
            found, _ = await jobs.allocation(alloc)
        except ShipyardError:  # collected since the page was drawn: say so rather than fail the live view
            found, gone = None, f"Instance {alloc} is gone."
        if found is not None and found.job != job:
            raise BadRequest(f"allocation {alloc!r} is not an instance of {job!r}")
    lines = await views.logs(platform_of(request), alloc, stream, grep=grep) if alloc and not gone else []
    return "frag_logs.html", {"lines": lines, "alloc": alloc, "stream": stream, "grep": grep, "gone": gone}


FRAGMENTS: dict[str, Fragment] = {"overview": frag_overview, "service": frag_service, "gateway": frag_gateway,
                                  "bus": frag_bus, "logs": frag_logs}


def _digest(html: str) -> str:
    return hashlib.sha256(html.encode()).hexdigest()[:16]


def live_block(view: str, params: dict[str, str], html: str) -> Markup:
    """The fragment wrapped in the element whose data-live URL console.js long-polls for its next version."""
    query = urlencode({**params, "h": _digest(html)})
    return Markup('<div class="live" id="live-{0}" data-live="/ui/live/{0}?{1}">').format(view, query) + Markup(
        html) + Markup("</div>")


async def fragment_html(request: web.Request, view: str) -> str:
    template, context = await FRAGMENTS[view](request)
    return TEMPLATES.get_template(template).render(**context, csrf=csrf_token(request))


async def wait_for_change(platform: Platform, timeout: float) -> None:
    """Returns at the next store write, or after timeout (whichever is first)."""
    watcher = platform.store.watch("", prefix=True, from_revision=platform.store.revision + 1)
    try:
        await asyncio.wait_for(watcher.__anext__(), timeout)
    except (TimeoutError, StopAsyncIteration, ShipyardError):
        await asyncio.sleep(0)
    finally:
        watcher.cancel()


@ui_handler
async def live(request: web.Request) -> web.StreamResponse:
    """A blocking query over a rendered fragment: answers when it differs from the client's (hash h), or after
    LIVE_WAIT; one request per view however many rows it has."""
    view = request.match_info["view"]
    if view not in FRAGMENTS:
        raise web.HTTPNotFound()
    params = {k: v for k, v in request.query.items() if k != "h"}
    seen = request.query.get("h", "")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIVE_WAIT
    while True:
        html = await fragment_html(request, view)
        gone = request.transport is None or request.transport.is_closing()
        if _digest(html) != seen or loop.time() >= deadline or gone:
            break
        remaining = deadline - loop.time()
        await wait_for_change(platform_of(request), min(LIVE_TICK, remaining) if view in TICKED_VIEWS else remaining)
        await viewer(request)  # a token deleted meanwhile ends the view (to the login page)
    return web.Response(text=str(live_block(view, params, html)), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def live_page(request: web.Request, template: str, view: str, params: dict[str, str],
                    context: dict[str, Any]) -> web.Response:
    html = await fragment_html(request, view)
    return render(request, template, {**context, "live": live_block(view, params, html)})


# ---- pages ------------------------------------------------------------------------------------------------------


@ui_handler
async def overview_page(request: web.Request) -> web.StreamResponse:
    return await live_page(request, "overview.html", "overview", {}, {"title": "Overview"})


@ui_handler
async def service_page(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    require(request, "service", name, "read")
    data = await views.service(platform_of(request), auth(request), name)
    first = next((i["id"] for i in data["instances"] if i["desired"] == "run"), "")
    logs_params = {"name": name, "alloc": first, "stream": "stderr"}
    logs_html = await fragment_html_with(request, "logs", logs_params)
    page = await live_page(request, "service.html", "service", {"name": name},
                           {"title": name, "name": name, "job": data["job"], "instances": data["instances"],
                            "logs": live_block("logs", logs_params, logs_html)})
    return page


async def fragment_html_with(request: web.Request, view: str, params: dict[str, str]) -> str:
    """A fragment for other query parameters than the page's own (the logs panel of a service page)."""
    clone = request.clone(rel_url=request.rel_url.with_query(params))
    clone["viewer"] = request.get("viewer")
    return await fragment_html(clone, view)


@ui_handler
async def gateway_page(request: web.Request) -> web.StreamResponse:
    return await live_page(request, "gateway.html", "gateway", {}, {"title": "Gateway"})


@ui_handler
async def bus_page(request: web.Request) -> web.StreamResponse:
    queue = request.query.get("queue", "")
    return await live_page(request, "bus.html", "bus", {"queue": queue} if queue else {}, {"title": "Bus"})


@ui_handler
async def kv_page(request: web.Request) -> web.StreamResponse:
    prefix, key = request.query.get("prefix", ""), request.query.get("key", "")
    platform = platform_of(request)
    listing = await views.kv_list(platform, auth(request), prefix)
    entry = None
    if key:
        require(request, "key", key, "read")
        entry = await views.kv_entry(platform, key)
    return render(request, "kv.html", {"title": "Key/value", **listing, "key": key, "entry": entry,
                                       "new": "new" in request.query, "saved": False, "conflict": False,
                                       "draft": None})


@ui_handler
async def logs_fragment(request: web.Request) -> web.StreamResponse:
    """The logs panel for another instance, stream or search (its own live block)."""
    params = {k: request.query.get(k, "") for k in ("name", "alloc", "stream", "grep")}
    html = await fragment_html(request, "logs")
    return web.Response(text=str(live_block("logs", params, html)), content_type="text/html")


# ---- writes ------------------------------------------------------------------------------------------------------


def _wake_scheduler(platform: Platform) -> None:
    wake = getattr(platform.scheduler, "wake", None)
    if callable(wake):
        wake()


async def _job_action(platform: Platform, name: str, action: str, form: dict[str, str]) -> str:
    jobs = platform.jobs
    if not isinstance(jobs, JobService):
        raise BadRequest("this server runs no scheduler")
    force = form.get("force") == "1"  # supersede a deployment in progress, as the API's force does
    if action == "scale":
        try:
            count = int(form.get("instances", ""))
        except ValueError:
            raise BadRequest("instances must be a whole number") from None
        await jobs.scale(name, count, force=force)
        message = f"{name}: scaling to {count} instance{'s' if count != 1 else ''}"
    elif action == "restart":
        await jobs.restart(name, force=force)
        message = f"{name}: rolling restart started"
    elif action in ("stop", "rollback"):
        await getattr(jobs, action)(name)
        message = f"{name}: {action} requested"
    elif action == "promote":
        await jobs.promote(name, force=force)
        message = f"{name}: deployment promoted"
    else:
        raise web.HTTPNotFound()
    _wake_scheduler(platform)
    return message


@ui_handler
@accepts_body(FORM)
async def service_action(request: web.Request) -> web.StreamResponse:
    form = await check_csrf(request)
    name, action = request.match_info["name"], request.match_info["action"]
    require(request, "job", name, "write")
    try:
        return flash(request, await _job_action(platform_of(request), name, action, form))
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)


@ui_handler
@accepts_body(FORM)
async def kv_save(request: web.Request) -> web.StreamResponse:
    """Writes with cas=ModifyIndex the editor was opened at (0 for a new key): a key that changed meanwhile is
    a conflict shown with its current value, never a silent overwrite."""
    form = await check_csrf(request)
    key, value = form.get("key", "").lstrip("/"), form.get("value", "")
    require(request, "key", key, "write")
    platform = platform_of(request)
    try:
        cas = int(form.get("cas", "0"))
        applied = await platform.kv.put(key, value.encode(), cas=cas)
    except ValueError:
        return flash(request, "cas must be a number", ok=False)
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    current = await views.kv_entry(platform, key)
    context = {"entry": current, "key": key, "draft": None if applied else value, "saved": applied,
               "conflict": not applied, "new": False}
    return render(request, "kv_editor.html", context)


@ui_handler
@accepts_body(FORM)
async def kv_delete(request: web.Request) -> web.StreamResponse:
    form = await check_csrf(request)
    key = form.get("key", "")
    require(request, "key", key, "write")
    try:
        deleted = await platform_of(request).kv.delete(key, cas=int(form.get("cas", "0")))
    except (ValueError, ShipyardError) as exc:
        return flash(request, getattr(exc, "message", str(exc)), ok=False)
    if not deleted:
        return flash(request, f"{key} changed since you opened it: not deleted; reload to see it", ok=False)
    parent = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    return web.Response(headers={"HX-Redirect": "/ui/kv?" + urlencode({"prefix": parent})})


@ui_handler
@accepts_body(FORM)
async def bus_action(request: web.Request) -> web.StreamResponse:
    form = await check_csrf(request)
    queue, action = request.match_info["queue"], request.match_info["action"]
    require(request, "bus", queue, "write")
    broker = platform_of(request).extras.get("bus")
    if not isinstance(broker, Bus):
        return flash(request, "this server runs no bus", ok=False)
    ids = [form["id"]] if form.get("id") else None
    try:
        if action == "retry":
            count = await broker.retry_dead_letters(queue, ids)
            return flash(request, f"{queue}: {count} dead letter{'s' if count != 1 else ''} back in the queue")
        if action == "purge":
            count = await broker.purge_dead_letters(queue, ids)
            return flash(request, f"{queue}: {count} dead letter{'s' if count != 1 else ''} purged")
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    raise web.HTTPNotFound()


# ---- access (ACL tokens and policies) ---------------------------------------------------------------------------


async def _access_context(request: web.Request) -> dict[str, Any]:
    acl = acl_of(platform_of(request))
    require(request, "acl", "", "read")
    policies = sorted(await acl.policies(), key=lambda p: p.get("Name", ""))
    tokens = sorted(await acl.tokens(), key=lambda t: t.get("Description", ""))
    me = auth(request)
    return {"title": "Access", "off": False, "policies": policies, "tokens": tokens,
            "me": me.accessor_id if me is not None else "",
            "can_write": me is None or me.allows("acl", "", "write")}


@ui_handler
async def access_page(request: web.Request) -> web.StreamResponse:
    if acl_of(platform_of(request)) is None:
        return render(request, "access.html", {"title": "Access", "off": True})
    return render(request, "access.html", await _access_context(request))


@ui_handler
@accepts_body(FORM)
async def access_token_create(request: web.Request) -> web.StreamResponse:
    """A new token with the policies ticked; its SecretID is shown this once (the store keeps only its hash)."""
    form = await check_csrf(request)
    require(request, "acl", "", "write")
    acl = acl_of(platform_of(request))
    if acl is None:
        raise web.HTTPNotFound()
    chosen = [name for name in (await request.post()).getall("policy", []) if isinstance(name, str)]
    try:
        token = await acl.create_token({"Description": form.get("description", ""),
                                        "Policies": [{"Name": name} for name in chosen]})
    except ShipyardError as exc:
        return flash(request, exc.message, ok=False)
    return render(request, "token_created.html", {"token": token})


# ---- login ------------------------------------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    if acl_of(platform_of(request)) is None:
        raise web.HTTPSeeOther("/ui/")
    why = {"expired": "Your token is no longer valid (expired or deleted): log in again.",
           "bad": "That token is not known to this server."}.get(request.query.get("why", ""), "")
    return render(request, "login.html", {"title": "Log in", "message": why})


@accepts_body(FORM)
async def login(request: web.Request) -> web.StreamResponse:
    acl = acl_of(platform_of(request))
    if acl is None:
        raise web.HTTPSeeOther("/ui/")
    form = await check_csrf(request)
    token = form.get("token", "").strip()
    try:
        if not token:
            raise ACLNotFound()
        await acl.resolve(token)
    except ACLNotFound:
        raise web.HTTPSeeOther("/ui/login?why=bad") from None
    response = web.HTTPSeeOther("/ui/")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/ui/", secure=request.secure)
    response.del_cookie(VAULT_COOKIE, path="/ui/")  # a Vault token given in someone else's session is not inherited
    raise response


@accepts_body(FORM)
async def logout(request: web.Request) -> web.StreamResponse:
    await check_csrf(request)
    response = web.HTTPSeeOther("/ui/login")
    response.del_cookie(COOKIE, path="/ui/")
    response.del_cookie(VAULT_COOKIE, path="/ui/")
    raise response


async def to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def add_ui_routes(app: web.Application) -> None:
    """Mounts the console at /ui/ (and / redirecting there)."""
    app[SECRET] = secrets.token_bytes(32)
    app.router.add_get("/", to_console)
    app.router.add_get("/ui", to_console)
    app.router.add_get("/ui/", overview_page)
    app.router.add_get("/ui/services/{name}", service_page)
    app.router.add_post("/ui/services/{name}/{action}", service_action)
    app.router.add_get("/ui/gateway", gateway_page)
    app.router.add_get("/ui/bus", bus_page)
    app.router.add_post("/ui/bus/{queue}/{action}", bus_action)
    app.router.add_get("/ui/kv", kv_page)
    app.router.add_post("/ui/kv", kv_save)
    app.router.add_post("/ui/kv/delete", kv_delete)
    app.router.add_get("/ui/logs", logs_fragment)
    app.router.add_get("/ui/live/{view}", live)
    app.router.add_get("/ui/access", access_page)
    app.router.add_post("/ui/access/tokens", access_token_create)
    app.router.add_get("/ui/login", login_page)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_static("/ui/static/", HERE / "static", append_version=False)
