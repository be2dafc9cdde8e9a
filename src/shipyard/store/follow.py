"""follow_prefix: the one way to follow a prefix of the store — watch from a revision, resync after a gap, back off.

It owns the retry loop only: what a change means and what a resync reads belong to the caller; it must never end
on a store error (only on cancellation), because a loop that dies silently stops the platform from converging.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.store.base import Compacted, Event, Store, WatchOverflow

log = logging.getLogger("shipyard.store.follow")

INITIAL_DELAY = 0.2
MAX_DELAY = 5.0

OnEvents = Callable[[list[Event]], Any]
Resync = Callable[[], Awaitable[int]]


async def follow_prefix(store: Store, prefix: str, on_events: OnEvents, resync: Resync, *,
                        from_revision: int | None = None, name: str = "", prev_kv: bool = True,
                        initial_delay: float = INITIAL_DELAY, max_delay: float = MAX_DELAY) -> None:
    """Feeds every batch of changes under `prefix` after `from_revision` to on_events (sync or async), forever.

    resync() re-reads whatever the caller derives from the prefix and returns the store revision it read at; it is
    called first when from_revision is None, and again after any gap (compaction, an overflowed watcher, a broken
    stream, an error in on_events). Every step, the resync included, runs inside the retry loop: a store error
    anywhere is logged and retried with exponential backoff, never raised. prev_kv=False: on_events never looks at
    Event.prev_kv (see Store.watch)."""
    what = name or prefix
    revision = from_revision
    delay = initial_delay
    while True:
        watcher = None
        try:
            if revision is None:
                revision = await resync()
            watcher = store.watch(prefix, prefix=True, from_revision=revision + 1, prev_kv=prev_kv)
            async for batch in watcher:
                outcome = on_events(batch)
                if inspect.isawaitable(outcome):
                    await outcome
                revision = batch[-1].revision
                delay = initial_delay
            log.info("watch on %s ended; watching again from revision %s", what, revision + 1)
        except asyncio.CancelledError:
            raise
        except (Compacted, WatchOverflow) as exc:
            # A gap in what we saw: read everything again, at once (the store itself is fine).
            log.warning("watch on %s lost events (%s); resyncing", what, exc)
            revision = None
            continue
        except Exception as exc:
            log.warning("following %s failed (%s: %s); resyncing in %.1fs", what, type(exc).__name__, exc, delay)
            revision = None
        finally:
            if watcher is not None:
                watcher.cancel()
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
