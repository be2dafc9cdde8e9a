"""Consul Connect endpoints: intentions (/v1/connect/intentions: by exact pair, by ID, match, check), the CA
(/v1/connect/ca/roots and /configuration) and the agent's CA views (/v1/agent/connect/ca/roots, leaf certificates).

Routes and HTTP shapes only; intentions live in shipyard.registry.intentions, keys and certificates in
shipyard.registry.connect_ca.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shipyard.api.consul.common import bad_request, blocking_query, json_response, read_json, request_filter
from shipyard.api.context import platform_of
from shipyard.registry.config_entries import kind_prefix
from shipyard.registry.connect_ca import LEAF_PREFIX, ROOTS_PREFIX, ConnectCA
from shipyard.registry.filter import MapOf, Schema
from shipyard.registry.intentions import KIND, Intentions

routes = web.RouteTableDef()
# structs.Intention's fields, for ?filter= on the intentions list.
INTENTION: dict[str, Schema] = {
    "ID": "string", "Description": "string", "SourcePeer": "string", "SourceNS": "string", "SourceName": "string",
    "DestinationNS": "string", "DestinationName": "string", "SourcePartition": "string",
    "DestinationPartition": "string", "SourceType": "string", "Action": "string", "Precedence": "int",
    "Meta": MapOf("string"), "CreateIndex": "uint", "ModifyIndex": "uint",
}


def _intentions(request: web.Request) -> Intentions:
    return Intentions(platform_of(request).store)


def _ca(request: web.Request) -> ConnectCA:
    platform = platform_of(request)
    return ConnectCA(platform.store, platform.node)


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise bad_request(f"required query parameter '{name}' not set")
    return value


# ---- intentions ---------------------------------------------------------------------------------


@routes.get("/v1/connect/intentions")
async def intentions_list(request: web.Request) -> web.Response:
    intentions = _intentions(request)
    chosen = request_filter(request, INTENTION)

    async def read() -> tuple[Any, int, int]:
        found, index, revision = await intentions.all()
        return (found if chosen is None else chosen.select(found)), index, revision

    result, index = await blocking_query(request, intentions.store, read, kind_prefix(KIND), prefix=True)
    return json_response(result, index=index)


@routes.post("/v1/connect/intentions")
async def intentions_create(request: web.Request) -> web.Response:
    new_id = await _intentions(request).create(await read_json(request))
    return json_response({"ID": new_id})


@routes.get("/v1/connect/intentions/match")
async def intentions_match(request: web.Request) -> web.Response:
    intentions = _intentions(request)
    by, names = request.query.get("by", ""), request.query.getall("name", [])

    async def read() -> tuple[Any, int, int]:
        return await intentions.match(by, names)

    result, index = await blocking_query(request, intentions.store, read, kind_prefix(KIND), prefix=True)
    return json_response(result, index=index)


@routes.get("/v1/connect/intentions/check")
async def intentions_check(request: web.Request) -> web.Response:
    allowed = await _intentions(request).check(_required(request, "source"), _required(request, "destination"))
    return json_response({"Allowed": allowed})


@routes.get("/v1/connect/intentions/exact")
async def intentions_get_exact(request: web.Request) -> web.Response:
    source, destination = _required(request, "source"), _required(request, "destination")
    return json_response(await _intentions(request).get_exact(source, destination))


@routes.put("/v1/connect/intentions/exact")
async def intentions_put_exact(request: web.Request) -> web.Response:
    source, destination = _required(request, "source"), _required(request, "destination")
    await _intentions(request).upsert_exact(source, destination, await read_json(request))
    return json_response(True)


@routes.delete("/v1/connect/intentions/exact")
async def intentions_delete_exact(request: web.Request) -> web.Response:
    source, destination = _required(request, "source"), _required(request, "destination")
    await _intentions(request).delete_exact(source, destination)
    return json_response(True)


@routes.get("/v1/connect/intentions/{id}")
async def intention_get(request: web.Request) -> web.Response:
    return json_response(await _intentions(request).get_by_id(request.match_info["id"]))


@routes.put("/v1/connect/intentions/{id}")
async def intention_update(request: web.Request) -> web.Response:
    await _intentions(request).update_by_id(request.match_info["id"], await read_json(request))
    return json_response(True)


@routes.delete("/v1/connect/intentions/{id}")
async def intention_delete(request: web.Request) -> web.Response:
    await _intentions(request).delete_by_id(request.match_info["id"])
    return json_response(True)


# ---- CA ------------------------------------------------------------------------------------------


async def _roots(request: web.Request) -> web.Response:
    ca = _ca(request)
    result, index = await blocking_query(request, ca.store, ca.roots, ROOTS_PREFIX, prefix=True)
    if request.query.get("pem", "") in ("true", "1"):
        # Consul's ?pem=true: the root certificates as one PEM chain.
        body = "".join(r["RootCert"] if r["RootCert"].endswith("\n") else r["RootCert"] + "\n" for r in result["Roots"])
        return web.Response(text=body, content_type="application/pem-certificate-chain",
                            headers={"X-Consul-Index": str(max(index, 1))})
    return json_response(result, index=index)


@routes.get("/v1/connect/ca/roots")
async def ca_roots(request: web.Request) -> web.Response:
    return await _roots(request)


@routes.get("/v1/agent/connect/ca/roots")
async def agent_ca_roots(request: web.Request) -> web.Response:
    return await _roots(request)


@routes.get("/v1/connect/ca/configuration")
async def ca_configuration(request: web.Request) -> web.Response:
    config = await _ca(request).configuration()
    return json_response(config, index=config["ModifyIndex"])


@routes.put("/v1/connect/ca/configuration")
async def ca_update_configuration(request: web.Request) -> web.Response:
    await _ca(request).update_configuration(await read_json(request))
    return json_response(None)


@routes.get("/v1/agent/connect/ca/leaf/{service:.+}")
async def agent_leaf(request: web.Request) -> web.Response:
    ca = _ca(request)
    service = request.match_info["service"]

    async def read() -> tuple[Any, int, int]:
        leaf = await ca.leaf(service)
        return leaf.to_json(), leaf.modify_index, ca.store.revision

    result, index = await blocking_query(request, ca.store, read, LEAF_PREFIX + service, prefix=False)
    return json_response(result, index=index)


@routes.post("/v1/agent/connect/authorize")
async def agent_authorize(request: web.Request) -> web.Response:
    """Whether ClientCertURI (a spiffe://.../svc/<name> URI) may connect to Target, by the intentions."""
    body = await read_json(request)
    if not isinstance(body, dict) or not body.get("Target") or not body.get("ClientCertURI"):
        raise bad_request("Target and ClientCertURI are required")
    uri = str(body["ClientCertURI"])
    if "/svc/" not in uri:
        raise bad_request(f"ClientCertURI is not a service identity: {uri}")
    source = uri.rsplit("/svc/", 1)[1]
    allowed = await _intentions(request).check(source, str(body["Target"]))
    reason = "Matched L4 intention" if allowed else "Denied by intention"
    return json_response({"Authorized": allowed, "Reason": reason})
