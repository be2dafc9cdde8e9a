"""The Marathon-compatible HTTP API: /v2 (apps, tasks, deployments, groups, queue, events, info...), /ping, /metrics.

Mounts the routes as a /v2 sub-application whose errors take Marathon's JSON shape; it holds no logic itself.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from shipyard.api.context import PLATFORM
from shipyard.api.marathon import cluster, endpoints, events
from shipyard.api.marathon.apps import AppInvalid
from shipyard.errors import Conflict, ShipyardError

log = logging.getLogger("shipyard.marathon")


def marathon_error(status: int, message: str, **extra: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"message": message, **extra}),
                        content_type="application/json")


def invalid_message(exc: AppInvalid) -> str:
    """Marathon's "Object is not valid", naming the fields Shipyard does not support when those are the reason."""
    unsupported = sorted({d["path"].strip("/") for d in exc.details
                          if any("is not supported by Shipyard" in e for e in d["errors"])})
    if not unsupported:
        return "Object is not valid"
    return f"Object is not valid: not supported by Shipyard: {', '.join(unsupported)} (see details for why)"


@web.middleware
async def marathon_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Marathon's error bodies: {"message": ...}; 422 adds details; a 409 for a busy app names deployments."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return marathon_error(exc.status, f"HTTP {exc.status} {exc.reason}")
    except AppInvalid as exc:
        return marathon_error(422, invalid_message(exc), details=exc.details)
    except Conflict as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        deployment = detail.get("deployment") or detail.get("active_deployment")
        if deployment:
            return marathon_error(409, f"App is locked by one or more deployments. Override with the option "
                                       f"'?force=true'. View details at '/v2/deployments/<DEPLOYMENT_ID>'. "
                                       f"({exc.message})", deployments=[{"id": deployment}])
        return marathon_error(409, exc.message)
    except ShipyardError as exc:
        extra = {"details": exc.detail} if isinstance(exc.detail, list) else {}
        return marathon_error(exc.status, exc.message, **extra)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return marathon_error(500, "internal server error")


def add_marathon_routes(app: web.Application) -> None:
    v2 = web.Application(middlewares=[marathon_errors], client_max_size=app._client_max_size)
    v2[PLATFORM] = app[PLATFORM]
    v2.router.add_routes(events.routes)
    v2.router.add_routes(endpoints.routes)
    v2.router.add_routes(cluster.routes)
    app.add_subapp("/v2", v2)
    app.router.add_get("/ping", endpoints.ping)
    app.router.add_get("/metrics", cluster.metrics)
