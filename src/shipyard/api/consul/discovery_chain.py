"""Consul /v1/discovery-chain/:service: the compiled chain (GET), or compiled with overrides (POST).

Routes and HTTP shapes only; compilation lives in shipyard.registry.discovery_chain.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.common import bad_request, blocking_query, json_response, read_json
from shipyard.api.context import platform_of
from shipyard.registry.config_entries import CONFIG_PREFIX
from shipyard.registry.connect_ca import ConnectCA, trust_domain
from shipyard.registry.discovery_chain import compile_chain

routes = web.RouteTableDef()
OVERRIDES = ("OverrideConnectTimeout", "OverrideProtocol", "OverrideMeshGateway")


async def _answer(request: web.Request, overrides: dict[str, Any]) -> web.Response:
    platform = platform_of(request)
    service = request.match_info["service"]
    datacenter = request.query.get("compile-dc") or platform.node.datacenter
    domain = trust_domain(await ConnectCA(platform.store, platform.node).cluster_id())

    async def read() -> tuple[Any, int, int]:
        chain, index = await compile_chain(platform.store, service, datacenter, domain, overrides)
        return {"Chain": chain}, index, platform.store.revision

    result, index = await blocking_query(request, platform.store, read, CONFIG_PREFIX, prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/discovery-chain/{service:.+}")
async def discovery_chain_get(request: web.Request) -> web.Response:
    return await _answer(request, {})


@routes.post("/v1/discovery-chain/{service:.+}")
async def discovery_chain_post(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True) or {}
    if not isinstance(body, dict):
        raise bad_request("Request decode failed: expected a JSON object")
    return await _answer(request, {k: body[k] for k in OVERRIDES if body.get(k)})
