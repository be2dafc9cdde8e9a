"""The ip-restriction plugin: allows or denies clients by IP address or CIDR range (Kong's ip-restriction).

Never trusts X-Forwarded-For: the client IP is the one the data plane put in ctx.client_ip.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, PluginConfigError, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader


@register
class IpRestrictionPlugin(Plugin):
    name = "ip-restriction"
    priority = 990

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.allow = r.cidrs("allow")
        self.deny = r.cidrs("deny")
        self.status = r.int("status", 403, minimum=100) or 403
        self.message = r.str("message", "Your IP address is not allowed")
        r.finish()
        if not self.allow and not self.deny:
            raise PluginConfigError("allow, deny: at least one of these fields must be non-empty")

    async def access(self, ctx: RequestContext) -> Reject | None:
        try:
            ip = ipaddress.ip_address(ctx.client_ip)
        except ValueError:
            return Reject(self.status, self.message)
        if any(ip in net for net in self.deny):
            return Reject(self.status, self.message)
        if self.allow and not any(ip in net for net in self.allow):
            return Reject(self.status, self.message)
        return None
