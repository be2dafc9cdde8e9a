"""Wires a server into its cluster: which loops only the leader runs (scheduler, session reaping, autoscaler, the
servers' node liveness, reaping of members gone for --reconnect-timeout, etcd compaction), the fence on the
scheduler's commits, and the refusal of an embedded bus on etcd.

It composes parts (registry/servers.py elects, the loops do their work); it never decides leadership itself.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from shipyard.agent.liveness import NodeLiveness, ServerNodeLiveness, agent_node_members
from shipyard.agent.reaper import MemberReaper
from shipyard.api.context import Platform, ServerConfig
from shipyard.bus.autoscaler import BusAutoscaler
from shipyard.errors import ShipyardError
from shipyard.registry.agents import agent_members
from shipyard.registry.servers import ServerCluster, ServerInfo
from shipyard.store.compaction import PeriodicCompactor
from shipyard.store.etcd import EtcdStore

log = logging.getLogger("shipyard.cluster")

CLUSTER = "cluster"
LIVENESS = "server-node-liveness"
REAPER = "member-reaper"
COMPACTOR = "etcd-compactor"


def check_cluster_bus(config: ServerConfig) -> None:
    """Several servers on etcd share everything that decides behaviour: the embedded bus is one server's file, so
    a server on etcd needs RabbitMQ, unless it is told it is alone (--single-server)."""
    if config.store_url and not config.bus_url and not config.single_server:
        raise ShipyardError(
            "a server on etcd is a cluster member, and the embedded bus lives in one server's files (messages sent "
            "through one server would never reach workers of another): give --bus amqp://user:pass@host:port/vhost "
            "(RabbitMQ), or --single-server if this is the only server on this etcd", status=2)


def cluster_of(platform: Platform) -> ServerCluster | None:
    """This server's cluster membership; None with the embedded SQLite store (one server, leading by itself)."""
    cluster = platform.extras.get(CLUSTER)
    return cluster if isinstance(cluster, ServerCluster) else None


def leads(platform: Platform) -> bool:
    """Whether this server leads: always alone on SQLite, while it holds the leader key in a cluster."""
    cluster = cluster_of(platform)
    return cluster is None or cluster.leading


def attach_cluster(platform: Platform) -> None:
    """On etcd: a ServerCluster whose leadership starts and stops the leader's loops, and fences the scheduler.
    Alone on SQLite: the liveness of the agents' nodes (`shipyard agent` on other machines), which it leads."""
    config, node = platform.config, platform.node
    platform.extras[REAPER] = MemberReaper(platform.store, platform.catalog, me=node.name,
                                           reconnect_timeout=config.reconnect_timeout,
                                           on_gone=lambda name: _forget_node_tokens(platform, name))
    if not isinstance(platform.store, EtcdStore):
        platform.extras[LIVENESS] = NodeLiveness(platform.store, platform.catalog, [agent_node_members(platform.store)],
                                                 me=node.name, node_lost_after=config.node_lost_after)
        return
    me = ServerInfo(node.id, node.name, node.address, config.http_port, node.datacenter)

    async def elected() -> None:
        await start_leader_duties(platform)

    async def deposed() -> None:
        await stop_leader_duties(platform)

    async def rejoined() -> None:
        # As an agent back from a cut: first stop what was replaced meanwhile (its node's serfHealth is still
        # critical, so no probe of a superseded instance is written passing), then say it is live and placeable.
        # A node agent of its own process does all of this itself when its own lease comes back.
        if platform.agent is None:
            return
        await platform.agent.settle()
        await platform.catalog.start()  # its node and a passing serfHealth again
        await platform.agent.write_node()  # placeable again

    cluster = ServerCluster(platform.store, me, ttl=config.leader_ttl, on_elected=elected, on_deposed=deposed,
                            on_rejoined=rejoined)
    platform.extras[CLUSTER] = cluster
    platform.extras[COMPACTOR] = PeriodicCompactor(platform.store, config.etcd_compaction_interval)
    platform.extras[LIVENESS] = ServerNodeLiveness(cluster, platform.catalog, node_lost_after=config.node_lost_after)
    platform.sessions.reaping = False  # until elected
    if platform.scheduler is not None:
        platform.scheduler.fence = cluster.fence
        platform.scheduler.owner = node.name


