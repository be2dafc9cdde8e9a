"""Maps typed errors to HTTP answers at the edge, and keeps a handler's crash from becoming a hang.

Consul routes answer in Consul's plain-text style; native routes with a JSON error body.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from shipyard.errors import ShipyardError

log = logging.getLogger("shipyard.api")


def _is_consul(request: web.Request) -> bool:
    return request.path.startswith("/v1/")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        unrouted = request.match_info.http_exception is not None
        if unrouted and exc.status == 404 and _is_consul(request):
            return web.Response(status=404, text="404 page not found\n", content_type="text/plain")
        if unrouted and exc.status == 405 and _is_consul(request):
            return web.Response(
                status=405, text=f"method {request.method} not allowed\n", content_type="text/plain"
            )
        if exc.status == 413 and _is_consul(request) and exc.content_type != "text/plain":
            return web.Response(status=413, text="Request body too large\n", content_type="text/plain")
        raise
    except ShipyardError as exc:
        if _is_consul(request):
            return web.Response(status=exc.status, text=exc.message, content_type="text/plain")
        body = orjson.dumps({"error": exc.message, "detail": exc.detail})
        return web.Response(status=exc.status, body=body, content_type="application/json")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _is_consul(request):
            return web.Response(status=500, text="internal server error", content_type="text/plain")
        body = orjson.dumps({"error": "internal server error", "detail": None})
        return web.Response(status=500, body=body, content_type="application/json")
