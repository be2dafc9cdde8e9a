"""GET /api/v1/health: the server's own health, part by part (store, bus, gateway), for people and monitors.

It reads the state the parts keep about themselves; it never repairs, reconnects or restarts anything.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from shipyard.api.context import platform_of
from shipyard.bus.base import Bus
from shipyard.gateway.supervisor import GatewaySupervisor

routes = web.RouteTableDef()


def _bus_check(bus: object) -> dict[str, Any]:
    if not isinstance(bus, Bus):
        return {"status": "critical", "detail": "no bus"}
    state = bus.status()
    return {"status": "passing" if state["state"] == "up" else "critical", **state}


def _gateway_check(gateway: object) -> dict[str, Any]:
    if not isinstance(gateway, GatewaySupervisor):
        return {"status": "passing", "detail": "no gateway (--no-gateway)"}
    running = len(gateway.pids)
    return {"status": "passing" if running else "critical", "port": gateway.port, "workers": running,
            "wanted": gateway.workers, "restarts": gateway.restarts}


@routes.get("/api/v1/health")
async def server_health(request: web.Request) -> web.Response:
    """200 when every part is passing, 503 (same body) when one is not, so `curl -f` and load balancers can use it."""
    platform = platform_of(request)
    checks = {
        "store": {"status": "passing", "revision": platform.store.revision},
        "bus": _bus_check(platform.extras.get("bus")),
        "gateway": _gateway_check(platform.extras.get("gateway")),
    }
    healthy = all(c["status"] == "passing" for c in checks.values())
    body = {"status": "passing" if healthy else "critical", "checks": checks}
    return web.Response(status=200 if healthy else 503, body=orjson.dumps(body), content_type="application/json")