async def _forget_node_tokens(platform: Platform, node: str) -> int:
    # Imported here: the native API imports the Consul API, which imports this module.
    from shipyard.api.native.service_tokens_api import forget_node_tokens

    return await forget_node_tokens(platform, node)


async def start_leader_duties(platform: Platform) -> None:
    platform.sessions.reaping = True
    if platform.scheduler is not None:
        await platform.scheduler.start()
    autoscaler = platform.extras.get("autoscaler")
    if isinstance(autoscaler, BusAutoscaler):
        await autoscaler.start()
    for name in (LIVENESS, REAPER, COMPACTOR):
        duty = platform.extras.get(name)
        if isinstance(duty, (NodeLiveness, MemberReaper, PeriodicCompactor)):
            await duty.start()


async def stop_leader_duties(platform: Platform) -> None:
    platform.sessions.reaping = False
    for name in (LIVENESS, REAPER, COMPACTOR):
        duty = platform.extras.get(name)
        if isinstance(duty, (NodeLiveness, MemberReaper, PeriodicCompactor)):
            await duty.stop()
    autoscaler = platform.extras.get("autoscaler")
    if isinstance(autoscaler, BusAutoscaler):
        with contextlib.suppress(Exception):
            await autoscaler.stop()
    if platform.scheduler is not None:
        with contextlib.suppress(Exception):
            await platform.scheduler.stop()


async def start_cluster(platform: Platform) -> None:
    """Joins the cluster (the leader's loops start once elected), or, alone on SQLite, runs them at once."""
    cluster = cluster_of(platform)
    if cluster is None:
        log.info("single server (embedded SQLite store): it is the leader; a cluster of servers needs --store etcd")
        await start_leader_duties(platform)
        return
    await cluster.start()
    leader = cluster.leader
    log.info("cluster: server %s (%s) joined on etcd; leader: %s", cluster.me.name, cluster.me.peer_address,
             f"{leader.name} ({leader.peer_address})" if leader else "none yet")


async def stop_cluster(platform: Platform) -> None:
    cluster = cluster_of(platform)
    if cluster is None:
        await stop_leader_duties(platform)
        return
    with contextlib.suppress(Exception):
        await cluster.stop()  # steps down (stopping the leader's loops) and gives its lease back
    await stop_leader_duties(platform)


async def cluster_members(platform: Platform, me: dict[str, Any], *, wan: bool = False) -> list[dict[str, Any]]:
    """Consul's member list: this server alone, or every server that ever joined the cluster, then every agent
    (`shipyard agent`; not in the WAN pool, as Consul clients), each with its own name, address and Status (1 alive:
    its lease holds; 3 left: it stopped and said so; 4 failed: its lease expired). `me` is this server's own member
    entry, the template of the others."""
    cluster = cluster_of(platform)
    out = []
    if cluster is None:
        out.append(me)
    else:
        for member in await cluster.members():
            server = member.server
            tags = {**me["Tags"], "id": server.id, "dc": server.datacenter}
            name = f"{server.name}.{server.datacenter}" if wan else server.name
            out.append({**me, "Name": name, "Addr": server.address, "Tags": tags, "Status": member.status})
    if not wan:
        # A server's own node agent is that server's member already (one machine, one member, as in Consul).
        servers = {entry["Name"] for entry in out}
        out += [agent_member_entry(me, agent.info, agent.status) for agent in await agent_members(platform.store)
                if agent.info.name not in servers]
    return out


def agent_member_entry(me: dict[str, Any], info: Any, status: int) -> dict[str, Any]:
    """A Consul client's member entry ("role": "node", no Raft tags) for an agent, at its advertised address."""
    server_only = ("port", "raft_vsn", "wan_join_port", "bootstrap", "expect", "ft_fs", "ft_si")
    tags = {k: v for k, v in me["Tags"].items() if k not in server_only}
    tags.update(role="node", id=info.id, dc=info.datacenter)
    return {**me, "Name": info.name, "Addr": info.address, "Port": info.logs_port, "Tags": tags, "Status": status}
