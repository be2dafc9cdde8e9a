"""Bus plumbing shared by the services: publishing domain events, and running a service's own subscribers
(shipyard.sdk.bus Worker) inside its process for as long as it serves.

It must never swallow a handler's failure: a raised exception is what makes the bus retry the message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from shipyard.sdk import Service
from shipyard.sdk.bus import BusApp, Worker

log = logging.getLogger("mediahub.events")


def run_subscribers(service: Service, bus: BusApp) -> dict[str, Any]:
    """Starts `bus`'s @subscribe/@task handlers when the service starts; stops them (gracefully) when it stops.
    Returns a status dict the service's health check can read ("running": the worker loop is alive)."""
    state: dict[str, Any] = {"running": False, "task": None}
    stop = asyncio.Event()

    async def worker_loop() -> None:
        grace = float(os.environ.get("SHIPYARD_STOP_GRACE") or 5)
        while not stop.is_set():
            try:
                state["running"] = True
                await Worker(bus, stop_grace=max(1.0, grace - 1)).run(stop)
            except Exception:  # the bus is away (server restarting): try again shortly, never die silently
                state["running"] = False
                log.exception("subscriber loop failed; starting it again in 1s")
                await asyncio.sleep(1.0)
        state["running"] = False

    @service.on_startup
    async def start_subscribers() -> None:
        state["task"] = asyncio.create_task(worker_loop())

    @service.on_shutdown
    async def stop_subscribers() -> None:
        stop.set()
        if state["task"] is not None:
            await state["task"]

    return state


def subscribing_service(app: FastAPI, name: str, bus: BusApp, reachable: Callable[[], Awaitable[bool]]) -> Service:
    """The Service of an app that also follows the bus: healthy only while its database answers and its subscriber
    loop runs (an instance that stopped consuming must not look healthy)."""
    subscribers: dict[str, Any] = {"running": False}

    async def healthy() -> bool:
        return await reachable() and subscribers["running"]

    service = Service(app, name=name, health=healthy)
    subscribers = run_subscribers(service, bus)  # healthy() reads this variable, so it sees the live status
    return service
