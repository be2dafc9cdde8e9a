"""Logs of instances on a `shipyard agent` of another machine: the server finds the allocation's node, reads that
agent's record (address, logs port, secret) from the store and relays the agent's answer as it streams; and the
agent's side: its listener accepts only requests carrying its secret.

It relays bytes only; it never reads a log file itself, and the secret never appears in a log line or an error.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web

from shipyard.errors import ShipyardError
from shipyard.registry.agents import AgentInfo, agent_info
from shipyard.scheduler.records import ALLOC_STATUS, ALLOCS, split_node_alloc
from shipyard.store import Store
from shipyard.tls.contexts import client_context

# The node agent an agent's own listener serves logs of (set only in `shipyard agent`'s app).
AGENT_LOGS: web.AppKey[Any] = web.AppKey("agent-logs", object)
SECRET_HEADER = "X-Shipyard-Agent-Secret"
CONNECT_TIMEOUT = 5.0


class CallerTls(Protocol):
    """What a server calls agents with: its CA, and its own certificate (api/context.py's TlsConfig)."""

    ca_file: str
    cert_file: str
    key_file: str


def agent_url(agent: AgentInfo, path: str) -> str:
    """A URL on an agent's logs listener (its advertised address, IPv6 in brackets; https when it serves TLS)."""
    host = f"[{agent.address}]" if ":" in agent.address else agent.address
    return f"{'https' if agent.tls else 'http'}://{host}:{agent.logs_port}{path}"


def agent_ssl(agent: AgentInfo, tls: CallerTls) -> ssl.SSLContext | bool:
    """How a server checks the listener of an agent that serves HTTPS: the chain against the server's --tls-ca (the
    system's CAs without one) and the agent's advertised address named in its certificate, as any HTTPS client
    checks a server; the server presents its own certificate, as it does to other servers."""
    if not agent.tls:
        return True
    return _verifying_context(tls.ca_file, tls.cert_file, tls.key_file)


@functools.lru_cache(maxsize=4)
def _verifying_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    return client_context(ca_file, cert_file, key_file)


def agent_get(session: aiohttp.ClientSession, agent: AgentInfo, path: str, tls: CallerTls,
              params: Mapping[str, str]) -> Any:
    """A server's GET on an agent's listener: its secret, and its certificate checked when it serves HTTPS (awaited
    for the response, or used as `async with`)."""
    return session.get(agent_url(agent, path), params=params, headers={SECRET_HEADER: agent.logs_secret},
                       ssl=agent_ssl(agent, tls))


def _logs_path(alloc_id: str) -> str:
    return f"/api/v1/allocs/{quote(alloc_id, safe='')}/logs"


async def remote_agent_of(store: Store, alloc_id: str) -> AgentInfo | None:
    """The agent of the node the allocation is (or was last reported) on; None when that is no agent's node."""
    suffix = "/" + quote(alloc_id, safe="")
    for prefix in (ALLOCS, ALLOC_STATUS):
        for kv in (await store.range(prefix, prefix=True)).kvs:
            if kv.key.endswith(suffix):
                node, _ = split_node_alloc(kv.key, prefix)
                return await agent_info(store, node)
    return None


async def logs_agent_of(store: Store, alloc_id: str, own_node: str) -> AgentInfo | None:
    """The agent that holds an allocation's logs: its node's, or, once the allocation is gone from the records, the
    agent of `own_node` (a server whose node agent is its own process: the logs outlive the instance there)."""
    return await remote_agent_of(store, alloc_id) or await agent_info(store, own_node)


async def proxy_agent_logs(request: web.Request, agent: AgentInfo, alloc_id: str,
                           tls: CallerTls) -> web.StreamResponse:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            upstream = await agent_get(session, agent, _logs_path(alloc_id), tls, request.query)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ShipyardError(f"the agent of node {agent.name} ({agent.address}:{agent.logs_port}) does not answer "
                                f"for its logs: {type(exc).__name__}", status=502) from None
        async with upstream:
            if upstream.status != 200:
                raise _agent_error(agent, upstream.status, await upstream.read())
            response = web.StreamResponse(headers={"Content-Type": upstream.headers.get(
                "Content-Type", "text/plain; charset=utf-8"), "Cache-Control": "no-cache"})
            await response.prepare(request)
            with contextlib.suppress(aiohttp.ClientPayloadError, ConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response


async def agent_log_lines(agent: AgentInfo, alloc_id: str, stream: str, tail: int, tls: CallerTls) -> list[str]:
    """The last `tail` lines of an instance's stream, asked of its node's agent (the console's logs panel); none
    when the agent does not answer or knows no such instance."""
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=CONNECT_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, agent_get(
                session, agent, _logs_path(alloc_id), tls, {"stream": stream, "tail": str(tail)}) as got:
            if got.status != 200:
                return []
            return (await got.text(errors="replace")).splitlines()
    except (aiohttp.ClientError, TimeoutError):
        return []


def _agent_error(agent: AgentInfo, status: int, body: bytes) -> ShipyardError:
    message = body.decode(errors="replace")[:500]
    with contextlib.suppress(Exception):
        import orjson

        message = str(orjson.loads(body).get("error") or message)
    if status in (400, 404):
        return ShipyardError(message, status=status)  # the agent's answer about the request itself
    return ShipyardError(f"the agent of node {agent.name} answered {status}: {message}", status=502)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def secret_middleware(secret: str, *, own_guard: frozenset[str] = frozenset()) -> Any:
    """An agent's listener: only a caller that read its record in the store (a server) may read its logs. The
    paths of `own_guard` are not the servers' and check their caller themselves (the gateway metrics a Prometheus
    scrapes, behind an ACL token: api/agent_metrics.py)."""
    expected = secret.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in own_guard:
            return await handler(request)
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response({"error": "this agent serves logs to the servers of its cluster only"},
                                     status=403)
        return await handler(request)

    return check
