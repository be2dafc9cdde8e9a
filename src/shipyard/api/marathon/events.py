"""Marathon's event stream (/v2/events, text/event-stream), derived from store watches on jobs, versions,
deployments and allocation statuses, so it works the same whichever process made the change.

It only reads and reports: it must never write the store, and a slow or vanished subscriber costs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from shipyard.api.context import platform_of
from shipyard.api.marathon.apps import app_from_spec, app_id_of
from shipyard.api.marathon.endpoints import jobs_of
from shipyard.api.marathon.views import TASK_STATES, deployment_actions, iso, plan_json
from shipyard.errors import NotFound
from shipyard.scheduler.jobs import JobService, decode_version
from shipyard.scheduler.model import Deployment
from shipyard.scheduler.records import (
    ALLOC_STATUS,
    DEPLOYMENTS,
    JOB_VERSIONS,
    JOBS,
    AllocStatus,
    alloc_key,
    decode_alloc,
    decode_deployment,
    decode_status,
    split_node_alloc,
)
from shipyard.store import Event, EventType, Store, follow_prefix

log = logging.getLogger("shipyard.marathon.events")

routes = web.RouteTableDef()
WATCHED = (JOBS, JOB_VERSIONS, DEPLOYMENTS, ALLOC_STATUS)
KEEPALIVE_SECONDS = 15.0
FINISHED_DEPLOYMENT = {"successful": "deployment_success", "failed": "deployment_failed",
                       "cancelled": "deployment_failed"}

Outgoing = tuple[str, dict[str, Any]]


def now_iso() -> str:
    return iso(time.time()) or ""


class EventTranslator:
    """Turns store events into Marathon events; remembers only what it needs to report transitions once."""

    def __init__(self, store: Store, jobs: JobService) -> None:
        self.store = store
        self.jobs = jobs
        self.task_states: dict[str, tuple[str, str | None]] = {}  # alloc -> (task state, client)

    async def prime(self) -> None:
        """Remember current task states, so the first change of each is reported against what it was."""
        for kv in (await self.store.range(ALLOC_STATUS, prefix=True)).kvs:
            with contextlib.suppress(Exception):
                status = decode_status(kv.value)
                alloc_id = split_node_alloc(kv.key, ALLOC_STATUS)[1]
                self.task_states[alloc_id] = (TASK_STATES.get(status.client, "TASK_STAGING"), status.client)

    async def translate(self, event: Event) -> list[Outgoing]:
        key = event.kv.key
        try:
            if key.startswith(JOB_VERSIONS):
                return await self._version(event)
            if key.startswith(JOBS):
                return self._job(event)
            if key.startswith(DEPLOYMENTS):
                return await self._deployment(event)
            if key.startswith(ALLOC_STATUS):
                return await self._status(event)
        except Exception:  # one unreadable record must not end the subscriber's stream
            log.debug("marathon events: cannot translate %s", key, exc_info=True)
        return []

    async def _version(self, event: Event) -> list[Outgoing]:
        if event.type != EventType.PUT or event.prev_kv is not None:
            return []
        version = decode_version(event.kv.value)
        app = app_from_spec(version.spec)
        app["version"] = iso(version.created_at)
        return [("api_post_event", {"clientIp": None, "uri": f"/v2/apps{app['id']}", "appDefinition": app})]

    def _job(self, event: Event) -> list[Outgoing]:
        if event.type != EventType.DELETE:
            return []
        job_id = event.kv.key[len(JOBS):]
        return [("app_terminated_event", {"appId": app_id_of(unquote(job_id))})]

    async def _deployment(self, event: Event) -> list[Outgoing]:
        if event.type != EventType.PUT:
            return []
        d = decode_deployment(event.kv.value)
        before = decode_deployment(event.prev_kv.value) if event.prev_kv is not None else None
        same = before is not None and before.id == d.id
        if d.active and not same:
            plan, steps = await self._plan(d)
            return [("deployment_info", {"plan": plan, "currentStep": {"actions": [
                {"action": a, "app": app_id_of(d.job)} for a in steps[0]]}})]
        if d.status in FINISHED_DEPLOYMENT and not (same and before is not None and before.status == d.status):
            plan, _ = await self._plan(d)
            return [(FINISHED_DEPLOYMENT[d.status], {"id": d.id, "plan": plan})]
        return []

    async def _plan(self, d: Deployment) -> tuple[dict[str, Any], list[list[str]]]:
        try:
            job = await self.jobs.get(d.job)
            versions = {v.version: v.created_at for v in await self.jobs.versions(d.job)}
            tasks = await self.jobs.allocations(d.job)
        except NotFound:
            steps = [["StopApplication"]]
            return plan_json(d, str(d.version), steps, None), steps
        steps = deployment_actions(d, len(versions), tasks, job.spec.template_hash())
        version = iso(versions[d.version]) if d.version in versions else str(d.version)
        return plan_json(d, version or "", steps, app_from_spec(job.spec)), steps

    async def _status(self, event: Event) -> list[Outgoing]:
        node, alloc_id = split_node_alloc(event.kv.key, ALLOC_STATUS)
        status: AllocStatus | None = None
        if event.type == EventType.PUT:
            status = decode_status(event.kv.value)
            state, client = TASK_STATES.get(status.client, "TASK_STAGING"), status.client
        else:
            state, client = "TASK_KILLED", None
            if event.prev_kv is not None:
                with contextlib.suppress(Exception):
                    status = decode_status(event.prev_kv.value)
        previous = self.task_states.get(alloc_id)
        if client is None:
            self.task_states.pop(alloc_id, None)
        else:
            self.task_states[alloc_id] = (state, client)
        job_id = alloc_id.partition(".")[0]  # the planner's alloc ids start with the job id
        version: Any = None
        record = await self.store.get(alloc_key(node, alloc_id))
        if record is not None:
            with contextlib.suppress(Exception):
                alloc = decode_alloc(record.value)
                job_id, version = alloc.job, alloc.version
        app_id = app_id_of(job_id)
        if version is not None:
            with contextlib.suppress(Exception):
                version = iso((await self.jobs.version(job_id, version)).created_at)
        out: list[Outgoing] = []
        host = status.address if status is not None else "127.0.0.1"
        if previous is None or previous[0] != state:
            out.append(("status_update_event", {
                "slaveId": node, "taskId": alloc_id, "taskStatus": state,
                "message": status.message if status is not None else "", "appId": app_id, "host": host,
                "ipAddresses": [{"ipAddress": host, "protocol": "IPv4"}],
                "ports": sorted(status.ports.values()) if status is not None else [],
                "version": str(version) if version is not None else None,
            }))
        was_healthy = previous is not None and previous[1] == "healthy"
        if client in ("healthy", "unhealthy") or (was_healthy and client != "healthy"):
            alive = client == "healthy"
            if alive != was_healthy:
                out.append(("health_status_changed_event", {
                    "appId": app_id, "taskId": alloc_id, "instanceId": alloc_id, "alive": alive,
                    "version": str(version) if version is not None else None,
                }))
        return out


def sse_frame(event_type: str, data: dict[str, Any]) -> bytes:
    payload = {"eventType": event_type, "timestamp": now_iso(), **data}
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def pump(store: Store, prefix: str, from_revision: int, queue: asyncio.Queue[Event]) -> None:
    """Feeds one prefix's changes into the queue, with the store's follow_prefix: after a watch that fell behind it
    resumes where it was; after compaction removed that point, from the current revision (events are not state:
    there is nothing to re-read)."""
    seen = from_revision - 1

    async def forward(batch: list[Event]) -> None:
        nonlocal seen
        for event in batch:
            await queue.put(event)
            seen = event.revision

    async def resume_point() -> int:
        return seen if seen >= store.compact_revision else store.revision

    await follow_prefix(store, prefix, forward, resume_point, from_revision=seen, name=f"marathon events {prefix}")


@routes.get("/events")
async def event_stream(request: web.Request) -> web.StreamResponse:
    platform = platform_of(request)
    store = platform.store
    wanted = set(request.query.getall("event_type", []))
    translator = EventTranslator(store, jobs_of(request))
    start = store.revision + 1
    await translator.prime()
    queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
    pumps = [asyncio.create_task(pump(store, prefix, start, queue)) for prefix in WATCHED]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        if not wanted or "event_stream_attached" in wanted:
            await response.write(sse_frame("event_stream_attached", {"remoteAddress": request.remote}))
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b":\n\n")  # a comment line keeps proxies and idle timeouts from cutting us
                continue
            for event_type, data in await translator.translate(event):
                if not wanted or event_type in wanted:
                    await response.write(sse_frame(event_type, data))
    except ConnectionResetError:
        pass  # the subscriber went away
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return response
