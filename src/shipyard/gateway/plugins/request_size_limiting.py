"""The request-size-limiting plugin: refuses bodies over a size with 413 (Kong's request-size-limiting).

Never reads the body: a declared Content-Length is checked here, and ctx.shared["max_body_size"] tells the data
plane to cut off a chunked body that grows past the limit while it streams.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

UNITS = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}


@register
class RequestSizeLimitingPlugin(Plugin):
    name = "request-size-limiting"
    priority = 951

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        size = r.int("allowed_payload_size", 128, minimum=0) or 0
        unit = r.choice("size_unit", tuple(UNITS), "megabytes")
        self.require_content_length = r.bool("require_content_length", False)
        r.finish()
        self.limit = size * UNITS[unit]

    async def access(self, ctx: RequestContext) -> Reject | None:
        size = ctx.body_size
        if size is None:
            raw = ctx.header("content-length")
            if raw is not None and raw.strip().isdigit():
                size = int(raw)
        if size is not None and size > self.limit:
            return Reject(413, "Request size limit exceeded")
        if size is None:
            chunked = "chunked" in (ctx.header("transfer-encoding") or "").lower()
            if self.require_content_length and chunked:
                return Reject(411, "A valid Content-Length header is required")
            current = ctx.shared.get("max_body_size")
            ctx.shared["max_body_size"] = self.limit if current is None else min(current, self.limit)
        return None
