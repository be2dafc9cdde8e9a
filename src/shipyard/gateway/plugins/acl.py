"""The acl plugin: allows or denies consumers by their ACL groups (Kong's acl), after authentication.

Never identifies consumers itself: it needs an auth plugin to have set ctx.consumer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, PluginConfigError, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader


@register
class AclPlugin(Plugin):
    name = "acl"
    priority = 950

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.allow = set(r.str_list("allow"))
        self.deny = set(r.str_list("deny"))
        self.hide_groups_header = r.bool("hide_groups_header", False)
        r.finish()
        if bool(self.allow) == bool(self.deny):
            raise PluginConfigError("allow, deny: exactly one of these fields must be non-empty")

    async def access(self, ctx: RequestContext) -> Reject | None:
        if ctx.consumer is None:
            if ctx.credential is not None:
                return Reject(403, "You cannot consume this service")
            return Reject(401, "Unauthorized")
        groups = set(ctx.consumer.groups)
        if self.allow and not groups & self.allow:
            return Reject(403, "You cannot consume this service")
        if self.deny and groups & self.deny:
            return Reject(403, "You cannot consume this service")
        if not self.hide_groups_header and groups:
            ctx.set_header("X-Consumer-Groups", ", ".join(sorted(groups)))
        return None
