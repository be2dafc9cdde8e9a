"""Members gone for good, as Consul's reconnect_timeout and force-leave: the leader removes an agent or server that
has been failed or left for --reconnect-timeout (72 h by default) from the members, the catalog and placement
(node record, operators' decisions, leftover allocations); `force-leave` marks a failed one left at once (its node
out of the catalog and placement at once), `?prune` removes it at once.

Every removal is one txn guarded by the member's lease-bound key still being absent and its member record unchanged,
so a node that came back meanwhile is never touched; it never stops an instance (a returning agent stops what was
replaced, as after any cut) and never removes a live member, the leader's own included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from shipyard.registry.agents import AGENT_MEMBERS, AGENTS
from shipyard.registry.catalog import Catalog
from shipyard.registry.servers import MEMBERS, SERVERS
from shipyard.scheduler.nodes import forget_node_ops
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.cluster")

DEFAULT_RECONNECT_TIMEOUT = 72 * 3600.0  # Consul's reconnect_timeout
MAX_CHECK_EVERY = 5.0
DOWN_SINCE = "down_since"  # wall-clock time since which the member is known silent (stamped by the leader)


@dataclass(frozen=True)
class MemberRecord:
    """One agent's or server's record under its members prefix, and whether its lease-bound key exists."""

    name: str
    kind: str  # "agent" | "server"
    kv: KeyValue  # the member record (its mod revision guards every change)
    alive_key: str
    alive: bool
    data: dict[str, Any]

    @property
    def left(self) -> bool:
        return bool(self.data.get("left"))

    @property
    def down_since(self) -> float | None:
        value = self.data.get(DOWN_SINCE)
        return float(value) if isinstance(value, int | float) else None

    def guards(self) -> list[Compare]:
        """Still absent, and its record unchanged since read (no re-registration, no other stamp)."""
        return [Compare(self.alive_key, "version", "=", 0), Compare(self.kv.key, "mod", "=", self.kv.mod_revision)]

    def rewritten(self, **fields: object) -> Put:
        return Put(self.kv.key, orjson.dumps({**self.data, **fields}))


def _records(kvs: list[KeyValue], prefix: str, live: set[str], kind: str, alive_prefix: str,
             key_of: Callable[[dict[str, Any], str], str]) -> list[MemberRecord]:
    out = []
    for kv in kvs:
        with contextlib.suppress(Exception):
            data = orjson.loads(kv.value)
            ident = key_of(data, kv.key[len(prefix):])
            out.append(MemberRecord(str(data["name"]), kind, kv, alive_prefix + ident, ident in live, data))
    return out


async def member_records(store: Store) -> list[MemberRecord]:
    """Every agent's and server's member record with its liveness, in one read."""
    read = await store.txn((), [Get(AGENT_MEMBERS, True), Get(AGENTS, True), Get(MEMBERS, True), Get(SERVERS, True)])
    agents, agents_alive, servers, servers_alive = read.ranges()
    live_agents = {kv.key[len(AGENTS):] for kv in agents_alive}
    live_servers = {kv.key[len(SERVERS):] for kv in servers_alive}
    return (_records(agents, AGENT_MEMBERS, live_agents, "agent", AGENTS, lambda _data, suffix: suffix)
            + _records(servers, MEMBERS, live_servers, "server", SERVERS, lambda data, _suffix: str(data["id"])))


async def find_member(store: Store, name: str) -> MemberRecord | None:
    """The member named `name` (an agent's record first: node names are unique across the cluster)."""
    found = [r for r in await member_records(store) if r.name == name]
    return found[0] if found else None


async def _node_ops(catalog: Catalog, name: str) -> list[Put | Delete]:
    """Its node out of the catalog (services, checks) and out of placement."""
    return [*catalog.node_removal_ops(await catalog.snapshot(), name), *forget_node_ops(name)]


async def reap(store: Store, catalog: Catalog, record: MemberRecord) -> bool:
    """Removes the member and its node; False when it came back (or changed) since it was read."""
    ops = [*await _node_ops(catalog, record.name), Delete(record.kv.key)]
    return (await store.txn(record.guards(), ops)).succeeded


async def force_leave(store: Store, catalog: Catalog, record: MemberRecord, *, prune: bool,
                      now: float | None = None) -> bool:
    """Consul's force-leave of a failed or left member: left (status 3) with its node out of the catalog and
    placement at once, its instances placed elsewhere; with `prune`, gone from the members too. A live member is
    left alone (as in Consul: it would rejoin at once): False."""
    if record.alive:
        return False
    if prune:
        return await reap(store, catalog, record)
    since = record.down_since if record.down_since is not None else (now or time.time())
    ops = [*await _node_ops(catalog, record.name), record.rewritten(left=True, **{DOWN_SINCE: since})]
    return (await store.txn(record.guards(), ops)).succeeded


class MemberReaper:
    """The leader's loop: stamps when each member was first seen down, and reaps those down for
    reconnect_timeout. The stamp is in the store, so a new leader goes on counting where the last one was."""

    def __init__(self, store: Store, catalog: Catalog, *, reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
                 me: str = "", clock: Callable[[], float] = time.time,
                 on_gone: Callable[[str], Awaitable[object]] | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.reconnect_timeout = reconnect_timeout  # 0: never
        self.me = me
        self.clock = clock
        self.on_gone = on_gone  # after a node was reaped: what else it leaves behind (its instances' ACL tokens)
        self._task: asyncio.Task[None] | None = None

    @property
    def check_every(self) -> float:
        return max(0.2, min(MAX_CHECK_EVERY, self.reconnect_timeout / 10))

    async def start(self) -> None:
        if self._task is None and self.reconnect_timeout > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="member-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once(self.clock())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reaping pass failed (%s: %s); trying again", type(exc).__name__, exc)
            await asyncio.sleep(self.check_every)

    async def check_once(self, now: float) -> None:
        for record in await member_records(self.store):
            if record.alive or record.name == self.me:
                continue
            since = record.down_since
            if since is None:
                # Silent since its last possible heartbeat at the latest; a guarded stamp never hides a return.
                await self.store.txn(record.guards(), [record.rewritten(**{DOWN_SINCE: now})])
            elif now - since >= self.reconnect_timeout and await reap(self.store, self.catalog, record):
                state = "left" if record.left else "failed"
                log.warning("cluster: %s %s %s for %.0fs (--reconnect-timeout): reaped from the members, the "
                            "catalog and placement", record.kind, record.name, state, now - since)
                if self.on_gone is not None:
                    await self.on_gone(record.name)  # a failure here is retried by nobody: logged by the loop
