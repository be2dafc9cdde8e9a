"""follow_prefix, the one loop every component follows the store with: gaps resync, errors back off, nothing kills it.

Against real stores: an embedded SQLite store for compaction, and a real server whose store goes away and comes back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from shipyard.api.consul.agent import build_check
from shipyard.registry.catalog import Catalog
from shipyard.registry.health import HealthChecker
from shipyard.registry.node import NodeIdentity
from shipyard.store import Event, SqliteStore, StoreError, follow_prefix
from shipyard.store.remote import RemoteStore
from support import ServerProcess

SOON = 20.0


class Seen:
    """What a follower saw: every event's key and value, and each resync's revision."""

    def __init__(self, store: object, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.values: dict[str, bytes] = {}
        self.resyncs: list[int] = []
        self.resync_errors: list[BaseException] = []
        self.changed = asyncio.Event()

    def on_events(self, batch: list[Event]) -> None:
        for event in batch:
            self.values[event.kv.key] = event.kv.value
        self.changed.set()

    async def resync(self) -> int:
        try:
            result = await self.store.range(self.prefix, prefix=True)  # type: ignore[attr-defined]
        except StoreError as exc:
            self.resync_errors.append(exc)
            raise
        self.values = {kv.key: kv.value for kv in result.kvs}
        self.resyncs.append(result.revision)
        self.changed.set()
        return int(result.revision)

    async def wait_for(self, key: str, value: bytes) -> None:
        while self.values.get(key) != value:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), SOON)


async def test_a_compacted_gap_resyncs(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    seen = Seen(store, "f/")
    try:
        start = await store.put("f/a", b"1")
        await store.put("f/a", b"2")
        await store.put("f/b", b"1")
        await store.compact(store.revision)
        # Asked to follow from a revision compaction has removed: it must read everything again instead.
        task = asyncio.create_task(follow_prefix(store, "f/", seen.on_events, seen.resync, from_revision=start - 1))
        await seen.wait_for("f/b", b"1")
        assert seen.values == {"f/a": b"2", "f/b": b"1"}
        assert seen.resyncs, "the gap was filled by a resync"
        await store.put("f/c", b"live")
        await seen.wait_for("f/c", b"live")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.watcher_count() == 0
    finally:
        await store.close()


async def test_a_store_error_during_resync_never_ends_the_follow(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--no-gateway").start()
    remote = RemoteStore(server.url)
    seen = Seen(remote, "f/")
    task = asyncio.create_task(follow_prefix(remote, "f/", seen.on_events, seen.resync, max_delay=0.5))
    try:
        await remote.put("f/before", b"1")
        await seen.wait_for("f/before", b"1")
        server.kill9()
        # The stream breaks; every resync now fails with a store error until the server is back.
        while len(seen.resync_errors) < 2:
            await asyncio.sleep(0.1)
        assert not task.done(), "a store error during resync ended the follow"
        await asyncio.to_thread(server.start)
        await remote.put("f/after", b"2")
        await seen.wait_for("f/after", b"2")
        assert seen.values["f/before"] == b"1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await remote.close()
        server.stop()


async def test_the_health_checker_hears_of_checks_again_after_its_store_came_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Issue 11, item 11: its watch loop died when the resync after a broken stream hit a store error; from then
    # on it never heard of a new check. A health checker for another node, in this process, over the store API.
    server = ServerProcess(tmp_path / "data", "--no-gateway").start()
    remote = RemoteStore(server.url)
    node = NodeIdentity("remote-node", "remote-node-id", "127.0.0.1", "dc1")
    catalog = Catalog(remote, node)
    checker = HealthChecker(remote, catalog, node)
    try:
        await catalog.start()
        with caplog.at_level(logging.WARNING):
            await checker.start()
            server.kill9()

            async def retried_while_down() -> None:
                # The watch broke and then its resync failed too: two complaints, and the loop must still be alive.
                while len([r for r in caplog.records if r.name in ("shipyard.store.follow", "shipyard.health")
                           and r.levelno >= logging.WARNING]) < 2:
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(retried_while_down(), SOON)
        await asyncio.to_thread(server.start)
        check = build_check({"Name": "leader", "HTTP": server.url + "/v1/status/leader", "Interval": "1s"},
                            struct="CheckDefinition", default_id="leader", default_name="", status_error="bad")
        await catalog.register_check(node.name, check)

        async def passing() -> None:
            while ((await catalog.get_check(node.name, "leader")) or {}).get("Status") != "passing":
                await asyncio.sleep(0.1)

        await asyncio.wait_for(passing(), SOON)
    finally:
        await checker.stop()
        await remote.close()
        server.stop()
