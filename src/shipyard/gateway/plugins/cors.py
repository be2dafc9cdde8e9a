"""The cors plugin: answers preflight requests at the gateway (204) and adds CORS headers to responses (Kong's cors).

Never lets a disallowed origin see Access-Control-Allow-Origin; never forwards a preflight unless preflight_continue.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, PluginConfigError, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

DEFAULT_METHODS = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
REGEX_CHARS = re.compile(r"[\^\$\*\+\?\[\]\(\)\|\\]")


@register
class CorsPlugin(Plugin):
    name = "cors"
    priority = 2000

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.origins = r.str_list("origins", ["*"])
        self.methods = [m.upper() for m in r.str_list("methods", DEFAULT_METHODS)]
        self.headers = r.str_list("headers")
        self.exposed_headers = r.str_list("exposed_headers")
        self.credentials = r.bool("credentials", False)
        self.max_age = r.int("max_age", None, minimum=0)
        self.preflight_continue = r.bool("preflight_continue", False)
        self.private_network = r.bool("private_network", False)
        r.finish()
        self.patterns = []
        for origin in self.origins:
            if origin != "*" and REGEX_CHARS.search(origin):
                try:
                    self.patterns.append(re.compile(origin))
                except re.error:
                    raise PluginConfigError(f"origins: '{origin}' is not a valid regex") from None

    def allowed_origin(self, origin: str | None) -> str | None:
        """The value of Access-Control-Allow-Origin for this request, None when none may be sent."""
        if "*" in self.origins:
            if self.credentials and origin:
                return origin  # browsers refuse "*" with credentials
            return "*"
        if not origin:
            return None
        if origin in self.origins or any(p.fullmatch(origin) for p in self.patterns):
            return origin
        return None

    def _common(self, origin: str | None) -> list[tuple[str, str]]:
        allow = self.allowed_origin(origin)
        if allow is None:
            return []
        headers = [("Access-Control-Allow-Origin", allow)]
        if allow != "*":
            headers.append(("Vary", "Origin"))
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        return headers

    async def access(self, ctx: RequestContext) -> Reject | None:
        origin = ctx.header("origin")
        preflight = ctx.method == "OPTIONS" and ctx.header("access-control-request-method") is not None
        if preflight and not self.preflight_continue:
            headers = self._common(origin)
            if headers:
                headers.append(("Access-Control-Allow-Methods", ",".join(self.methods)))
                requested = ctx.header("access-control-request-headers")
                allow_headers = ",".join(self.headers) if self.headers else requested
                if allow_headers:
                    headers.append(("Access-Control-Allow-Headers", allow_headers))
                if self.max_age is not None:
                    headers.append(("Access-Control-Max-Age", str(self.max_age)))
                if self.private_network and ctx.header("access-control-request-private-network") == "true":
                    headers.append(("Access-Control-Allow-Private-Network", "true"))
            return Reject(204, None, headers=headers, body=b"")
        ctx.shared["cors_headers"] = self._common(origin)
        return None

    def response(self, ctx: RequestContext) -> None:
        headers = ctx.shared.get("cors_headers") or []
        if not headers:
            return
        names = {n.lower() for n, _ in headers}
        ctx.upstream_headers = [(n, v) for n, v in ctx.upstream_headers if n.lower() not in names]
        ctx.upstream_headers.extend(headers)
        if self.exposed_headers:
            ctx.upstream_headers.append(("Access-Control-Expose-Headers", ",".join(self.exposed_headers)))
