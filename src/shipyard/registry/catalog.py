"""Catalog of nodes, services and checks (being written)."""

from __future__ import annotations


class Catalog:
    def __init__(self, store, node) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.node = node

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
