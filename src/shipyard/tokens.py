"""The ACL token a process sends to a Shipyard server: SHIPYARD_HTTP_TOKEN, else CONSUL_HTTP_TOKEN (Consul's CLI
variable), as X-Consul-Token on every request.

It reads the environment only; it never logs or prints a token.
"""

from __future__ import annotations

import os

TOKEN_VARIABLES = ("SHIPYARD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")
TOKEN_HEADER = "X-Consul-Token"


def token_from_env() -> str:
    return next((os.environ[v].strip() for v in TOKEN_VARIABLES if os.environ.get(v, "").strip()), "")


def token_headers(token: str | None = None) -> dict[str, str]:
    """{"X-Consul-Token": token} for the given token, else the environment's; {} when there is none."""
    token = token_from_env() if token is None else token
    return {TOKEN_HEADER: token} if token else {}
