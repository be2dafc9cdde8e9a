"""Consul /v1/snapshot: GET saves the whole store as one file, PUT restores one atomically.

Routes only; the file format and the restore live in shipyard.registry.snapshot.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.api.guard import accepts_any_body
from shipyard.registry.snapshot import MAX_SNAPSHOT, restore_snapshot, save_snapshot

routes = web.RouteTableDef()


@routes.get("/v1/snapshot")
async def snapshot_save(request: web.Request) -> web.Response:
    platform = platform_of(request)
    data, revision = await save_snapshot(platform.store, platform.node)
    headers = {"X-Consul-Index": str(max(revision, 1)), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
    return web.Response(body=data, content_type="application/x-gzip", headers=headers)


@routes.put("/v1/snapshot")
@accepts_any_body  # `curl --data-binary @file` sends a form type; Consul takes any
async def snapshot_restore(request: web.Request) -> web.Response:
    data = await read_limited(request, MAX_SNAPSHOT, what="snapshot")
    await restore_snapshot(platform_of(request).store, data)
    return web.Response(status=200)
