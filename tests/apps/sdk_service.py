"""A small Starlette service run through shipyard.sdk.Service, for the SDK tests (tests/test_sdk_*.py).

Behaviour comes from the environment: SHIPYARD_SERVICE names it, SDK_TEST_FAIL=1 makes /whoami answer 500 (another
number: that status),
SDK_TEST_UNHEALTHY_IF=<path> makes its health check fail while that file exists.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shipyard.sdk import Service, client, correlation_id


async def whoami(request: Request) -> JSONResponse:
    fail = os.environ.get("SDK_TEST_FAIL")
    if fail:
        return JSONResponse({"error": "failing on purpose"}, status_code=500 if fail == "1" else int(fail))
    return JSONResponse({"id": service.service_id, "port": service.port})


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"item": request.path_params["item_id"]})


async def headers(request: Request) -> JSONResponse:
    return JSONResponse({"headers": dict(request.headers), "id": service.service_id})


async def relay(request: Request) -> JSONResponse:
    """Calls another service while serving this request: the correlation headers must travel along."""
    response = await client(request.path_params["target"]).get("/headers")
    return JSONResponse({"seen_here": correlation_id(), "downstream": response.json()})


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode(), "id": service.service_id})


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("seconds", "1")))
    return JSONResponse({"slept": True, "id": service.service_id})


def healthy() -> bool:
    marker = os.environ.get("SDK_TEST_UNHEALTHY_IF")
    return not (marker and os.path.exists(marker))


app = Starlette(routes=[
    Route("/whoami", whoami),
    Route("/items/{item_id}", item),
    Route("/headers", headers),
    Route("/relay/{target}", relay),
    Route("/slow", slow),
    Route("/echo", echo, methods=["POST"]),
])
service = Service(app, health=healthy, tags=["sdk-test"])

if __name__ == "__main__":
    service.run()
