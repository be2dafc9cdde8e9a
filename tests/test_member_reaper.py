"""The leader's reaping of members gone for good (agent/reaper.py), in-process on a real SQLite store and a real etcd,
with the time given explicitly: the down-since stamp lives in the store (a new leader goes on counting), a member
that came back between the read and the removal is never touched, and everything of a reaped node is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from shipyard.agent.reaper import MemberReaper, force_leave, member_records, reap
from shipyard.registry.agents import AgentInfo, agent_alive_key
from shipyard.registry.catalog import Catalog
from shipyard.registry.node import NodeIdentity
from shipyard.scheduler.records import alloc_key, alloc_status_key, node_control_key, node_key
from shipyard.store import Put, SqliteStore, Store
from shipyard.store.etcd import EtcdStore
from support import EtcdProcess

TIMEOUT = 100.0
EDGE = AgentInfo("edge", "edge-id", "10.0.0.7", 8510)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("reaper-etcd") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The embedded store and etcd (a cluster's): the guards and prefix deletes behave alike on both."""
    if request.param == "sqlite":
        opened: Store = await SqliteStore.open(None)
    else:
        etcd = request.getfixturevalue("etcd")
        opened = await EtcdStore.open(etcd.url, namespace=f"reaper-{request.node.name}/")
    yield opened
    await opened.close()


async def server_catalog(store: Store) -> Catalog:
    catalog = Catalog(store, NodeIdentity("srv", "srv-id", "127.0.0.1", "dc1"))
    await catalog.start()
    return catalog


async def failed_agent(store: Store) -> None:
    """An agent that registered its node, was placed on, and whose lease is gone: member record, catalog node with a
    service, placement record, an operator's decision, an allocation and its status; no alive key."""

    edge = Catalog(store, NodeIdentity("edge", "edge-id", "10.0.0.7", "dc1"))
    await edge.start()
    await edge.register_service("edge", {"ID": "web-1", "Service": "web", "Port": 8080}, [])
    await store.txn((), [Put("cluster/agent-members/edge", EDGE.encode()), Put(node_key("edge"), b"{}"),
                         Put(node_control_key("edge"), b'{"eligible": false}'),
                         Put(alloc_key("edge", "a1"), b"{}"), Put(alloc_status_key("edge", "a1"), b"{}")])
    await edge.stop()


async def leftovers(store: Store, catalog: Catalog) -> list[str]:
    snap = await catalog.snapshot()
    found = ["catalog node"] if "edge" in snap.nodes else []
    found += ["catalog service"] if snap.services_of_node("edge") else []
    for key in (node_key("edge"), node_control_key("edge"), "cluster/agent-members/edge"):
        found += [key] if await store.get(key) is not None else []
    for prefix in ("allocs/edge/", "alloc-status/edge/"):
        found += [prefix] if (await store.range(prefix, prefix=True)).kvs else []
    return found


async def test_the_down_since_stamp_outlives_a_leader_and_the_reap_takes_everything(store: Store) -> None:
    catalog = await server_catalog(store)
    await failed_agent(store)
    first = MemberReaper(store, catalog, reconnect_timeout=TIMEOUT, me="srv")
    await first.check_once(1000.0)  # first seen down: stamped
    [record] = [r for r in await member_records(store) if r.name == "edge"]
    assert record.down_since == 1000.0 and not record.alive and record.kind == "agent"
    # A new leader reads the stamp rather than counting afresh.
    second = MemberReaper(store, catalog, reconnect_timeout=TIMEOUT, me="srv")
    await second.check_once(1000.0 + TIMEOUT - 1)
    assert len(await leftovers(store, catalog)) == 7
    await second.check_once(1000.0 + TIMEOUT)
    assert await leftovers(store, catalog) == []
    assert "srv" in (await catalog.snapshot()).nodes  # the leader's own node is never touched


async def test_a_member_back_since_it_was_read_is_never_touched(store: Store) -> None:
    catalog = await server_catalog(store)
    await failed_agent(store)
    [stale] = [r for r in await member_records(store) if r.name == "edge"]
    lease = await store.grant_lease(10)
    await store.txn((), [Put(agent_alive_key("edge"), EDGE.encode(), lease.id),
                         Put("cluster/agent-members/edge", EDGE.encode())])  # it registered again meanwhile
    assert not await reap(store, catalog, stale)
    assert not await force_leave(store, catalog, stale, prune=False)
    assert len(await leftovers(store, catalog)) == 7
    # And once read as alive, force-leave leaves it alone (serf's rule: it would rejoin at once).
    [live] = [r for r in await member_records(store) if r.name == "edge"]
    assert live.alive and not await force_leave(store, catalog, live, prune=True)
    await MemberReaper(store, catalog, reconnect_timeout=TIMEOUT).check_once(10**9)
    assert len(await leftovers(store, catalog)) == 7


async def test_force_leave_marks_left_and_takes_the_node_out_at_once(store: Store) -> None:
    catalog = await server_catalog(store)
    await failed_agent(store)
    [record] = [r for r in await member_records(store) if r.name == "edge"]
    assert await force_leave(store, catalog, record, prune=False, now=5.0)
    [left] = [r for r in await member_records(store) if r.name == "edge"]
    assert left.left and left.down_since == 5.0
    assert await leftovers(store, catalog) == ["cluster/agent-members/edge"]  # listed as left (3) until reaped
    assert await force_leave(store, catalog, left, prune=True)
    assert await leftovers(store, catalog) == []
