"""Consul /v1/agent endpoints about the running agent itself: reload, leave, force-leave, metrics and monitor.

Answers for this server process as Consul's agent answers for itself; it never changes the catalog, except for
force-leave, which removes a member that is already gone (agent/reaper.py does the writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from datetime import UTC, datetime

import orjson
from aiohttp import web

from shipyard.agent.reaper import find_member, force_leave
from shipyard.api.consul.common import ConsulError, bad_request, json_response, query_flag
from shipyard.api.context import Platform, platform_of

routes = web.RouteTableDef()
log = logging.getLogger("shipyard.agent.api")

# ---- reload, leave, force-leave --------------------------------------------------------------------------------


@routes.put("/v1/agent/reload")
async def agent_reload(request: web.Request) -> web.Response:
    # The server's configuration is its command line (and environment), read once at start: nothing on disk to
    # read again, so a reload succeeds and changes nothing, as Consul's does when its files are unchanged.
    log.info("agent reload requested: the configuration is the command line; restart the server to change it")
    return json_response(None)


LEAVE_GRACE = 0.2  # seconds for the 200 to reach the client before the shutdown starts


@routes.put("/v1/agent/leave")
async def agent_leave(request: web.Request) -> web.Response:
    # Consul's leave is a graceful leave followed by the agent's shutdown; the server's own SIGTERM path is that
    # shutdown (instances are stopped or left to their shims exactly as on Ctrl-C).
    log.warning("agent leave requested over the API: shutting down")
    asyncio.get_running_loop().call_later(LEAVE_GRACE, os.kill, os.getpid(), signal.SIGTERM)
    return json_response(None)


@routes.put("/v1/agent/force-leave/{node}")
async def agent_force_leave(request: web.Request) -> web.Response:
    """A failed (or left) agent or server becomes left at once: its node leaves the catalog and placement (its
    instances are placed elsewhere); ?prune removes it from the members too (agent/reaper.py). A live member, this
    server included, is left alone, as serf does (it would rejoin at once). ?wan: the servers' pool only."""
    platform = platform_of(request)
    node = request.match_info["node"]
    wan = query_flag(request, "wan")
    me = f"{platform.node.name}.{platform.node.datacenter}" if wan else platform.node.name
    if node == me:
        return json_response(None)
    record = await find_member(platform.store, node.removesuffix(f".{platform.node.datacenter}") if wan else node)
    if record is None or (wan and record.kind != "server"):
        # Consul's agent.ForceLeave refuses a name that is no member of the pool (?prune does not change that).
        raise ConsulError(500, f"agent: No node found with name '{node}'")
    prune = query_flag(request, "prune")
    if await force_leave(platform.store, platform.catalog, record, prune=prune):
        log.warning("force-leave: %s %s %s", record.kind, record.name,
                    "removed from the members" if prune else "left; its node is out of the catalog and placement")
        from shipyard.api.native.service_tokens_api import forget_node_tokens  # native imports consul

        await forget_node_tokens(platform, record.name)  # its instances' ACL tokens
    return json_response(None)


# ---- metrics ---------------------------------------------------------------------------------------------------


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


async def gauges(platform: Platform) -> list[tuple[str, float]]:
    """Consul's gauge names where Shipyard has the same quantity (the state counts; the runtime ones measure this
    Python process: its resident memory, its asyncio tasks in place of goroutines)."""
    snap = await platform.catalog.snapshot()
    names = {e.data.get("Service") for e in snap.services.values()}
    return [
        ("consul.runtime.alloc_bytes", _rss_bytes()),
        ("consul.runtime.num_goroutines", float(len(asyncio.all_tasks()))),
        ("consul.state.nodes", float(len(snap.nodes))),
        ("consul.state.services", float(len(names))),
        ("consul.state.service_instances", float(len(snap.services))),
        ("consul.state.checks", float(len(snap.checks))),
    ]


METRICS_INTERVAL = 10  # seconds: Consul's in-memory sink reports the current 10s interval


def _interval_start() -> str:
    start = int(time.time()) // METRICS_INTERVAL * METRICS_INTERVAL
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def prometheus_text(values: list[tuple[str, float]]) -> str:
    lines = []
    for name, value in values:
        metric = name.replace(".", "_")
        lines += [f"# HELP {metric} {name}", f"# TYPE {metric} gauge", f"{metric} {value:g}"]
    return "\n".join(lines) + "\n"


@routes.get("/v1/agent/metrics")
async def agent_metrics(request: web.Request) -> web.Response:
    values = await gauges(platform_of(request))
    if request.query.get("format") == "prometheus":
        return web.Response(body=prometheus_text(values).encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return json_response({
        "Timestamp": _interval_start(),
        "Gauges": [{"Name": name, "Value": value, "Labels": {}} for name, value in values],
        "Points": [],
        "Counters": [],
        "Samples": [],
    })


# ---- monitor: the agent's log, streamed ------------------------------------------------------------------------

# hclog's level names (Consul validates ?loglevel= with hclog.LevelFromString); trace is below Python's DEBUG.
MONITOR_LEVELS = {"trace": 5, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                  "error": logging.ERROR, "off": logging.CRITICAL + 10}
MONITOR_BUFFER = 512  # lines held for a slow reader; past that they are dropped, as Consul's monitor drops them
_HCLOG_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR",
                logging.CRITICAL: "ERROR"}


class MonitorHandler(logging.Handler):
    """Copies log records into one monitor request's queue, from any thread, never blocking the logger."""

    def __init__(self, level: int, loop: asyncio.AbstractEventLoop, *, as_json: bool) -> None:
        super().__init__(level)
        self.loop = loop
        self.as_json = as_json
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(MONITOR_BUFFER)
        self.dropped = 0

    def render(self, record: logging.LogRecord) -> bytes:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        level = _HCLOG_NAMES.get(record.levelno, "TRACE" if record.levelno < logging.DEBUG else "INFO")
        message = record.getMessage()
        if self.as_json:
            return orjson.dumps({"@level": level.lower(), "@message": message, "@module": record.name,
                                 "@timestamp": stamp}) + b"\n"
        return f"{stamp} [{level}] {' ' * (5 - len(level))}{record.name}: {message}\n".encode()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.render(record)
        except Exception:  # a record whose message cannot be formatted must not break the server's logging
            return
        self.loop.call_soon_threadsafe(self._put, line)

    def _put(self, line: bytes) -> None:
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1


def monitor_level(request: web.Request) -> int:
    raw = request.query.get("loglevel", "") or "INFO"
    level = MONITOR_LEVELS.get(raw.strip().lower())
    if level is None:
        raise bad_request(f"Unknown log level: {raw}")
    return level


async def _stream(request: web.Request, response: web.StreamResponse, handler: MonitorHandler) -> None:
    while request.transport is not None and not request.transport.is_closing():
        try:
            line = await asyncio.wait_for(handler.queue.get(), 1.0)
        except TimeoutError:
            continue  # wake up now and then to notice a client that went away
        await response.write(line)


@routes.get("/v1/agent/monitor")
async def agent_monitor(request: web.Request) -> web.StreamResponse:
    level = monitor_level(request)
    handler = MonitorHandler(level, asyncio.get_running_loop(), as_json=query_flag(request, "logjson"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)  # headers now, as Consul flushes them before the first line
    logger = logging.getLogger("shipyard")
    logger.addHandler(handler)
    try:
        with contextlib.suppress(ConnectionError):
            await _stream(request, response, handler)
    finally:
        logger.removeHandler(handler)
    return response
