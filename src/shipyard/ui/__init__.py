"""The web console served at /ui/: server-rendered pages and live fragments over the platform's parts.

It shows and changes what the APIs do, through the same service objects; it never keeps state of its own (beyond
the gateway traffic history, a bounded ring buffer of samples in ui/traffic.py).
"""

from aiohttp import web

from shipyard.ui.access_views import add_access_routes
from shipyard.ui.console import add_ui_routes as _add_console_routes
from shipyard.ui.secrets_views import add_secrets_routes
from shipyard.ui.traffic import add_traffic_sampler


def add_ui_routes(app: web.Application) -> None:
    """Mounts the console at /ui/ (and / redirecting there): the core pages, then the pages in their own modules."""
    _add_console_routes(app)
    add_secrets_routes(app)
    add_access_routes(app)
    add_traffic_sampler(app)


__all__ = ["add_ui_routes"]
