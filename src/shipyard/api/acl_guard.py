"""The one ACL enforcement point of the control API: a middleware that resolves the request's token, asks the route's
rule (api/acl_table.py) what it needs, refuses with Consul's 403 text, and filters list answers the token may only
partly read (X-Consul-Results-Filtered-By-ACLs).

It decides and filters; it never changes what a handler does, and it never logs a token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader

from shipyard.acl import READ, Authorizer
from shipyard.acl.state import ACLState
from shipyard.api.body import read_limited
from shipyard.api.dns.view import CatalogView, restrict_view
from shipyard.errors import ShipyardError

FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"
AUTHORIZER_KEY = "shipyard_acl_authorizer"
_BODY_KEY = "shipyard_acl_body"
MAX_RULE_BODY = 8 << 20  # the server's own body limit: a rule reads no more than the handler would

Check = tuple[str, str, str]  # (resource, name, access)
# A filter gets the decoded JSON answer and returns (what the token may see, whether anything was dropped).
Filter = Callable[[Authorizer, Any], tuple[Any, bool]]


@dataclass
class Need:
    checks: list[Check] = field(default_factory=list)
    write_prefixes: list[tuple[str, str]] = field(default_factory=list)  # (resource, prefix): recursive deletes
    filter: Filter | None = None


Rule = Callable[[web.Request], Awaitable[Need]]


def token_of(request: web.Request) -> str:
    """X-Consul-Token, then Authorization: Bearer, then ?token= (Consul's order)."""
    token = request.headers.get("X-Consul-Token")
    if token:
        return token.strip()
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token", "")


def authorizer_of(request: web.Request) -> Authorizer | None:
    """The resolved Authorizer of this request (None when ACLs are off), for handlers that must know the caller."""
    value = request.get(AUTHORIZER_KEY)
    return value if isinstance(value, Authorizer) else None


async def buffered_body(request: web.Request) -> bytes:
    """The request body for a rule that must see it, put back so that the handler reads it unchanged."""
    cached = request.get(_BODY_KEY)
    if isinstance(cached, bytes):
        return cached
    raw = await read_limited(request, MAX_RULE_BODY)
    reader = StreamReader(request.protocol, 2**16, loop=asyncio.get_running_loop())
    reader.feed_data(raw)
    reader.feed_eof()
    # aiohttp reads the body from _payload, through `content` (a reify cached in _cache); both now give it again.
    request._payload = reader
    request._cache["content"] = reader
    request[_BODY_KEY] = raw
    return raw


async def body_json(request: web.Request) -> Any:
    """The body as JSON; None when it is not JSON (the handler then answers its own 400)."""
    raw = await buffered_body(request)
    try:
        return orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return None


def keep(authorizer: Authorizer, items: Iterable[Any],
         checks_of: Callable[[Any], list[Check]]) -> tuple[list[Any], bool]:
    """The items every check of which the token passes, and whether any was dropped."""
    items = list(items)
    kept = [i for i in items if all(authorizer.allows(*c) for c in checks_of(i))]
    return kept, len(kept) != len(items)


def _deny_response(request: web.Request, exc: ShipyardError) -> web.StreamResponse:
    if request.path.startswith("/v2/"):
        return web.json_response({"message": exc.message}, status=exc.status)  # Marathon's error shape
    raise exc


def acl_middleware(state: ACLState, rule_for: Callable[[web.Request], Rule | None]) -> Any:
    @web.middleware
    async def enforce_acl(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        rule = rule_for(request)
        if rule is None:
            return await handler(request)
        try:
            authorizer = await state.resolve(token_of(request))
            request[AUTHORIZER_KEY] = authorizer
            need = await rule(request)
            for resource, name, access in need.checks:
                authorizer.require(resource, name, access)
            for resource, prefix in need.write_prefixes:
                authorizer.require_write_prefix(resource, prefix)
        except ShipyardError as exc:
            return _deny_response(request, exc)
        response = await handler(request)
        if need.filter is not None:
            _filter_response(response, need.filter, authorizer)
        return response

    return enforce_acl


def _filter_response(response: web.StreamResponse, keep_only: Filter, authorizer: Authorizer) -> None:
    if not isinstance(response, web.Response) or response.status != 200 or not isinstance(response.body, bytes):
        return
    try:
        data = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return
    visible, dropped = keep_only(authorizer, data)  # a PermissionDenied here (a one-item read) is the answer
    if dropped:
        response.body = orjson.dumps(visible)
        response.headers[FILTERED_HEADER] = "true"


class DnsRestriction:
    """The DNS interface's ACL edge: each catalog view cut down to what the agent's dns token (else the default, else
    the anonymous token) may read, the cut kept while neither the view nor the token's Authorizer changes (so DNS's
    reply cache keeps working). Its version is the ACL state's: a token set through the API re-cuts the next view."""

    def __init__(self, state: ACLState) -> None:
        self.state = state
        self._last: tuple[CatalogView, Authorizer, CatalogView] | None = None

    def version(self) -> int:
        return self.state.generation

    async def __call__(self, view: CatalogView) -> CatalogView:
        try:
            authorizer = await self.state.resolve(self.state.dns_token)  # "": the default token, else anonymous
        except ShipyardError:  # an unknown dns or default token: nothing is readable
            authorizer = Authorizer([], default_allow=False)
        if self._last is not None and self._last[0] is view and self._last[1] is authorizer:
            self._last[2].revision = view.revision
            return self._last[2]
        cut = restrict_view(view, lambda resource, name: authorizer.allows(resource, name, READ))
        self._last = (view, authorizer, cut)
        return cut


def dns_restriction(state: ACLState) -> DnsRestriction:
    return DnsRestriction(state)
