"""Consul's /v1/acl/* as a Consul agent with ACLs disabled answers it: 401 "ACL support disabled".

The one handler for the whole prefix, so real ACL endpoints replace it in one place; it must never grant anything.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.consul.common import ConsulError

routes = web.RouteTableDef()

# Consul's acl.ErrDisabled text; its HTTP layer answers it with 401, and Go's and Python's clients raise on it.
ACL_DISABLED = "ACL support disabled"


@routes.route("*", "/v1/acl/{tail:.*}")
async def acl_disabled(request: web.Request) -> web.Response:
    raise ConsulError(401, ACL_DISABLED)


@routes.put("/v1/agent/token/{kind:.*}")  # not acl_api's pattern: with --acl its route is mounted first and wins
async def agent_token_disabled(request: web.Request) -> web.Response:
    # Consul's AgentToken answers acl.ErrDisabled before it looks at the kind or the body.
    raise ConsulError(401, ACL_DISABLED)
