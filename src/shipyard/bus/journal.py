"""Durable log of the embedded broker: its own SQLite file (WAL, synchronous=FULL), written by one thread.

Every write joins the current batch; one commit (one fsync) settles the whole batch (group commit).
It never decides anything about messages and never runs SQLite on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
  name TEXT PRIMARY KEY, patterns TEXT NOT NULL, max_attempts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY, queue TEXT NOT NULL, topic TEXT NOT NULL, body BLOB NOT NULL, headers BLOB NOT NULL,
  priority INTEGER NOT NULL, enqueued_at REAL NOT NULL, available_at REAL NOT NULL, attempts INTEGER NOT NULL,
  dead INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', failed_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS idempotency (
  queue TEXT NOT NULL, key TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (queue, key)
);
"""

INSERT_MESSAGE = (
    "INSERT OR REPLACE INTO messages (id, queue, topic, body, headers, priority, enqueued_at, available_at,"
    " attempts, dead, error, failed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
DELETE_MESSAGE = "DELETE FROM messages WHERE id = ?"
UPDATE_RETRY = "UPDATE messages SET attempts = ?, available_at = ?, dead = 0, error = '' WHERE id = ?"
UPDATE_DEAD = "UPDATE messages SET attempts = ?, dead = 1, error = ?, failed_at = ? WHERE id = ?"
UPSERT_QUEUE = "INSERT OR REPLACE INTO queues (name, patterns, max_attempts) VALUES (?,?,?)"
PUT_IDEMPOTENCY = "INSERT OR REPLACE INTO idempotency (queue, key, expires_at) VALUES (?,?,?)"
EXPIRE_IDEMPOTENCY = "DELETE FROM idempotency WHERE expires_at < ?"


class Journal:
    """Batches writes; `write()` returns a future resolved once the batch holding it is committed."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bus-journal") if path else None
        self._db: sqlite3.Connection | None = None
        self._ops: list[tuple[str, list[tuple[Any, ...]]]] = []
        self._batch: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Opens the file and returns (queues, messages, idempotency keys) as stored."""
        loaded: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        if self._executor is not None:
            loaded = await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)
        self._task = asyncio.create_task(self._flush_forever(), name="bus-journal")
        return loaded

    def _open_sync(self) -> tuple[list[Any], list[Any], list[Any]]:
        assert self.path is not None
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        queues = db.execute("SELECT name, patterns, max_attempts FROM queues").fetchall()
        messages = db.execute(
            "SELECT id, queue, topic, body, headers, priority, enqueued_at, available_at, attempts, dead, error,"
            " failed_at FROM messages ORDER BY id"
        ).fetchall()
        keys = db.execute("SELECT queue, key, expires_at FROM idempotency").fetchall()
        return queues, messages, keys

    def write(self, sql: str, rows: list[tuple[Any, ...]]) -> asyncio.Future[None]:
        if self._closing:
            raise RuntimeError("bus journal is closed")
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        if rows:
            self._ops.append((sql, rows))
        self._wake.set()
        return self._batch

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops, batch = self._ops, self._batch
            self._ops, self._batch = [], None
            if batch is None:
                if self._closing:
                    return
                continue
            try:
                if ops and self._executor is not None:
                    await loop.run_in_executor(self._executor, self._commit_sync, ops)
            except Exception as exc:
                if not batch.done():
                    batch.set_exception(exc)
                    batch.exception()  # writers that did not wait (acks) must not log "never retrieved"
            else:
                if not batch.done():
                    batch.set_result(None)
            if self._closing and self._batch is None:
                return

    def _commit_sync(self, ops: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            for sql, rows in ops:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._executor is not None:
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
            self._executor.shutdown(wait=True)
