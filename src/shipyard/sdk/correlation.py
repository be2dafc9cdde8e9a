"""The correlation and trace headers of the request being served, kept in a contextvar so that outgoing calls made
while serving it (shipyard.sdk.client) carry them along.

Service's middleware sets it; client reads it. It holds only these few headers, never credentials or bodies.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

CORRELATION_HEADER = "x-correlation-id"
# Lower-case names: ASGI gives header names lower-cased, httpx matches them case-insensitively.
PROPAGATED_HEADERS = (CORRELATION_HEADER, "x-request-id", "traceparent", "tracestate")

incoming_headers: ContextVar[dict[str, str] | None] = ContextVar("shipyard_incoming_headers", default=None)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def current_headers() -> dict[str, str]:
    """The propagated headers of the request being served (empty outside a request)."""
    return dict(incoming_headers.get() or {})


def correlation_id() -> str | None:
    """The X-Correlation-ID of the request being served, for logs; None outside a request."""
    return (incoming_headers.get() or {}).get(CORRELATION_HEADER)
