"""A tiny HTTP service for the demo: answers `/` with a greeting and `/health` with 200.

It knows nothing of Shipyard; the demo registers it through the Consul-compatible API.
"""

from __future__ import annotations

import os
import socket

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": "world", "instance": os.environ.get("INSTANCE", socket.gethostname())})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None)


if __name__ == "__main__":
    main()
