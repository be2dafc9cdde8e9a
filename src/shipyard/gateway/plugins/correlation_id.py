"""The correlation-id plugin: gives every request an id header (uuid or uuid#counter), optionally echoed back.

Never replaces an id the client already sent.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

_counter = itertools.count(1)
_worker_uuid = uuid.uuid4()


@register
class CorrelationIdPlugin(Plugin):
    name = "correlation-id"
    priority = 1

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.header_name = r.str("header_name", "Kong-Request-ID") or "Kong-Request-ID"
        self.generator = r.choice("generator", ("uuid", "uuid#counter", "tracker"), "uuid#counter")
        self.echo_downstream = r.bool("echo_downstream", False)
        r.finish()

    def new_id(self, ctx: RequestContext) -> str:
        if self.generator == "uuid":
            return str(uuid.uuid4())
        if self.generator == "uuid#counter":
            return f"{_worker_uuid}#{next(_counter)}"
        return f"{ctx.client_ip}-{os.getpid()}-{next(_counter)}"

    async def access(self, ctx: RequestContext) -> Reject | None:
        value = ctx.header(self.header_name)
        if not value:
            value = self.new_id(ctx)
            ctx.set_header(self.header_name, value)
        ctx.shared["correlation_id"] = value
        return None

    def response(self, ctx: RequestContext) -> None:
        if self.echo_downstream and ctx.shared.get("correlation_id"):
            lname = self.header_name.lower()
            if not any(n.lower() == lname for n, _ in ctx.upstream_headers):
                ctx.upstream_headers.append((self.header_name, ctx.shared["correlation_id"]))
