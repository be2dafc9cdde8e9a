"""The node agents of a cluster that run without a server (`shipyard agent`): each one's record under cluster/agents/
on its heartbeat lease (present means alive) and under cluster/agent-members/ for good, and the heartbeat itself.

It records and reads who is alive; it never decides what a lost node's instances become (the leader's node liveness
and the scheduler do), and it never stops an instance: an agent that cannot reach a server keeps them running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import orjson

from shipyard.store import Get, LeaseNotFound, Put, Store
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.agent")

AGENTS = "cluster/agents/"  # one record per live agent, on its lease
AGENT_MEMBERS = "cluster/agent-members/"  # one record per agent ever seen; absent from AGENTS: failed or left
DEFAULT_AGENT_TTL = 3  # as the leader lease: with --node-lost-after 15, replaced within ~20 s of a cut

Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class AgentInfo:
    """What the servers and Consul clients learn of an agent. `logs_secret` lets a server (and nobody who cannot
    read the store) fetch its instances' logs from `logs_port`; it never leaves the store."""

    name: str
    id: str
    address: str  # --advertise: where its instances and its logs port are reached
    logs_port: int
    datacenter: str = "dc1"
    meta: dict[str, str] = field(default_factory=dict)
    logs_secret: str = ""
    ttl: int = DEFAULT_AGENT_TTL  # its heartbeat lease's TTL: once expired, it has been silent at least this long
    tls: bool = False  # its logs port serves HTTPS (with its --client-cert)

    def encode(self, **extra: object) -> bytes:
        return orjson.dumps({**asdict(self), **extra})

    @classmethod
    def decode(cls, raw: bytes) -> AgentInfo:
        data = orjson.loads(raw)
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        return cls(str(data["name"]), str(data.get("id", "")), str(data["address"]), int(data.get("logs_port", 0)),
                   str(data.get("datacenter", "dc1")), {str(k): str(v) for k, v in meta.items()},
                   str(data.get("logs_secret", "")), int(data.get("ttl", DEFAULT_AGENT_TTL)), data.get("tls") is True)


@dataclass(frozen=True)
class AgentMember:
    info: AgentInfo
    status: int  # Serf's member status: 1 alive, 3 left, 4 failed


def _key(prefix: str, name: str) -> str:
    from urllib.parse import quote

    return prefix + quote(name, safe="")


def agent_alive_key(name: str) -> str:
    """The lease-bound key whose absence means the agent of node `name` is down."""
    return _key(AGENTS, name)


async def agent_members(store: Store) -> list[AgentMember]:
    """Every agent that ever joined, with its status, sorted by name."""
    read = await store.txn((), [Get(AGENT_MEMBERS, True), Get(AGENTS, True)])
    known, alive = read.ranges()
    live = {kv.key[len(AGENTS):] for kv in alive}
    out = []
    for kv in known:
        with contextlib.suppress(Exception):
            data = orjson.loads(kv.value)
            status = 1 if kv.key[len(AGENT_MEMBERS):] in live else 3 if data.get("left") else 4
            out.append(AgentMember(AgentInfo.decode(kv.value), status))
    return sorted(out, key=lambda m: m.info.name)


async def agent_info(store: Store, name: str) -> AgentInfo | None:
    kv = await store.get(_key(AGENT_MEMBERS, name))
    if kv is None:
        return None
    with contextlib.suppress(Exception):
        return AgentInfo.decode(kv.value)
    return None


class AgentHeartbeat:
    """Keeps this agent's record alive on a lease, renewed every third of its TTL. A lease found expired (it was
    cut off longer than the TTL) is replaced and `on_rejoined` runs, so the agent says it is back; a server that
    cannot be reached is only logged: what the agent runs keeps running."""

    def __init__(self, store: Store, info: AgentInfo, *, ttl: int = DEFAULT_AGENT_TTL,
                 on_rejoined: Hook | None = None, on_beat: Callable[[], None] | None = None) -> None:
        self.store = store
        self.info = info
        self.ttl = ttl
        self.on_rejoined = on_rejoined
        self.on_beat = on_beat  # after each heartbeat a server confirmed
        self.reachable = True
        self._lease = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-heartbeat")

    async def stop(self) -> None:
        """Leaves: members show 3 (left) and the lease is given back at once."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.store.put(_key(AGENT_MEMBERS, self.info.name), self.info.encode(left=True))
                if self._lease:
                    await self.store.revoke_lease(self._lease)

    async def _register(self) -> None:
        lease = await self.store.grant_lease(self.ttl)
        await self.store.txn((), [Put(_key(AGENTS, self.info.name), self.info.encode(), lease.id),
                                  Put(_key(AGENT_MEMBERS, self.info.name), self.info.encode())])
        self._lease = lease.id  # only once the records are on it: a failed write registers again next beat

    async def _run(self) -> None:
        rejoin_pending = False
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                async with asyncio.timeout(max(1.0, self.ttl / 3)):
                    rejoin_pending = await self.beat() or rejoin_pending
                if not self.reachable:
                    log.info("agent %s: servers reachable again", self.info.name)
                self.reachable = True
                if self.on_beat is not None:
                    self.on_beat()
                if rejoin_pending and self.on_rejoined is not None:
                    await self.on_rejoined()  # outside the timeout: it may stop instances, which takes a while
                rejoin_pending = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.reachable:
                    log.warning("agent %s: no server answers (%s); its instances keep running", self.info.name,
                                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                self.reachable = False

    async def beat(self) -> bool:
        """One heartbeat: renews the lease, or registers again if it expired meanwhile (then True: the agent must
        say it is back)."""
        if self._lease:
            try:
                await self.store.keepalive(self._lease)
                return False
            except LeaseNotFound:
                self._lease = 0
        await self._register()
        log.warning("agent %s: its lease had expired (cut off longer than %ds): registered again", self.info.name,
                    self.ttl)
        return True
