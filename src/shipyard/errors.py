"""Typed user errors shared by every layer, each carrying its HTTP status.

Layers raise these; only the API and CLI edges turn them into responses or one-line messages.
"""

from __future__ import annotations

from typing import Any


class ShipyardError(Exception):
    """A user-facing error: a status code, a one-line message and optional detail."""

    status = 500

    def __init__(self, message: str, detail: Any = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(ShipyardError):
    status = 400


class NotFound(ShipyardError):
    status = 404


class Conflict(ShipyardError):
    status = 409


class PayloadTooLarge(ShipyardError):
    status = 413


class NotLeader(ShipyardError):
    """This server does not (or no longer) lead its cluster: what only the leader may commit, it must not."""

    status = 503


class Unprocessable(ShipyardError):
    status = 422
