"""What the engine's request handlers see and raise: a logical request and Vault's error kinds.

Plain data; no handler logic and no HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shipyard.errors import ShipyardError

if TYPE_CHECKING:
    from shipyard.secrets.tokens import TokenEntry


@dataclass
class Request:
    operation: str  # read | list | create | update | patch | delete
    path: str  # relative to /v1/, no leading slash
    data: dict[str, Any] = field(default_factory=dict)
    token: str = ""
    entry: TokenEntry | None = None  # the caller's token, once authenticated
    remote_address: str = ""
    wrap_ttl: int = 0  # X-Vault-Wrap-TTL in seconds: the response goes behind a wrapping token (secrets.wrapping)


class PermissionDenied(ShipyardError):
    status = 403

    def __init__(self, message: str = "permission denied") -> None:
        super().__init__(message)


class Missing(ShipyardError):
    """404 with Vault's empty error list, optionally with a body (KV v2 answers a deleted version with one)."""

    status = 404

    def __init__(self, body: dict[str, Any] | None = None) -> None:
        super().__init__("")
        self.body = body


class UnsupportedOperation(ShipyardError):
    status = 405

    def __init__(self) -> None:
        super().__init__("unsupported operation")


def as_int(value: Any, name: str, default: int = 0) -> int:
    """A non-negative integer field of a request (JSON number or numeric string); anything else is a 400."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ShipyardError(f"{name}: expected an integer, got {value!r}", status=400) from None
    if number < 0:
        raise ShipyardError(f"{name} cannot be negative", status=400)
    return number


def data_response(data: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """Vault's response envelope around `data`."""
    return {"request_id": "", "lease_id": "", "renewable": False, "lease_duration": 0, "data": data,
            "wrap_info": None, "warnings": None, "auth": None, **extra}
