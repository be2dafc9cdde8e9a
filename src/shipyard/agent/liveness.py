"""Node liveness, run by the leader: a node whose server or agent lease expired (or that left) has its node's
serfHealth and its instances' checks critical at once (the gateway and ?passing stop sending there), and after
node_lost_after its node leaves the scheduler's nodes, so its instances are placed elsewhere (the planner replaces
instances of vanished nodes).

It only marks and removes records, each removal guarded by a txn that the node is still absent; it never places,
stops or starts anything itself (the scheduler and the agents do), and it never touches a live node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shipyard.agent.registration import AGENT_OUTPUT_PREFIX
from shipyard.registry.agents import agent_alive_key, agent_members
from shipyard.registry.catalog import CRITICAL, PASSING, SERF_CHECK_ID, Catalog
from shipyard.registry.servers import SERVERS, ServerCluster
from shipyard.scheduler.records import node_key
from shipyard.store import Compare, Delete, Get, Store
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.cluster")

NODE_LOST_AFTER = 15.0
CHECK_EVERY = 1.0


@dataclass(frozen=True)
class NodeMember:
    """A node as liveness sees it: Serf's status (1 alive, 3 left, 4 failed) and the lease-bound key whose absence
    means it is down. `rejoins_itself`: an agent marks its own node passing again once it has stopped what was
    replaced meanwhile, so the leader must not do it first."""

    name: str
    status: int
    alive_key: str
    kind: str  # "server" | "agent"
    rejoins_itself: bool = False
    lease_ttl: float = 0.0  # its lease's TTL: found expired, it has been silent at least this long


MemberSource = Callable[[], Awaitable[list[NodeMember]]]


def server_members(cluster: ServerCluster) -> MemberSource:
    async def members() -> list[NodeMember]:
        # A server back marks its node passing itself, once its agent has stopped what was replaced meanwhile.
        return [NodeMember(m.server.name, m.status, SERVERS + m.server.id, "server", rejoins_itself=True,
                           lease_ttl=cluster.ttl) for m in await cluster.members()]
    return members


def agent_node_members(store: Store) -> MemberSource:
    async def members() -> list[NodeMember]:
        return [NodeMember(m.info.name, m.status, agent_alive_key(m.info.name), "agent", rejoins_itself=True,
                           lease_ttl=m.info.ttl) for m in await agent_members(store)]
    return members


class NodeLiveness:
    """The leader's loop over the nodes of servers and agents; level-triggered, so a new leader simply carries on."""

    def __init__(self, store: Store, catalog: Catalog, sources: list[MemberSource], *, me: str = "",
                 node_lost_after: float = NODE_LOST_AFTER) -> None:
        self.store = store
        self.catalog = catalog
        self.sources = sources
        self.me = me  # this server's own node: never marked by itself
        self.node_lost_after = node_lost_after
        # node name -> monotonic time since which it is known silent: first seen down minus its lease TTL (an
        # expired lease means no heartbeat for at least that long). A new leader starts counting afresh: it may
        # replace instances later than node_lost_after after the node fell silent, never sooner.
        self._down_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="node-liveness")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._down_since.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node liveness pass failed (%s: %s); trying again", type(exc).__name__, exc)
            await asyncio.sleep(self.next_pass_in(time.monotonic()))

    def next_pass_in(self, now: float) -> float:
        """Every CHECK_EVERY, or sooner when a down node's node_lost_after ends before that: its instances are
        placed elsewhere on time rather than up to a pass late."""
        due = [since + self.node_lost_after - now for since in self._down_since.values()]
        return max(0.05, min([CHECK_EVERY, *(d for d in due if d > 0)]))

    async def members(self) -> list[NodeMember]:
        """Every node once: a server whose node agent is a process of its own (api/local_agent.py) is also an
        agent member of the same name, and then the agent's lease says whether the node is live (as a Nomad
        client's does, whatever its server does); a server running its agent inside says it with its own lease."""
        out: list[NodeMember] = []
        for source in self.sources:
            out += await source()
        agents = {m.name for m in out if m.kind == "agent"}
        return [m for m in out if m.kind == "agent" or m.name not in agents]

    async def check_once(self, now: float) -> None:
        for member in await self.members():
            name = member.name
            if member.status == 1 or name == self.me:
                if self._down_since.pop(name, None) is not None and not member.rejoins_itself:
                    # Back (it says so itself too; this covers a pass of ours that raced its return).
                    await self.catalog.update_check_status(name, SERF_CHECK_ID, PASSING, "Agent alive and reachable")
                continue
            since = self._down_since.setdefault(name, now - member.lease_ttl)
            why = "left the cluster" if member.status == 3 else "its lease expired (failed or cut off)"
            if await self.catalog.update_check_status(name, SERF_CHECK_ID, CRITICAL, f"Agent not live: {why}"):
                log.warning("cluster: %s %s is gone (%s): its node is critical", member.kind, name, why)
            await self._instances_critical(name, why)  # each pass: a check registered meanwhile, a new leader
            if now - since >= self.node_lost_after:
                await self._remove_node(member.alive_key, name)

    async def _instances_critical(self, node: str, why: str) -> None:
        """Its instances' checks critical too, as no agent there reports on them any more (the agent's own prefix:
        its runners take this for a note, not a failed probe to restart for)."""
        snap = await self.catalog.snapshot()
        for entry in snap.checks_of_node(node):
            check_id = str(entry.data.get("CheckID", ""))
            if entry.data.get("ServiceID") and entry.data.get("Status") != CRITICAL:
                with contextlib.suppress(Exception):
                    await self.catalog.update_check_status(node, check_id, CRITICAL,
                                                           f"{AGENT_OUTPUT_PREFIX}node {node} not live: {why}")

    async def _remove_node(self, alive_key: str, name: str) -> None:
        """Removes the node from what the scheduler places on, only while its server or agent is still absent."""
        read = await self.store.txn((), [Get(alive_key), Get(node_key(name))])
        alive, node = read.ranges()
        if alive or not node:
            return
        result = await self.store.txn([Compare(alive_key, "version", "=", 0),
                                       Compare(node_key(name), "mod", "=", node[0].mod_revision)],
                                      [Delete(node_key(name))])
        if result.succeeded:
            log.warning("cluster: node %s silent for %.0fs: removed from placement; its instances will be placed "
                        "elsewhere", name, self.node_lost_after)


class ServerNodeLiveness(NodeLiveness):
    """The servers' nodes and the agents' together (what a leader on etcd runs)."""

    def __init__(self, cluster: ServerCluster, catalog: Catalog, *, node_lost_after: float = NODE_LOST_AFTER) -> None:
        super().__init__(cluster.store, catalog, [server_members(cluster), agent_node_members(cluster.store)],
                         me=cluster.me.name, node_lost_after=node_lost_after)
        self.cluster = cluster
