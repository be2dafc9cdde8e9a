"""The transactional outbox: a service's events are written in the same SQLite transaction as the change they
announce, and published on the bus from there. So an acknowledged change always gets its event, even when the
instance dies between its commit and its publish (the other instance, or this one restarted, publishes it).

Delivery is at least once: a row is deleted only after the bus has it durably, so a crash between the two sends it
again; consumers already keep the newest `version` of an asset and ignore the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from typing import Any

from mediahub.database import Database
from shipyard.sdk import Service
from shipyard.sdk.bus import BusApp

log = logging.getLogger("mediahub.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- publication order
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,                  -- JSON
    created_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0   -- an instance is publishing it until then
);
"""
CLAIM_SECONDS = 30.0  # a claim outlives any publish; a claimant that died frees its rows after this
RELAY_INTERVAL = 1.0  # how soon a row left behind by a dead instance goes out
BATCH = 100


class Outbox:
    """`add()` inside a Database.run transaction, then `send_now()` with the ids it gave once the change is committed
    (and whatever must happen before the event is seen has happened); `relay()` runs for as long as the service
    serves and publishes what a request could not: a dead instance's rows once their claim runs out, failed ones."""

    def __init__(self, db: Database, bus: BusApp) -> None:
        self.db = db
        self.bus = bus

    @staticmethod
    def add(conn: sqlite3.Connection, topic: str, payload: Any) -> int:
        """Adds an event to the transaction of `conn`, claimed by the caller (no relay sends it meanwhile)."""
        now = time.time()
        cursor = conn.execute("INSERT INTO outbox (topic, payload, created_at, claimed_until) VALUES (?, ?, ?, ?)",
                              (topic, json.dumps(payload), now, now + CLAIM_SECONDS))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def send_now(self, ids: list[int]) -> None:
        """Publishes the events `add()` gave these ids, in order. A failure is logged, not raised: the change is
        committed and its events kept, freed for the relay, which sends them once the bus answers."""
        if not ids:
            return
        marks = ", ".join("?" * len(ids))
        rows = await self.db.query(f"SELECT id, topic, payload FROM outbox WHERE id IN ({marks}) ORDER BY id",
                                   tuple(ids))
        try:
            await self._publish(rows)
        except Exception:
            log.warning("outbox: publishing failed; the relay will send the event", exc_info=True)

    async def _publish(self, rows: list[sqlite3.Row]) -> int:
        """Each row deleted once the bus has it durably; on a failure the rest are freed for the next try at once."""
        pending = [row["id"] for row in rows]
        try:
            for row in rows:
                await self.bus.publish(row["topic"], json.loads(row["payload"]))
                await self.db.run(lambda conn, row_id=row["id"]: conn.execute(
                    "DELETE FROM outbox WHERE id = ?", (row_id,)))
                pending.remove(row["id"])
        except Exception:
            await self.db.run(lambda conn: conn.executemany(
                "UPDATE outbox SET claimed_until = 0 WHERE id = ?", [(i,) for i in pending]))
            raise
        return len(rows)

    @staticmethod
    def _claim(conn: sqlite3.Connection) -> list[sqlite3.Row]:
        now = time.time()
        return conn.execute(
            "UPDATE outbox SET claimed_until = ? WHERE id IN"
            " (SELECT id FROM outbox WHERE claimed_until < ? ORDER BY id LIMIT ?) RETURNING id, topic, payload",
            (now + CLAIM_SECONDS, now, BATCH)).fetchall()

    async def flush(self) -> int:
        """Publishes every event no one holds a claim on, oldest first; returns how many went out."""
        sent = 0
        while True:
            rows = sorted(await self.db.run(self._claim), key=lambda r: r["id"])
            if not rows:
                return sent
            sent += await self._publish(rows)
            if len(rows) < BATCH:
                return sent

    async def relay(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.flush()
                if sent:
                    log.info("outbox: published %d event(s) left behind", sent)
            except Exception:  # the bus is away (server restarting): the rows wait, nothing is lost
                log.warning("outbox: publishing failed; retrying", exc_info=True)
            try:
                await asyncio.wait_for(stop.wait(), RELAY_INTERVAL)
            except TimeoutError:
                pass

    def run_with(self, service: Service) -> None:
        """Relays for as long as `service` serves."""
        stop = asyncio.Event()
        task: dict[str, asyncio.Task[None]] = {}

        @service.on_startup
        async def start_relay() -> None:
            task["relay"] = asyncio.create_task(self.relay(stop))

        @service.on_shutdown
        async def stop_relay() -> None:
            stop.set()
            if "relay" in task:
                await task["relay"]
