"""The request-transformer plugin: removes, renames, replaces, adds and appends request headers and query args
before the upstream sees them (Kong's request-transformer, headers and querystring).

Never touches the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from shipyard.gateway.plugins.base import Plugin, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader, name_value_pairs


def read_transforms(r: ConfigReader, *, query: bool) -> dict[str, dict[str, list[tuple[str, str]]]]:
    kinds = ("headers", "querystring") if query else ("headers",)
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for action in ("remove", "rename", "replace", "add", "append"):
        section = r.record(action)
        out[action] = {}
        for kind in kinds:
            items = section.str_list(kind)
            if action == "remove":
                out[action][kind] = [(name, "") for name in items]
            else:
                out[action][kind] = name_value_pairs(items, f"{action}.{kind}")
        section.finish()
    r.finish()
    return out


def transform_headers(headers: list[tuple[str, str]], t: dict[str, dict[str, list[tuple[str, str]]]]
                      ) -> list[tuple[str, str]]:
    """Kong's order: remove, rename, replace (only existing), add (only missing), append (always)."""
    headers = list(headers)
    names = lambda: {n.lower() for n, _ in headers}  # noqa: E731
    remove = {n.lower() for n, _ in t["remove"].get("headers", [])}
    headers = [(n, v) for n, v in headers if n.lower() not in remove]
    for old, new in t["rename"].get("headers", []):
        headers = [(new if n.lower() == old.lower() else n, v) for n, v in headers]
    for name, value in t["replace"].get("headers", []):
        if name.lower() in names():
            headers = [(n, v) for n, v in headers if n.lower() != name.lower()] + [(name, value)]
    for name, value in t["add"].get("headers", []):
        if name.lower() not in names():
            headers.append((name, value))
    for name, value in t["append"].get("headers", []):
        headers.append((name, value))
    return headers


@register
class RequestTransformerPlugin(Plugin):
    name = "request-transformer"
    priority = 801

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.transforms = read_transforms(ConfigReader(config), query=True)

    async def access(self, ctx: RequestContext) -> Reject | None:
        t = self.transforms
        ctx.request_headers = transform_headers(ctx.request_headers, t)
        if any(t[a].get("querystring") for a in t):
            args = parse_qsl(ctx.query, keep_blank_values=True)
            remove = {n for n, _ in t["remove"]["querystring"]}
            args = [(n, v) for n, v in args if n not in remove]
            for old, new in t["rename"]["querystring"]:
                args = [(new if n == old else n, v) for n, v in args]
            for name, value in t["replace"]["querystring"]:
                if any(n == name for n, _ in args):
                    args = [(n, v) for n, v in args if n != name] + [(name, value)]
            for name, value in t["add"]["querystring"]:
                if not any(n == name for n, _ in args):
                    args.append((name, value))
            for name, value in t["append"]["querystring"]:
                args.append((name, value))
            ctx.query = urlencode(args)
        return None
