"""The servers of a cluster on one store: each one's record under cluster/servers/ (on its lease), and the election
of one leader through a lease-bound cluster/leader key created only where none exists (etcd's election recipe).

It decides who leads and fences what the leader writes; it never runs a leader's duties itself (the composition
root hands it start/stop callbacks), and it must never report leadership past the moment its lease may have expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import orjson

from shipyard.errors import NotLeader
from shipyard.store import Compare, Event, Get, LeaseNotFound, Put, Store, follow_prefix
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger("shipyard.cluster")

CLUSTER = "cluster/"
LEADER_KEY = "cluster/leader"
SERVERS = "cluster/servers/"  # one record per running server, on its lease: present means alive
MEMBERS = "cluster/members/"  # one record per server ever seen, no lease: absent from SERVERS means failed or left
DEFAULT_TTL = 3
# A leader steps down this fraction of its TTL after its last confirmed keepalive was sent, before etcd can expire it.
SAFETY = 0.8

Duty = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServerInfo:
    """What the other servers and Consul clients learn of a server."""

    id: str
    name: str
    address: str  # the address it was started to serve on (--bind)
    http_port: int
    datacenter: str = "dc1"

    @property
    def peer_address(self) -> str:
        """Where it is reached: its address and control port (there is no Raft port in a cluster on etcd)."""
        return f"{self.address}:{self.http_port}"

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> ServerInfo:
        data = orjson.loads(raw)
        return cls(str(data["id"]), str(data["name"]), str(data["address"]), int(data["http_port"]),
                   str(data.get("datacenter", "dc1")))


@dataclass(frozen=True)
class Member:
    server: ServerInfo
    status: int  # Serf's member status: 1 alive, 3 left, 4 failed


class ServerCluster:
    """Registers this server, campaigns for leadership and keeps its lease alive; calls on_elected/on_deposed."""

    def __init__(self, store: Store, me: ServerInfo, *, ttl: int = DEFAULT_TTL,
                 on_elected: Duty | None = None, on_deposed: Duty | None = None,
                 on_rejoined: Duty | None = None) -> None:
        self.store = store
        self.me = me
        self.ttl = ttl
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        # After its lease expired (cut off, paused) and it registered again: the leader may have taken its node
        # out of placement meanwhile, so the server says it is back.
        self.on_rejoined = on_rejoined
        self.elections_won = 0
        self._lease = 0
        self._leading = False
        self._leader_create = 0  # create_revision of the leader key we wrote: the fence
        self._deadline = 0.0  # monotonic time after which our lease may be gone
        self._leader: ServerInfo | None = None
        self._wake = asyncio.Event()
        self._duties = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stepping: asyncio.Task[None] | None = None

    # ---- what the rest of the server asks ----------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._leading and time.monotonic() < self._deadline

    @property
    def leader(self) -> ServerInfo | None:
        """The leader as last seen in the store (this server when it leads); None while there is none."""
        return self.me if self.leading else self._leader

    def fence(self) -> list[Compare]:
        """The compares that make a txn commit only while this server still holds leadership: the leader key is
        the very one it created, on its lease. Raises NotLeader when it knows it does not lead."""
        if not self.leading:
            raise NotLeader(f"server {self.me.name} is not the leader")
        return [Compare(LEADER_KEY, "create", "=", self._leader_create), Compare(LEADER_KEY, "lease", "=", self._lease)]

    async def members(self) -> list[Member]:
        read = await self.store.txn((), [Get(MEMBERS, True), Get(SERVERS, True)])
        known, alive = read.ranges()
        live = {kv.key[len(SERVERS):] for kv in alive}
        by_name: dict[str, tuple[bool, int, Member]] = {}
        for kv in known:
            with contextlib.suppress(Exception):
                data = orjson.loads(kv.value)
                info = ServerInfo.decode(kv.value)
                status = 1 if info.id in live else 3 if data.get("left") else 4
                # One member per name, as in Serf: a server that came back under a new id (--dev, a new data dir)
                # replaces its old self, whose node is its own node now.
                rank = (status == 1, kv.mod_revision, Member(info, status))
                if info.name not in by_name or rank[:2] > by_name[info.name][:2]:
                    by_name[info.name] = rank
        return sorted((member for _, _, member in by_name.values()), key=lambda m: m.server.name)

    async def peers(self) -> list[ServerInfo]:
        rr = await self.store.range(SERVERS, prefix=True)
        out = []
        for kv in rr.kvs:
            with contextlib.suppress(Exception):
                out.append(ServerInfo.decode(kv.value))
        return sorted(out, key=lambda s: s.name)

    # ---- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._register()
        await self._campaign()
        self._tasks = [
            asyncio.create_task(self._run(), name="cluster-election"),
            asyncio.create_task(self._watchdog(), name="cluster-watchdog"),
            asyncio.create_task(follow_prefix(self.store, LEADER_KEY, self._on_leader_events, self._read_leader,
                                              name="cluster leader"), name="cluster-leader-watch"),
        ]

    async def stop(self) -> None:
        """Leaves the cluster: steps down, says it left (members show 3) and gives its lease back at once, so
        another server takes over without waiting for the TTL."""
        tasks, self._tasks = self._tasks, []
        await cancel_all_and_wait(tasks)
        await self._step_down("server stopping")
        with contextlib.suppress(Exception):
            await self.store.put(MEMBERS + self.me.id, orjson.dumps({**asdict(self.me), "left": True}))
        if self._lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self._lease)

    # ---- election ----------------------------------------------------------------------------

    async def _register(self) -> None:
        sent = time.monotonic()
        lease = await self.store.grant_lease(self.ttl)
        self._lease, self._deadline = lease.id, sent + lease.ttl * SAFETY
        await self.store.txn((), [Put(SERVERS + self.me.id, self.me.encode(), lease.id),
                                  Put(MEMBERS + self.me.id, self.me.encode())])

    async def _campaign(self) -> None:
        """Creates the leader key on our lease where none exists; otherwise learns who leads."""
        if self._leading:
            return
        result = await self.store.txn([Compare(LEADER_KEY, "create", "=", 0)],
                                      [Put(LEADER_KEY, self.me.encode(), self._lease)], [Get(LEADER_KEY)])
        if result.succeeded:
            await self._elected(result.revision)
            return
        current = result.ranges()[0]
        if current and current[0].lease == self._lease:  # ours already (a retried campaign whose answer was lost)
            await self._elected(current[0].create_revision)
        elif current:
            with contextlib.suppress(Exception):
                self._leader = ServerInfo.decode(current[0].value)

    async def _elected(self, create_revision: int) -> None:
        async with self._duties:
            self._leader_create, self._leading = create_revision, True
            self._leader = self.me
            self.elections_won += 1
            log.info("cluster: %s (%s) is the leader now (leader key revision %d, lease %x)", self.me.name,
                     self.me.peer_address, create_revision, self._lease)
            if self.on_elected is not None:
                await self.on_elected()

    async def _step_down(self, why: str) -> None:
        async with self._duties:
            if not self._leading:
                return
            self._leading = False
            log.warning("cluster: %s steps down as leader: %s", self.me.name, why)
            if self.on_deposed is not None:
                with contextlib.suppress(Exception):
                    await self.on_deposed()

    async def _run(self) -> None:
        """Keeps the lease alive every third of its TTL and campaigns whenever no leader key exists."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event, and a
            # stop() would then wait forever for this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ttl / 3):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._renew()
                await self._campaign()
            except asyncio.CancelledError:
                raise
            except LeaseNotFound:
                # The lease expired (we were cut off or paused): whatever we led is someone else's now.
                await self._step_down("its lease expired")
                self._lease = 0
            except Exception as exc:
                log.warning("cluster: %s cannot reach the store (%s: %s)", self.me.name, type(exc).__name__, exc)

    async def _renew(self) -> None:
        if not self._lease:
            await self._register()
            log.info("cluster: %s registered again after losing its lease", self.me.name)
            if self.on_rejoined is not None:
                await self.on_rejoined()
            return
        sent = time.monotonic()
        async with asyncio.timeout(self.ttl / 3):
            ttl = await self.store.keepalive(self._lease)
        self._deadline = sent + ttl * SAFETY

    async def _watchdog(self) -> None:
        """Steps down the moment the lease may have expired, even while the store does not answer."""
        while True:
            await asyncio.sleep(0.1)
            if self._leading and time.monotonic() >= self._deadline:
                await self._step_down("no keepalive confirmed within its lease TTL")

    def _on_leader_events(self, batch: list[Event]) -> None:
        for event in batch:
            if event.kv.value:
                with contextlib.suppress(Exception):
                    self._leader = ServerInfo.decode(event.kv.value)
            else:
                self._leader = None
                self._wake.set()  # no leader: campaign now, not at the next keepalive
            if self._leading and (not event.kv.value or event.kv.lease != self._lease):
                self._stepping = asyncio.get_running_loop().create_task(
                    self._step_down("the leader key is not ours any more"))

    async def _read_leader(self) -> int:
        rr = await self.store.range(LEADER_KEY)
        self._leader = None
        if rr.kvs:
            with contextlib.suppress(Exception):
                self._leader = ServerInfo.decode(rr.kvs[0].value)
        else:
            self._wake.set()
        return rr.revision

