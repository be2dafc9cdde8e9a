"""What every Consul endpoint shares: headers, error texts, durations, bodies and blocking queries.

Consul answers errors as plain text with its own wording; clients match on those, so we do too.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from shipyard.api.body import read_limited
from shipyard.api.context import platform_of
from shipyard.errors import PayloadTooLarge
from shipyard.registry.filter import Filter, FilterError, Schema, compile_filter
from shipyard.store import Compacted, Store

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
MAX_JSON_BODY = 1 << 20  # Consul's default http_max_header/body limits are of this order


class ConsulError(web.HTTPException):
    """An error answered the way Consul does: a status code and a plain-text message."""

    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        super().__init__(text=message, content_type="text/plain")


def bad_request(message: str) -> ConsulError:
    return ConsulError(400, message)


def not_found(message: str) -> ConsulError:
    return ConsulError(404, message)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go's time.Duration is an int64 of nanoseconds: Consul cannot hold a longer one, and we store durations in that
# shape too ("IntervalDuration"), where a longer one no longer fits a JSON integer.
MAX_DURATION_NS = (1 << 63) - 1
MAX_INDEX = (1 << 64) - 1  # Consul parses ?index= as a uint64


def parse_duration(value: Any, field: str = "duration") -> float:
    """Seconds from a Go duration string ("10s", "1m30s", "500ms") or a number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise bad_request(f"Request decode failed: invalid duration for {field}: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise bad_request(f"Request decode failed: negative duration for {field}")
        if value > MAX_DURATION_NS:
            raise bad_request(f"Request decode failed: duration out of range for {field}: {value:g}")
        return float(value) / 1e9
    if not isinstance(value, str):
        raise bad_request(f"Request decode failed: invalid duration for {field}: {value!r}")
    text = value.strip()
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    sign = 1.0
    if text.startswith("-"):
        sign, pos = -1.0, 1
    if pos == len(text):
        raise bad_request(f'Request decode failed: time: invalid duration "{value}"')
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise bad_request(f'Request decode failed: time: invalid duration "{value}"')
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if sign < 0:
        raise bad_request(f"Request decode failed: negative duration for {field}")
    if total * 1e9 > MAX_DURATION_NS:  # Go's own wording for an overflowing duration
        raise bad_request(f'Request decode failed: time: invalid duration "{value}"')
    return total


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String() of `seconds`, as Consul renders every duration ("0s", "500ms", "1m30s",
    "1h0m0s"); Go clients parse these with time.ParseDuration, which refuses "" (so zero is "0s")."""
    return go_duration(round(seconds * 1e9))


_SUBSECOND_UNITS = (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1))


def go_duration(nanoseconds: int) -> str:
    """Go's Duration.String() of a number of nanoseconds: exact, no float rounding of the fraction."""
    if nanoseconds == 0:
        return "0s"
    sign, ns = ("-", -nanoseconds) if nanoseconds < 0 else ("", nanoseconds)
    if ns < 1_000_000_000:
        unit, size = next((u, size) for u, size in _SUBSECOND_UNITS if ns >= size)
        return f"{sign}{_decimal(ns, size)}{unit}"
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    out = sign + (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{out}{_decimal(rest, 1_000_000_000)}s"


def _decimal(value: int, size: int) -> str:
    whole, fraction = divmod(value, size)
    if not fraction:
        return str(whole)
    digits = str(fraction).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


# Endpoints Consul forwards to the datacenter named by ?dc= (agent endpoints are local and ignore it).
DATACENTER_SCOPED = ("/v1/catalog/", "/v1/health/", "/v1/kv/", "/v1/session/", "/v1/txn", "/v1/status/",
                     "/v1/query", "/v1/coordinate/", "/v1/event/", "/v1/internal/", "/v1/config", "/v1/connect/",
                     "/v1/operator/", "/v1/snapshot", "/v1/discovery-chain/")
NO_PATH_TO_DATACENTER = "No path to datacenter"  # Consul's structs.ErrNoDCPath


@web.middleware
async def datacenter_scope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """?dc= naming a datacenter other than ours: Consul's 500 "No path to datacenter", for every endpoint alike
    (answering with local data instead would hand a client another datacenter's view as if it were the one
    it asked for)."""
    wanted = request.query.get("dc", "")
    scoped = request.path.startswith(DATACENTER_SCOPED) and request.path != "/v1/catalog/datacenters"
    if wanted and scoped and wanted != platform_of(request).node.datacenter:
        raise ConsulError(500, NO_PATH_TO_DATACENTER)
    return await handler(request)


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The request body as JSON, or Consul's 400 "Request decode failed" text."""
    try:
        body = await read_limited(request, MAX_JSON_BODY)
    except PayloadTooLarge:
        raise ConsulError(413, f"Request body too large, max size: {MAX_JSON_BODY} bytes") from None
    if not body.strip():
        if allow_empty:
            return None
        raise bad_request("Request decode failed: EOF")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request decode failed: {exc}") from None


def json_response(data: Any, *, index: int | None = None, status: int = 200) -> web.Response:
    headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
    if index is not None:
        headers["X-Consul-Index"] = str(max(index, 1))
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def request_filter(request: web.Request, schema: dict[str, Schema]) -> Filter | None:
    """The request's ?filter= compiled for records of `schema`; None without one. Checked before any read, so a
    bad expression is Consul's 400 with go-bexpr's text, also on a blocking query."""
    expression = request.query.get("filter", "")
    if not expression:
        return None
    try:
        return compile_filter(expression, schema)
    except FilterError as exc:
        raise bad_request(str(exc)) from None


def query_flag(request: web.Request, name: str) -> bool:
    """Consul treats `?name` (no value) and `?name=true` alike as set."""
    if name not in request.query:
        return False
    return request.query[name].lower() not in ("false", "0")


def blocking_params(request: web.Request) -> tuple[int, float] | None:
    """(index, wait seconds) when the request is a blocking query, else None."""
    raw = request.query.get("index")
    if raw is None or raw == "":
        return None
    # Consul's strconv.ParseUint(raw, 10, 64): ASCII digits only (int() would take "+1", " 1", "1_0") and at
    # most 2^64-1; a larger index is an error, not a wait that never ends. Its texts, without detail.
    digits = raw.lstrip("0") or "0"  # and not int() of thousands of digits (Python refuses past 4300)
    if not (raw.isascii() and raw.isdigit()) or len(digits) > 20 or int(digits) > MAX_INDEX:
        raise bad_request("Invalid index")
    index = int(digits)
    wait = DEFAULT_WAIT
    if "wait" in request.query:
        try:
            wait = parse_duration(request.query["wait"], "wait")
        except ConsulError:
            raise bad_request("Invalid wait time") from None
    wait = min(wait, MAX_WAIT) if wait > 0 else DEFAULT_WAIT
    wait += random.uniform(0, wait / 16)  # Consul's jitter, so watchers don't return in lockstep
    return index, wait


ReadResult = tuple[Any, int, int]  # (result, consul index, store revision read at)

# Re-reads of woken blocking queries that ask the same thing (see same_answer), while one is under way.
_SHARED_READS: dict[Hashable, asyncio.Future[ReadResult]] = {}


def same_answer(request: web.Request) -> Hashable:
    """What makes two requests to a handler whose read depends only on its path and query (and whose result is only
    encoded afterwards) the same read: the path and the query without `index` and `wait`. ACLs filter the encoded
    answer afterwards, per token (api/acl_guard.py), so the token is not part of it."""
    query = tuple(sorted((k, v) for k, v in request.query.items() if k not in ("index", "wait")))
    return request.path, query


async def _shared_read(key: Hashable, read: Callable[[], Awaitable[ReadResult]]) -> ReadResult:
    """One read for every blocking query with the same key woken at the same time: a thousand watchers of a service
    on one server cost one read of the catalog snapshot after a change, not a thousand. The read runs on its own,
    so a watcher that goes away does not cancel it for the others."""
    running = _SHARED_READS.get(key)
    if running is None:
        running = asyncio.ensure_future(read())
        _SHARED_READS[key] = running
        running.add_done_callback(lambda done: _forget_read(key, done))
    return await asyncio.shield(running)


def _forget_read(key: Hashable, done: asyncio.Future[ReadResult]) -> None:
    if _SHARED_READS.get(key) is done:
        del _SHARED_READS[key]
    if not done.cancelled():
        done.exception()  # retrieved: when every watcher left before it ended, nobody else would


async def blocking_query(
    request: web.Request,
    store: Store,
    read: Callable[[], Awaitable[ReadResult]],
    watch_key: str,
    *,
    prefix: bool,
    share: Hashable | None = None,
) -> tuple[Any, int]:
    """Runs `read`, and for a blocking request waits until its index passes the client's one.

    Only changes under `watch_key` wake the wait, so a write elsewhere never returns early; a
    change there that leaves the result's index unchanged keeps waiting until the deadline. With
    `share` (same_answer's key), the queries woken by one change that ask the same thing of the
    same store share one read: the result must then not be changed by the caller."""
    result, index, revision = await read()
    params = blocking_params(request)
    if params is None:
        return result, index
    min_index, wait = params
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while index <= min_index:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        # etcd: the store's one follow stream tells, rather than one etcd watch per blocking query
        shared_wait = getattr(store, "wait_for_change", None)
        woken = None if shared_wait is None else await shared_wait(watch_key, prefix=prefix, after=revision,
                                                                     timeout=remaining)
        if woken is False:
            break
        if woken is None:
            try:
                watcher = store.watch(watch_key, prefix=prefix, from_revision=revision + 1)
            except Compacted:
                return await _reread(read)
            try:
                await asyncio.wait_for(watcher.__anext__(), remaining)
            except (TimeoutError, StopAsyncIteration):
                break
            except Compacted:
                return await _reread(read)
            finally:
                watcher.cancel()
        if share is None:
            result, index, revision = await read()
        else:
            result, index, revision = await _shared_read((id(store), share, revision), read)
    return result, index


async def _reread(read: Callable[[], Awaitable[ReadResult]]) -> tuple[Any, int]:
    result, index, _ = await read()
    return result, index
