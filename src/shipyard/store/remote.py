"""A Store that lives in another process: the server's /api/v1/store over HTTP.

Gateway workers, remote agents and tools use it to read, write and watch; it keeps no state of its
own beyond connections, and it never opens the server's SQLite file.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from shipyard.store.base import (
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    RangeResult,
    StoreError,
    TxnResult,
    WatchOverflow,
    require_bytes,
)
from shipyard.tokens import token_headers

BASE = "/api/v1/store"


def _kv(raw: dict[str, Any], ns: str = "") -> KeyValue:
    return KeyValue(
        raw["key"][len(ns):],
        base64.b64decode(raw["value"]),
        raw["create_revision"],
        raw["mod_revision"],
        raw["version"],
        raw["lease"],
    )


def _event(raw: dict[str, Any], ns: str = "") -> Event:
    prev = raw.get("prev_kv")
    return Event(EventType[raw["type"]], _kv(raw["kv"], ns), _kv(prev, ns) if prev else None)


_LEASE_NOT_FOUND = re.compile(r"lease (\d+) not found")


class RemoteWatcher:
    """Reads the server's NDJSON watch stream; yields one batch per revision."""

    def __init__(self, store: RemoteStore, key: str, prefix: bool, from_revision: int) -> None:
        self._store = store
        self._params = {"prefix": "1" if prefix else "0", "from_revision": str(from_revision)}
        self._path = f"{BASE}/watch/{quote(store.namespace + key, safe='/')}"
        self._response: aiohttp.ClientResponse | None = None
        self._cancelled = False

    def __aiter__(self) -> RemoteWatcher:
        return self

    async def _open(self) -> aiohttp.ClientResponse:
        session = await self._store.session()
        try:
            # The server sends a heartbeat line every WATCH_HEARTBEAT (15 s): a stream silent for much longer is
            # dead (a cut link), and the follower opens it again (on the next server if there are several).
            response = await session.get(self._store.base_url + self._path, params=self._params,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=40))
        except (aiohttp.ClientError, TimeoutError):
            self._store.next_server()
            raise
        if response.status == 410:
            body = await response.json()
            response.release()
            compacted = Compacted(body.get("detail", {}).get("compact_revision", 0))
            self._store._compact_revision = max(self._store._compact_revision, compacted.compact_revision)
            raise compacted
        if response.status != 200:
            text = await response.text()
            response.release()
            raise StoreError(f"watch failed ({response.status}): {text}")
        await response.content.readline()  # the opening line: the revision the watch started at
        return response

    async def __anext__(self) -> list[Event]:
        if self._cancelled:
            raise StopAsyncIteration
        if self._response is None:
            self._response = await self._open()
        while True:
            line = await self._response.content.readline()
            if not line:
                raise StopAsyncIteration
            if not line.strip():
                continue  # heartbeat
            data = orjson.loads(line)
            if "error" in data:
                raise WatchOverflow(data["error"])
            if data["events"]:
                events = [_event(e, self._store.namespace) for e in data["events"]]
                # What a watch saw is seen too: readers that compare a cached answer with `revision` (an agent's
                # DNS) learn of changes made elsewhere, not only of this client's own reads and writes.
                self._store._seen(events[-1].revision)
                return events

    async def start(self) -> RemoteWatcher:
        """Opens the stream now, so that events from this point on are not missed."""
        if self._response is None:
            self._response = await self._open()
        return self

    def cancel(self) -> None:
        self._cancelled = True
        if self._response is not None:
            self._response.close()


