"""CLI commands that read and write the registry over HTTP: kv, services, health, members.

Talks only to the server's Consul-compatible API, like any other client would.
"""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    pass
