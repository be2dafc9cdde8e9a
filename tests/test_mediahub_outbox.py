"""mediahub's transactional outbox against a real server's bus: an event committed with its change is published once
by the request, by the relay when the request's instance died before publishing (once its claim ran out), and after
the bus came back when publishing failed; two relays on one database never send an event twice."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.bus.http_client import HttpBus
from shipyard.sdk.bus import BusApp, Worker
from support import ServerProcess, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "mediahub"))
from mediahub import outbox as outbox_module
from mediahub.database import Database
from mediahub.outbox import Outbox

SCHEMA = "CREATE TABLE IF NOT EXISTS things (id TEXT PRIMARY KEY);" + outbox_module.SCHEMA


async def _until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def subscribed(url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Events on things.* as a subscriber group sees them (started and proven live before the test publishes)."""
    received: list[dict[str, Any]] = []
    app = BusApp(url)

    @app.subscribe("things.*", group="outbox-test")
    async def on_event(event: dict[str, Any]) -> None:
        received.append(event)

    stop = asyncio.Event()
    task = asyncio.create_task(Worker(app, stop_grace=1).run(stop))
    probe = BusApp(url)
    deadline = time.monotonic() + 20
    while not any(e.get("probe") for e in received):
        assert time.monotonic() < deadline, "the subscriber never got a probe"
        await probe.publish("things.probe", {"probe": True})
        await asyncio.sleep(0.2)
    await probe.close()
    await asyncio.sleep(0.3)
    received.clear()
    try:
        yield received
    finally:
        stop.set()
        await task
        await app.close()


def _write(outbox: Outbox, thing: str) -> Any:
    def work(conn: Any) -> int:
        conn.execute("INSERT INTO things (id) VALUES (?)", (thing,))
        return outbox.add(conn, "things.created", {"id": thing})

    return work


async def _left(db: Database) -> int:
    return (await db.query("SELECT COUNT(*) AS n FROM outbox"))[0]["n"]


async def test_outbox_publishes_each_committed_event_once(server: ServerProcess, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "CLAIM_SECONDS", 1.0)
    db = Database(tmp_path / "service.db", SCHEMA)
    bus = BusApp(server.url)
    outbox = Outbox(db, bus)
    async with subscribed(server.url) as received:
        # The request path: commit, then publish what it added; the row is gone once the bus has the event.
        await outbox.send_now([await db.run(_write(outbox, "a"))])
        await _until(lambda: len(received) == 1, "the request's event")
        assert received == [{"id": "a"}] and await _left(db) == 0

        # The instance died between its commit and its publish: no relay takes the claimed row at once, one does
        # once the claim has run out.
        await db.run(_write(outbox, "b"))
        assert await outbox.flush() == 0
        await asyncio.sleep(1.1)
        assert await outbox.flush() == 1
        await _until(lambda: len(received) == 2, "the dead request's event")
        assert received[1] == {"id": "b"} and await _left(db) == 0

        # The bus is away: the request still succeeds, the event stays, freed for the relay, which sends it later.
        nowhere = BusApp()
        nowhere._bus = HttpBus(f"http://127.0.0.1:{free_port()}", retry_for=0.5)  # nothing listens; gives up soon
        away = Outbox(db, nowhere)
        await away.send_now([await db.run(_write(away, "c"))])
        assert await _left(db) == 1
        await nowhere.close()
        stop = asyncio.Event()
        relay = asyncio.create_task(outbox.relay(stop))
        await _until(lambda: len(received) == 3, "the event kept while the bus was away")
        assert received[2] == {"id": "c"}
        stop.set()
        await relay
        assert await _left(db) == 0

        # Two instances' relays on one database (the service's two instances): every event goes out once.
        other_bus = BusApp(server.url)
        other = Outbox(Database(tmp_path / "service.db", SCHEMA), other_bus)
        for n in range(40):
            await db.run(lambda conn, n=n: conn.execute(
                "INSERT INTO outbox (topic, payload, created_at) VALUES ('things.created', ?, 0)",
                (f'{{"id": "bulk-{n}"}}',)))
        sent = await asyncio.gather(outbox.flush(), other.flush(), outbox.flush(), other.flush())
        assert sum(sent) == 40
        await _until(lambda: len(received) == 43, "the bulk events")
        await asyncio.sleep(0.5)
        ids = [e["id"] for e in received[3:]]
        assert sorted(ids) == sorted(f"bulk-{n}" for n in range(40)) and len(set(ids)) == 40
        assert await _left(db) == 0
        await other_bus.close()
    await bus.close()
