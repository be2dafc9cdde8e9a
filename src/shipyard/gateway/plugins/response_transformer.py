"""The response-transformer plugin: removes, renames, replaces, adds and appends response headers before the
client sees them (Kong's response-transformer, headers only).

Never buffers or rewrites the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader
from shipyard.gateway.plugins.request_transformer import read_transforms, transform_headers


@register
class ResponseTransformerPlugin(Plugin):
    name = "response-transformer"
    priority = 800

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.transforms = read_transforms(ConfigReader(config), query=False)

    def response(self, ctx: RequestContext) -> None:
        ctx.upstream_headers = transform_headers(ctx.upstream_headers, self.transforms)
