"""How the SDK reaches a Shipyard server: its address from the environment, the SDK's errors, and Consul-style
blocking queries repeated in a loop (the way client and config stay current without polling).

It speaks HTTP to the server's public API only; it never imports the server's internals and never raises out of a
watch loop because the server is briefly unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shipyard.tls.contexts import ClientTls

log = logging.getLogger("shipyard.sdk")

DEFAULT_ADDR = "127.0.0.1:8500"
ADDR_VARIABLES = ("SHIPYARD_ADDR", "SHIPYARD_HTTP_ADDR", "CONSUL_HTTP_ADDR")
TOKEN_VARIABLES = ("SHIPYARD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")
BLOCKING_WAIT = 60.0  # seconds a blocking query may hang on the server before it answers "no change"
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0


class SdkError(Exception):
    """Base of the errors the SDK raises to the code using it."""


class ServerUnreachable(SdkError):
    """The Shipyard server did not answer (not running, wrong SHIPYARD_ADDR)."""


def server_url(addr: str | None = None) -> str:
    """Base URL of the Shipyard server: `addr`, else $SHIPYARD_ADDR, $SHIPYARD_HTTP_ADDR (what the scheduler
    gives an instance), $CONSUL_HTTP_ADDR, else 127.0.0.1:8500. host:port or a full http(s) URL."""
    if not addr:
        addr = next((os.environ[v] for v in ADDR_VARIABLES if os.environ.get(v)), DEFAULT_ADDR)
    return ClientTls.from_env().base_url(addr)  # host:port is https with CONSUL_HTTP_SSL / SHIPYARD_HTTP_SSL


def control_verify(base_url: str) -> ssl.SSLContext | bool:
    """httpx's verify= (aiohttp's ssl=) for the server at `base_url`: for https, the CA of SHIPYARD_CACERT /
    CONSUL_CACERT and the client certificate of *_CLIENT_CERT / *_CLIENT_KEY (a server with --verify-incoming)."""
    return ClientTls.from_env().httpx_verify(base_url)


def token_headers() -> dict[str, str]:
    """The ACL token this instance was handed (SHIPYARD_HTTP_TOKEN; CONSUL_HTTP_TOKEN as Consul's tools read it)."""
    token = next((os.environ[v].strip() for v in TOKEN_VARIABLES if os.environ.get(v, "").strip()), "")
    return {"X-Consul-Token": token} if token else {}


def control_client(base_url: str, *, wait: float = BLOCKING_WAIT) -> httpx.AsyncClient:
    # Reads must outlast a blocking query (wait plus Consul's wait/16 jitter); connects to a local server are quick.
    # trust_env=False: a proxy configured for the outside world must not sit between a service and its server.
    timeout = httpx.Timeout(wait + wait / 16 + 10.0, connect=3.0)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False, headers=token_headers(),
                             verify=control_verify(base_url))


def _index_of(response: httpx.Response) -> int:
    try:
        return int(response.headers.get("X-Consul-Index", "0"))
    except ValueError:
        return 0


async def blocking_watch(
    http: httpx.AsyncClient, path: str, params: dict[str, Any] | None = None, *, wait: float = BLOCKING_WAIT
) -> AsyncIterator[tuple[int, Any]]:
    """Yields (status, JSON body or None) for the first answer of GET `path`, then again each time the server's
    index moves (Consul blocking queries: `?index=<last>&wait=`). Only 200 and 404 are answers (404 is how the KV
    says "nothing under this prefix"); other statuses and connection errors are logged and retried with backoff,
    so a server restart is ridden out and the caller keeps its last good result meanwhile."""
    index = 0
    delay = BACKOFF_FIRST
    failing = False
    while True:
        query = dict(params or {})
        if index:
            query.update(index=str(index), wait=f"{wait:g}s")
        try:
            response = await http.get(path, params=query)
            if response.status_code not in (200, 404):
                raise httpx.HTTPStatusError(
                    f"{response.status_code} {response.text[:200]}", request=response.request, response=response
                )
        except (httpx.HTTPError, ValueError) as exc:
            if not failing:
                log.warning("watching %s%s failed, retrying: %s", http.base_url, path, exc)
                failing = True
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        if failing:
            log.info("watching %s%s works again", http.base_url, path)
        failing, delay = False, BACKOFF_FIRST
        new_index = _index_of(response)
        if index and new_index == index:
            continue  # the wait ran out with nothing new
        # Consul's rule: an index that went backwards (server state reset) restarts the watch from scratch.
        index = new_index if new_index > 0 else 1
        body = response.json() if response.status_code == 200 and response.content else None
        yield response.status_code, body
