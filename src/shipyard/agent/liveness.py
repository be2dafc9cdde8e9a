"""Liveness of the servers' own nodes in a cluster, run by the leader: a server whose lease expired (or that left)
has its node's serfHealth critical at once, and after node_lost_after its node leaves the scheduler's nodes, so
the instances it ran are placed elsewhere (the planner replaces instances of vanished nodes).

It only marks and removes records, each guarded by a txn that the server is still absent; it never places,
stops or starts anything itself (the scheduler and the agents do), and it never touches a live server's node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shipyard.registry.catalog import CRITICAL, PASSING, SERF_CHECK_ID, Catalog
from shipyard.registry.servers import SERVERS, ServerCluster
from shipyard.scheduler.records import node_key
from shipyard.store import Compare, Delete, Get

log = logging.getLogger("shipyard.cluster")

NODE_LOST_AFTER = 15.0
CHECK_EVERY = 1.0


class ServerNodeLiveness:
    """The leader's loop over the cluster's members; level-triggered, so a new leader simply carries on."""

    def __init__(self, cluster: ServerCluster, catalog: Catalog, *, node_lost_after: float = NODE_LOST_AFTER) -> None:
        self.cluster = cluster
        self.catalog = catalog
        self.store = cluster.store
        self.node_lost_after = node_lost_after
        # server name -> monotonic time this leader first saw it down (a new leader starts counting afresh: it
        # may replace instances later than node_lost_after, never sooner)
        self._down_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="server-node-liveness")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._down_since.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node liveness pass failed (%s: %s); trying again", type(exc).__name__, exc)
            await asyncio.sleep(CHECK_EVERY)

    async def check_once(self, now: float) -> None:
        for member in await self.cluster.members():
            name = member.server.name
            if member.status == 1 or name == self.cluster.me.name:
                if self._down_since.pop(name, None) is not None:
                    # Back (it says so itself too; this covers a pass of ours that raced its return).
                    await self.catalog.update_check_status(name, SERF_CHECK_ID, PASSING, "Agent alive and reachable")
                continue
            since = self._down_since.setdefault(name, now)
            why = "left the cluster" if member.status == 3 else "its lease expired (failed or cut off)"
            if await self.catalog.update_check_status(name, SERF_CHECK_ID, CRITICAL, f"Agent not live: {why}"):
                log.warning("cluster: server %s is gone (%s): its node is critical", name, why)
            if now - since >= self.node_lost_after:
                await self._remove_node(member.server.id, name)

    async def _remove_node(self, server_id: str, name: str) -> None:
        """Removes the node from what the scheduler places on, only while the server is still absent."""
        read = await self.store.txn((), [Get(SERVERS + server_id), Get(node_key(name))])
        alive, node = read.ranges()
        if alive or not node:
            return
        result = await self.store.txn([Compare(SERVERS + server_id, "version", "=", 0),
                                       Compare(node_key(name), "mod", "=", node[0].mod_revision)],
                                      [Delete(node_key(name))])
        if result.succeeded:
            log.warning("cluster: node %s lost for %.0fs: removed from placement; its instances will be placed "
                        "elsewhere", name, self.node_lost_after)
