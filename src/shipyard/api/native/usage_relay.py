"""Real CPU and memory of instances wherever they run: this server's own node agent reads its instances, and the
instances of a `shipyard agent` on another machine are asked of that agent (one request per agent node, on its
logs listener, with the secret from its record in the store). Also that listener's side: GET /api/v1/node-usage.

It only reads and relays readings; it never touches an instance, and the agent's secret never appears in a log
line or an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from shipyard.api.context import Platform
from shipyard.api.native.agent_logs import AGENT_LOGS, CallerTls, agent_get
from shipyard.registry.agents import AgentInfo, agent_info
from shipyard.scheduler.model import Allocation

log = logging.getLogger("shipyard.api")

routes = web.RouteTableDef()  # served on an agent's listener (api/agent_process.py), behind its secret
NODE_USAGE = "/api/v1/node-usage"
RELAY_TIMEOUT = 2.0  # a live view waits for the slowest agent: an agent that does not answer shows no figures


@routes.get(NODE_USAGE)
async def node_usage(request: web.Request) -> web.Response:
    """{"usage": {alloc id: reading}} of the instances this agent runs (of ?ids=a,b, or all)."""
    agent = request.app[AGENT_LOGS]
    ids = {i for i in request.query.get("ids", "").split(",") if i} or None
    found = await agent.usage(ids)
    return web.json_response({"usage": {alloc_id: usage.to_dict() for alloc_id, usage in found.items()}})


async def instances_usage(platform: Platform, allocs: Iterable[Allocation]) -> dict[str, dict[str, Any]]:
    """alloc id -> reading (Usage.to_dict()) of every given allocation whose instance runs now and whose node
    answers: this server's node read here, each agent node in one request, all at once."""
    by_node: dict[str, set[str]] = {}
    for alloc in allocs:
        by_node.setdefault(alloc.node, set()).add(alloc.id)
    own = platform.agent
    local = by_node.pop(own.node.name, set()) if own is not None else set()
    tasks = [_remote(platform, node, ids) for node, ids in by_node.items()]
    if own is not None and local:
        tasks.append(_local(own, local))
    found: dict[str, dict[str, Any]] = {}
    for readings in await asyncio.gather(*tasks):
        found.update(readings)
    return found


async def _local(agent: Any, ids: set[str]) -> dict[str, dict[str, Any]]:
    return {alloc_id: usage.to_dict() for alloc_id, usage in (await agent.usage(ids)).items()}


async def _remote(platform: Platform, node: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    agent = await agent_info(platform.store, node)
    if agent is None or not agent.logs_port:
        return {}  # a server's node (each server reads its own) or no agent known: no figures
    try:
        return await _ask(agent, ids, platform.config.tls)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("no usage from the agent of node %s: %s", node, type(exc).__name__)
        return {}


async def _ask(agent: AgentInfo, ids: set[str], tls: CallerTls) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RELAY_TIMEOUT)) as session, agent_get(
            session, agent, NODE_USAGE, tls, {"ids": ",".join(sorted(ids))}) as response:
        if response.status != 200:
            return {}
        body = await response.json()
    readings = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(readings, dict):
        return {}
    return {k: v for k, v in readings.items() if k in ids and isinstance(v, dict)}
