"""The leader's compaction of etcd's history: etcd keeps every revision of every key until someone compacts, so a
cluster that never compacts grows until etcd hits its space quota and refuses writes. Shipyard's servers do it as
Kubernetes' API server does (`--etcd-compaction-interval`, 5 minutes): on each tick the leader compacts to the
revision it saw on the previous tick, so a watch or blocking query always finds at least one interval of history to
resume from. A resume that falls before the compacted point gets Compacted, which the store's followers, the
gateways and the SDK already handle by reading the state afresh.

Only the leader runs it (one compaction per interval for the cluster); a deposed leader's late compaction is
harmless (compacting to an old revision never removes what a newer one would keep). The SQLite store bounds its own
history and needs none of this.
"""

from __future__ import annotations

import asyncio
import logging

from shipyard.store import Compacted
from shipyard.store.etcd import EtcdStore
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.cluster")

DEFAULT_INTERVAL = 300.0


class PeriodicCompactor:
    """Each `interval` seconds: compact to the revision recorded one tick earlier, then record the current one."""

    def __init__(self, store: EtcdStore, interval: float = DEFAULT_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self.previous = 0  # the revision seen on the last tick: the next compaction's target
        self.compacted = 0  # the last revision this compactor compacted to (for tests and logs)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-compaction")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.previous = 0  # a leader elected again starts with a full interval of history kept

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable for a moment: the next tick tries again
                log.warning("etcd compaction failed (%s: %s); trying again in %.0fs", type(exc).__name__, exc,
                            self.interval)
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        current = await self.store.revision_now()
        target, self.previous = self.previous, current
        if target <= max(self.store.compact_revision, self.compacted):
            return  # nothing new since (or someone compacted further already)
        try:
            await self.store.compact(target)
        except Compacted:
            return  # compacted past it by someone else (etcd's own auto-compaction, another server)
        self.compacted = target
        log.info("etcd history compacted to revision %d (now %d)", target, current)
