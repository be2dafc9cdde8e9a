"""The gateway metrics of a `shipyard agent --gateway`, for Prometheus to scrape on the agent itself:
`GET /api/gateway/metrics` on the agent's --port (on --advertise), the path a server serves its own gateway's on.

Why on each agent, not summed by a server: a Prometheus user of Kong scrapes every Kong node's /metrics (each node
its own target, its own `up`, its `instance` label), and one of Consul scrapes every agent's /v1/agent/metrics; the
sum over gateways is Prometheus's `sum by (route)`, not the platform's. A server relaying every agent's figures would
be one scrape target hiding which gateway is down, would double count when several servers are scraped, and would
fail whole when one agent is slow. So the same scrape config (metrics_path /api/gateway/metrics, a bearer token)
covers servers and agents alike, each target its own machine's gateway.

It renders this machine's gateway counters and checks the caller; it never forwards to a server, never serves
anything else on this path, and never answers without ACLs where the agent may not face the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from shipyard.acl import READ
from shipyard.acl.state import ACLState
from shipyard.api.acl_guard import token_of
from shipyard.errors import ShipyardError
from shipyard.gateway.supervisor import GatewaySupervisor

METRICS_PATH = "/api/gateway/metrics"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class MetricsSource:
    """What the route needs, read at each request: the agent starts its gateway and learns whether the servers run
    ACLs only once a server answered, after its listener is up."""

    gateway: Callable[[], GatewaySupervisor | None]
    acl: Callable[[], ACLState | None]
    open_without_acl: bool  # the agent may face the network without ACLs (loopback, or --insecure-bind)


AGENT_METRICS: web.AppKey[Any] = web.AppKey("agent-metrics", object)


async def _check_caller(request: web.Request, source: MetricsSource) -> None:
    """As at a server: `gateway = "read"` with ACLs (the servers' tokens, failing closed); without them, only an
    agent that may face the network anyway answers (the gateway's own rule, check_gateway_bind)."""
    acl = source.acl()
    if acl is not None:
        authorizer = await acl.resolve(token_of(request))
        authorizer.require("gateway", "", READ)
    elif not source.open_without_acl:
        raise ShipyardError("the servers run without ACLs and this agent faces the network: its gateway metrics are "
                            "served only with ACLs on (a token with gateway read) or --insecure-bind", status=403)


async def gateway_metrics(request: web.Request) -> web.Response:
    source: MetricsSource = request.app[AGENT_METRICS]
    await _check_caller(request, source)
    gateway = source.gateway()
    if gateway is None:
        raise ShipyardError("this agent runs no gateway (shipyard agent --gateway)", status=404)
    text = await asyncio.to_thread(gateway.metrics_text)  # reads the workers' shared file under a short lock
    return web.Response(text=text, headers={"Content-Type": PROMETHEUS_TEXT})


def add_metrics_route(app: web.Application, source: MetricsSource) -> None:
    app[AGENT_METRICS] = source
    app.router.add_get(METRICS_PATH, gateway_metrics)
