"""POST /api/v1/nodes/{node}/secrets: a `shipyard agent` gets what an instance start on its node needs of the secrets
engine (a fresh engine token, the job's `secrets:` values, its `vault.files` contents), as Nomad clients get their
tasks' Vault tokens from the servers. Body {"Alloc": "<id>"}; with {"Alloc", "Token": "<that instance's token>"} it
reads the current values again with that token and mints nothing (a `change_mode: signal` job's files re-rendered).

The allocation must be placed on {node} (the scheduler's record: desired run); with ACLs on, the caller needs
node:write on {node} and store:write (an agent's token, api/acl_table.py, as the service-tokens route). The answer
is never cached (no-store) and never logged; with TLS on, plain HTTP reaches this server from loopback only.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from shipyard.agent.node_agent import stored_job_spec
from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.api.vault import VaultService
from shipyard.api.vault.delivery import secrets_digest
from shipyard.api.vault.node_delivery import deliver_to_node, placed_alloc, refresh_for_node
from shipyard.errors import BadRequest, ShipyardError

routes = web.RouteTableDef()
PATH = "/api/v1/nodes/{node}/secrets"
MAX_BODY = 4096
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _vault_of(request: web.Request) -> VaultService:
    vault = platform_of(request).extras.get("vault")
    if not isinstance(vault, VaultService):
        raise ShipyardError("this server runs no secrets engine (--vault-port 0): instances with secrets cannot "
                            "start on agents through it", status=501)
    return vault


async def _body(request: web.Request) -> tuple[str, str]:
    try:
        body = orjson.loads(await read_limited(request, MAX_BODY) or b"null")
    except orjson.JSONDecodeError:
        body = None
    alloc, token = (body.get("Alloc"), body.get("Token", "")) if isinstance(body, dict) else (None, None)
    if not isinstance(alloc, str) or not alloc or not isinstance(token, str):
        raise BadRequest('body: give {"Alloc": "<allocation id>"} (and "Token" to read its values again)')
    return alloc, token


def vault_addr_for(request: web.Request, vault: VaultService) -> str:
    """The engine as the agent's instances reach it: the host the agent called this server by (so a name or address
    that machine can reach), the engine's port and scheme."""
    host = request.url.host or vault.bind
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if vault.ssl_context is not None else 'http'}://{host}:{vault.port}"


@routes.post(PATH)
async def node_secrets(request: web.Request) -> web.Response:
    platform = platform_of(request)
    vault = _vault_of(request)
    alloc_id, token = await _body(request)
    alloc = await placed_alloc(platform.store, request.match_info["node"], alloc_id)
    agent = platform.agent
    spec = await (agent.job_spec(alloc.job, alloc.version) if agent is not None
                  else stored_job_spec(platform.store, alloc.job, alloc.version))
    if spec is None:
        raise ShipyardError(f"job {alloc.job!r} version {alloc.version} not found in the store", status=404)
    answer: dict[str, Any]
    if token:
        answer = await refresh_for_node(vault.core, spec, alloc, token)
    else:
        answer = await deliver_to_node(vault.core, spec, alloc, vault_addr_for(request, vault))
        if vault.watcher is not None and (spec.secrets or spec.vault_files):
            # What the job was started with: a later change restarts it (the change watcher, change_mode restart).
            vault.watcher.delivered[spec.name] = await secrets_digest(vault.core, spec)
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=NO_STORE)
