"""A service's own SQLite database, shared by its instances on one machine (WAL, busy timeout), used off the loop.

It must never be opened by another service: each service owns its data and others ask it over HTTP or the bus.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Database:
    """One connection per process, serialised by a lock; every call runs in a thread so the event loop never waits
    on the disk. Two instances of a service write the same file: SQLite's locking (WAL, busy timeout) arbitrates."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            try:  # both instances start at once: one creates the schema while the other waits
                self._conn.executescript(f"BEGIN IMMEDIATE;\n{schema}\nCOMMIT;")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(conn)` inside one write transaction (BEGIN IMMEDIATE: no lock upgrade deadlocks between instances)."""
        return await asyncio.to_thread(self._transaction, work)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    async def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        return await asyncio.to_thread(self._read, sql, params)

    def _read(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    async def reachable(self) -> bool:
        try:
            await self.query("SELECT 1")
            return True
        except sqlite3.Error:
            return False
