"""BusAutoscaler: the level-triggered loop that scales workers with `autoscale:` on the depth of their queue.

It only reads queue figures and calls JobService.scale; the decision is scheduler.autoscale.desired_instances,
and placing or stopping instances stays with the scheduler loop and the agents.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from shipyard.bus.base import Bus, QueueStats
from shipyard.errors import Conflict, NotFound, ShipyardError
from shipyard.scheduler.autoscale import desired_instances
from shipyard.scheduler.jobs import JobService
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.bus.autoscaler")
INTERVAL = 2.0


class BusAutoscaler:
    """Every `interval` seconds: for each running job with an autoscale policy, compare the instance count its
    queue asks for with the job's, and scale when they differ. A missed pass or a restart just means the next
    pass decides from fresh figures."""

    def __init__(self, jobs: JobService, bus: Bus, *, interval: float = INTERVAL) -> None:
        self.jobs, self.bus, self.interval = jobs, bus, interval
        # job id -> monotonic time of the last change seen (ours or anyone's); a job first seen counts as just
        # changed, so a restarted server does not scale down before a cooldown has passed.
        self.changed_at: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bus-autoscaler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoscaler pass failed; trying again next pass")
            await asyncio.sleep(self.interval)

    async def reconcile(self) -> dict[str, int]:
        """One pass; returns {job: new instance count} for the jobs it scaled."""
        now = time.monotonic()
        scaled: dict[str, int] = {}
        seen: set[str] = set()
        for job in await self.jobs.list():
            policy = job.spec.autoscale
            if policy is None or job.status != "running":
                continue
            seen.add(job.id)
            current = job.spec.instances
            if self.counts.get(job.id) != current:
                self.counts[job.id], self.changed_at[job.id] = current, now
            try:
                stats = await self._stats(policy.queue)
            except ShipyardError as exc:  # the broker is away: no evidence, no change
                log.warning("autoscaler cannot read queue %s: %s", policy.queue, exc.message)
                continue
            desired = desired_instances(stats, policy, current,
                                        since_last_change=now - self.changed_at.get(job.id, -math.inf))
            if desired == current:
                continue
            try:
                await self.jobs.scale(job.id, desired)
            except Conflict:
                continue  # a rollout is in progress: scale once it is done, on a later pass
            except NotFound:
                continue
            log.info("autoscaled %s from %d to %d instances (queue %s: %s)", job.id, current, desired,
                     policy.queue, f"{stats.ready} ready, {stats.in_flight} in flight" if stats else "absent")
            self.counts[job.id], self.changed_at[job.id] = desired, now
            scaled[job.id] = desired
        for gone in set(self.counts) - seen:
            self.counts.pop(gone, None)
            self.changed_at.pop(gone, None)
        return scaled

    async def _stats(self, queue: str) -> QueueStats | None:
        try:
            return (await self.bus.stats(queue))[0]
        except NotFound:
            return None
