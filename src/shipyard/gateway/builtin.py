"""What a gateway worker answers itself on its own port: `GET /docs` (Swagger UI), `/docs/openapi.json` (every routed
service's OpenAPI merged) and `/docs/assets/*` (the packaged swagger-ui files).

Owns fetching the services' /openapi.json from their passing instances and a short cache of the merged document;
never proxies a request, never writes the store, never fetches from anywhere but the routed instances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from shipyard.gateway.docs import DOCS_PATH, SPEC_PATH, Response, docs_response

if TYPE_CHECKING:
    from shipyard.gateway.table import Backend, RouteTable

log = logging.getLogger("shipyard.gateway.builtin")

DOCS_PREFIX = DOCS_PATH.encode()
OPENAPI_PATH = "/openapi.json"
SERVICE_DOC_TTL = 10.0  # seconds a service's fetched /openapi.json (or its absence) is reused
MERGED_TTL = 2.0  # seconds the merged document is reused for one route table
FETCH_TIMEOUT = 2.0  # per instance; the next passing instance is tried after a failure
MAX_DOC_SIZE = 8 * 1024 * 1024


def is_builtin_path(path: bytes) -> bool:
    """True for the paths this module answers (they take precedence over routes: /docs belongs to the gateway)."""
    return path.startswith(DOCS_PREFIX) and (len(path) == len(DOCS_PREFIX) or path[len(DOCS_PREFIX)] == 47)  # "/"


class GatewayBuiltins:
    """One per worker process. `answer(method, path, table)` -> (status, headers, body)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._service_docs: dict[tuple[str, tuple[str, ...]], tuple[float, bytes | None]] = {}
        self._merged: tuple[RouteTable, float, Response | None] | None = None  # (for this table, expiry, response)
        self._building: tuple[RouteTable, asyncio.Task[Response | None]] | None = None

    async def answer(self, method: bytes, path: str, table: RouteTable) -> Response:
        if method != b"GET":
            return 405, [("Content-Type", "application/json"), ("Allow", "GET")], b'{"message":"Method not allowed"}'
        if path == SPEC_PATH:
            response = await self._merged_spec(table)
        else:
            response = await docs_response(path, table, self._fetch)
        return response or (404, [("Content-Type", "application/json")], b'{"message":"Not found"}')

    async def _merged_spec(self, table: RouteTable) -> Response | None:
        merged = self._merged
        if merged is not None and merged[0] is table and merged[1] > time.monotonic():
            return merged[2]
        # Concurrent requests for the document share one build (one fetch per service, not one per request).
        building = self._building
        if building is None or building[0] is not table:
            task = asyncio.ensure_future(docs_response(SPEC_PATH, table, self._fetch))
            building = self._building = (table, task)
            task.add_done_callback(lambda t: self._built(table, t))
        return await asyncio.shield(building[1])

    def _built(self, table: RouteTable, task: asyncio.Task[Response | None]) -> None:
        if self._building is not None and self._building[1] is task:
            self._building = None
        if not task.cancelled() and task.exception() is None:
            self._merged = (table, time.monotonic() + MERGED_TTL, task.result())

    async def _fetch(self, backend: Backend, path: str) -> bytes | None:
        """The body of `path` from the first of the backend's healthy instances that answers 200 (under the
        backend's service path first, then at the instance's root)."""
        targets = tuple(t.address for t in backend.spec.targets)
        key = (backend.name, targets)
        cached = self._service_docs.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        base = backend.spec.path.rstrip("/")
        paths = (base + path, path) if base else (path,)
        body = None
        for address in targets:
            for candidate in paths:
                try:
                    body = await self._get(f"http://{address}{candidate}")
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    log.debug("no %s from %s at %s: %s", candidate, backend.name, address, exc)
                    break  # this instance is unreachable: try the next one
                if body is not None:
                    break
            if body is not None:
                break
        if len(self._service_docs) > 1000:
            self._service_docs.clear()
        self._service_docs[key] = (time.monotonic() + SERVICE_DOC_TTL, body)
        return body

    async def _get(self, url: str) -> bytes | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                                                  headers={"Accept": "application/json"})
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                return None
            if (response.content_length or 0) > MAX_DOC_SIZE:
                return None
            body = await response.content.read(MAX_DOC_SIZE + 1)
            return body if len(body) <= MAX_DOC_SIZE else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

