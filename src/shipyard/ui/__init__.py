"""The web console served at /ui/: server-rendered pages and live fragments over the platform's parts.

It shows and changes what the APIs do, through the same service objects; it never keeps state of its own.
"""

from shipyard.ui.console import add_ui_routes

__all__ = ["add_ui_routes"]