class RemoteStore:
    """Store protocol over HTTP. `watch()` returns a watcher whose stream opens on first use
    (or `await watcher.start()`); pass from_revision to be gap-free across reconnects.

    Given several servers (of one cluster, so one store), it uses one at a time: a server that refuses or cannot be
    connected to is skipped for the next at once (the request never left); after a failure once the request may have
    been sent, the error is raised and the next call goes to the next server (a write is never sent twice)."""

    def __init__(self, base_url: str | Sequence[str], *, namespace: str = "", ssl_context: ssl.SSLContext | None = None,
                 token: str | None = None, timeout: aiohttp.ClientTimeout | None = None) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("RemoteStore needs at least one server URL")
        self.base_urls = [url.rstrip("/") for url in urls]
        self._current = 0
        self.timeout = timeout or aiohttp.ClientTimeout(total=30)
        self.headers = token_headers(token)  # an ACL token (default: SHIPYARD_HTTP_TOKEN / CONSUL_HTTP_TOKEN)
        self.ssl_context = ssl_context  # an https:// server: its CA, and our certificate if it verifies clients
        # Like EtcdStore's: every key lives under it on the server, and callers never see it.
        self.namespace = namespace
        self._session: aiohttp.ClientSession | None = None
        self._revision = 0
        self._compact_revision = 0

    @property
    def base_url(self) -> str:
        """The server requests go to now."""
        return self.base_urls[self._current]

    def next_server(self) -> None:
        """Use the next server from now on (one did not answer)."""
        self._current = (self._current + 1) % len(self.base_urls)

    def _path(self, key: str) -> str:
        return f"{BASE}/kv/{quote(self.namespace + key, safe='/')}"

    def _seen(self, revision: int) -> int:
        self._revision = max(self._revision, revision)
        return revision

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context) if self.ssl_context is not None else None
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector,
                                                  headers=self.headers)
            # aiohttp sends a PUT or DELETE again on a new connection when the server dropped the first one; a
            # call that may have been sent is never sent twice here (the caller is told), so that retry is off.
            self._session._retry_connection = False
        return self._session

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None, data: Any = None,
                    json_body: Any = None) -> Any:
        headers = None
        if json_body is not None:
            # The server takes structured bodies only with their real type (its guard refuses browser-sendable ones).
            data, headers = orjson.dumps(json_body), {"Content-Type": "application/json"}
        for attempt in range(len(self.base_urls)):
            try:
                return await self._send(method, path, params, data, headers)
            except aiohttp.ClientConnectorError as exc:  # no connection: the request never left, try the next one
                failed = self.base_url
                self.next_server()
                if attempt == len(self.base_urls) - 1:
                    raise StoreError(f"store at {failed} unreachable: {exc}", status=503) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                failed = self.base_url
                if len(self.base_urls) > 1:
                    self.next_server()
                raise StoreError(f"store at {failed} unreachable: {exc or type(exc).__name__}", status=503) from None
        raise AssertionError("unreachable")

    async def _send(self, method: str, path: str, params: dict[str, str] | None, data: Any,
                    headers: dict[str, str] | None) -> Any:
        session = await self.session()
        async with session.request(method, self.base_url + path, params=params, data=data,
                                   headers=headers) as response:
            body = await response.read()
            if response.status >= 400:
                raise self._error(response.status, body)
            return orjson.loads(body)

    def _error(self, status: int, body: bytes) -> StoreError:
        """The server's typed error again, so callers catch the same exceptions as with a local store."""
        detail: Any = None
        try:
            data = orjson.loads(body)
            message, detail = str(data.get("error", "")), data.get("detail")
        except (orjson.JSONDecodeError, AttributeError):
            message = body.decode(errors="replace")
        lease = _LEASE_NOT_FOUND.search(message)
        if status == 404 and lease:
            return LeaseNotFound(int(lease.group(1)))
        if status == 410:
            revision = detail.get("compact_revision", 0) if isinstance(detail, dict) else 0
            self._compact_revision = max(self._compact_revision, revision)
            return Compacted(revision or self._compact_revision)
        return StoreError(message or f"HTTP {status}", status=status)

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        """The highest compaction this client has seen (by compacting, or by a watch refused with 410)."""
        return self._compact_revision

    async def get(self, key: str) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def range(self, key: str, *, prefix: bool = False) -> RangeResult:
        data = await self._call("GET", self._path(key), params={"prefix": "1" if prefix else "0"})
        return RangeResult([_kv(k, self.namespace) for k in data["kvs"]], self._seen(data["revision"]), data["index"])

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        require_bytes((Put(key, value, lease),))
        data = await self._call("PUT", self._path(key), params={"lease": str(lease)}, data=value)
        return self._seen(data["revision"])

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        data = await self._call("DELETE", self._path(key), params={"prefix": "1" if prefix else "0"})
        return data["deleted"], self._seen(data["revision"])

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        require_bytes((*success, *failure))
        ns = self.namespace

        def op_json(op: Op) -> dict[str, Any]:
            if isinstance(op, Put):
                return {"op": "put", "key": ns + op.key, "value": base64.b64encode(op.value).decode(),
                        "lease": op.lease}
            if isinstance(op, Delete):
                return {"op": "delete", "key": ns + op.key, "prefix": op.prefix}
            assert isinstance(op, Get)
            return {"op": "get", "key": ns + op.key, "prefix": op.prefix}

        def compare_json(c: Compare) -> dict[str, Any]:
            value: Any = c.value
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode()
            return {"key": ns + c.key, "target": c.target, "op": c.op, "value": value}

        body = {
            "compare": [compare_json(c) for c in compares],
            "success": [op_json(op) for op in success],
            "failure": [op_json(op) for op in failure],
        }
        data = await self._call("POST", f"{BASE}/txn", json_body=body)
        responses: list[object] = []
        for raw in data["responses"]:
            if raw is None:
                responses.append(None)
            elif isinstance(raw, dict):
                responses.append(_kv(raw, ns))
            else:
                responses.append([_kv(k, ns) for k in raw])
        return TxnResult(data["succeeded"], self._seen(data["revision"]), responses)

    def watch(self, key: str, *, prefix: bool = False, from_revision: int = 0,
              prev_kv: bool = True) -> RemoteWatcher:  # the server's store API always sends them
        return RemoteWatcher(self, key, prefix, from_revision)

    async def grant_lease(self, ttl: int) -> Lease:
        data = await self._call("POST", f"{BASE}/leases", json_body={"ttl": ttl})
        return Lease(data["id"], data["ttl"])

    async def keepalive(self, lease: int) -> int:
        try:
            return int((await self._call("PUT", f"{BASE}/leases/{lease}/keepalive"))["ttl"])
        except StoreError as exc:
            if exc.status == 404:
                raise LeaseNotFound(lease) from None
            raise

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call("DELETE", f"{BASE}/leases/{lease}")
        except StoreError as exc:
            if exc.status == 404:
                raise LeaseNotFound(lease) from None
            raise

    async def compact(self, revision: int) -> None:
        """The server's POST /api/v1/store/compact (an operator's tool: the server compacts on its own too)."""
        data = await self._call("POST", f"{BASE}/compact", json_body={"revision": revision})
        self._compact_revision = max(self._compact_revision, int(data["compact_revision"]))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)
