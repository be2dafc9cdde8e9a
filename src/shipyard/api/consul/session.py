"""Consul /v1 session endpoints (being written).

Routes only; logic lives in shipyard.registry.
"""

from aiohttp import web

routes = web.RouteTableDef()
