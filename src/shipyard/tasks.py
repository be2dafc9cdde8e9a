"""Background loops' shared ending."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | asyncio.Future[Any] | None) -> None:
    """Cancels a background loop and waits until it has ended (what it raised on the way out is not the caller's:
    a loop logs its own failures)."""
    await cancel_all_and_wait([task])


async def cancel_all_and_wait(tasks: Iterable[asyncio.Task[Any] | asyncio.Future[Any] | None]) -> None:
    """Cancels every one first, then waits for each: they end together rather than one after another."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
