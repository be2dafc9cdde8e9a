"""Consul /v1 health endpoints (being written).

Routes only; logic lives in shipyard.registry.
"""

from aiohttp import web

routes = web.RouteTableDef()
