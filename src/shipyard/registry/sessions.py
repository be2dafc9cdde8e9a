"""Consul sessions (being written)."""

from __future__ import annotations


class SessionManager:
    def __init__(self, store, catalog, kv, node) -> None:  # type: ignore[no-untyped-def]
        self.store = store

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
