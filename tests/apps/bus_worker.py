"""A worker app for the bus tests: one task queue and one event subscription, named by the environment.

Every step is appended as a JSON line to $OUT_FILE, so a test can see what ran, in which process, how often.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from shipyard.sdk.bus import BusApp, Reject

bus = BusApp()
OUT = os.environ["OUT_FILE"]


def note(**event: object) -> None:
    with open(OUT, "a") as fh:
        fh.write(json.dumps({**event, "pid": os.getpid()}) + "\n")


@bus.task(os.environ["WORK_QUEUE"], max_attempts=3, prefetch=2)
async def work(payload: dict, message) -> None:  # type: ignore[no-untyped-def]
    note(event="start", id=payload["id"], attempt=message.attempts)
    action = payload.get("action")
    marker = payload.get("block_once")
    if marker and not os.path.exists(marker):
        # The first worker to take this task hangs in it (until killed); later ones complete it.
        open(marker, "w").close()
        await asyncio.sleep(payload.get("seconds", 3600))
    elif action == "sleep":
        await asyncio.sleep(payload["seconds"])
    elif action == "reject":
        raise Reject("bad input")
    elif action == "flaky" and message.attempts < 2:
        raise RuntimeError("flaky the first time")
    elif action == "crash":
        raise RuntimeError("always fails")
    note(event="done", id=payload["id"], attempt=message.attempts)


@bus.subscribe("assets.*", group=os.environ["EVENT_GROUP"])
def index(payload: dict, message) -> None:  # type: ignore[no-untyped-def]
    # A sync handler: the runtime runs it in a thread.
    time.sleep(payload.get("seconds", 0))
    note(event="event", id=payload["id"], topic=message.topic)
