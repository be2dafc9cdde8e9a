"""A real upstream service for gateway tests: `python tests/gateway_upstream.py PORT NAME`.

Answers with what it received (method, path, headers, body size) and streams large bodies both ways without
holding them; it is a separate process so the gateway talks to it over TCP like to any service.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import WSMsgType, web

PORT = int(sys.argv[1])
NAME = sys.argv[2] if len(sys.argv) > 2 else f"up-{PORT}"
CHUNK = b"x" * 65536


async def echo(request: web.Request) -> web.Response:
    size = 0
    digest = hashlib.sha256()
    async for chunk in request.content.iter_any():
        size += len(chunk)
        digest.update(chunk)
    return web.json_response({
        "name": NAME, "port": PORT, "method": request.method, "path": request.path, "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": {k: v for k, v in request.headers.items()}, "size": size, "sha256": digest.hexdigest(),
        "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
    })


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /stream?size=N[&length=1]: N bytes, chunked unless length=1 (then with Content-Length)."""
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse()
    if request.query.get("length") == "1":
        response.content_length = size
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    left = size
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.json_response({"name": NAME, "slept": True})


async def status(request: web.Request) -> web.Response:
    return web.json_response({"name": NAME}, status=int(request.match_info["code"]))


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{NAME}: {msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=PORT, print=None, access_log=None)


if __name__ == "__main__":
    main()
