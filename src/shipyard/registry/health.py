"""Health checker (being written)."""

from __future__ import annotations


class HealthChecker:
    def __init__(self, store, catalog, node, *, enable_script_checks: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.store = store

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
