"""The secrets engine's options of `shipyard server` (--vault-port, --vault-dev) and the config they make.

Option parsing only; the engine itself lives in shipyard.secrets and its listener in shipyard.api.vault.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def vault_options(function: F) -> F:
    function = click.option(
        "--vault-dev-root-token-id", "vault_dev_root_token", default="", metavar="TOKEN",
        help="With --vault-dev: use this root token instead of a random one (as vault's -dev-root-token-id).",
    )(function)
    function = click.option(
        "--vault-dev", is_flag=True,
        help="The secrets engine initialises and unseals itself (dev mode; implied by --dev). Not for production: "
             "with a data dir, the unseal key is kept in it.",
    )(function)
    function = click.option(
        "--vault-port", default=None, type=click.IntRange(0, 65535),
        help="Port of the Vault-compatible secrets engine (default 8200; 0: none).",
    )(function)
    return function


def vault_settings(flags: dict[str, Any], *, dev: bool) -> dict[str, Any]:
    """ServerConfig fields: an explicit --vault-port must be free (exit 1); the default 8200 may be taken by
    another server on this machine, and then this one runs without the secrets engine (a warning)."""
    port = flags["vault_port"]
    return {"vault_port": 8200 if port is None else port, "vault_port_required": port is not None,
            "vault_dev": bool(flags["vault_dev"]) or dev, "vault_dev_root_token": flags["vault_dev_root_token"]}
