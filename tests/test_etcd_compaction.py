"""The leader compacts etcd's history (store/compaction.py), as Kubernetes' API server does: each tick to the
revision of the tick before, so at least one interval of history is kept. Against a real etcd of its own (a
compaction is keyspace-wide), and through a real server on it."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shipyard.store import Compacted
from shipyard.store.compaction import PeriodicCompactor
from shipyard.store.etcd import EtcdStore
from support import EtcdProcess, ServerProcess, wait_for


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield proc
    proc.stop()


def compacted_past(etcd: EtcdProcess, revision: int) -> bool:
    """What etcd itself says: a range at `revision` fails once history up to it was compacted."""
    body = json.dumps({"key": base64.b64encode(b"x").decode(), "revision": str(revision)}).encode()
    request = urllib.request.Request(etcd.url + "/v3/kv/range", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        if "compacted" in exc.read().decode():
            return True
        raise
    return False


async def test_each_tick_compacts_to_the_revision_of_the_tick_before(etcd: EtcdProcess) -> None:
    store = await EtcdStore.open(etcd.url, namespace="compaction/")
    try:
        compactor = PeriodicCompactor(store, interval=3600)
        await store.put("k", b"1")
        await compactor.tick()
        kept_from = compactor.previous
        assert compactor.compacted == 0, "the first tick only records where the next one compacts to"
        for value in (b"2", b"3", b"4"):
            await store.put("k", value)
        await compactor.tick()
        assert compactor.compacted == kept_from and store.compact_revision >= kept_from
        assert (await store.get("k")).value == b"4"  # type: ignore[union-attr]  # the state itself is untouched
        with pytest.raises(Compacted):
            async for _ in store.watch("k", from_revision=kept_from - 1):
                break
        seen = []
        async for batch in store.watch("k", from_revision=kept_from + 1):  # history since the last tick is kept
            seen += [event.kv.value for event in batch]
            if b"4" in seen:
                break
        assert seen == [b"2", b"3", b"4"]
        last = (await store.get("k")).mod_revision  # type: ignore[union-attr]
        await compactor.tick()  # to the previous tick's revision: the last write's
        assert compactor.compacted == last
        await compactor.tick()  # nothing written since: nothing to do, no error
        assert compactor.compacted == last
    finally:
        await store.close()


def test_a_leading_server_on_etcd_compacts_and_blocking_queries_still_answer(etcd: EtcdProcess,
                                                                              tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", "--store",
                           f"etcd://127.0.0.1:{etcd.client_port}/compaction-server", "--single-server",
                           "--etcd-compaction-interval", "0.5", "--vault-port", "0", "--no-gateway")
    try:
        server.start()
        first = requests.put(server.url + "/v1/kv/app/config", data=b"v1", timeout=5)
        assert first.status_code == 200, first.text
        old_index = int(requests.get(server.url + "/v1/kv/app/config", timeout=5).headers["X-Consul-Index"])
        for i in range(5):
            assert requests.put(server.url + "/v1/kv/app/config", data=f"v{i + 2}".encode(), timeout=5).ok
        assert not compacted_past(etcd, old_index)  # X-Consul-Index is etcd's revision
        wait_for("the leader to compact etcd's history", lambda: compacted_past(etcd, old_index), timeout=20)
        # An index from before the compaction: the query answers at once with the current value (not an error).
        answer = requests.get(server.url + f"/v1/kv/app/config?index={old_index}&wait=5s&raw", timeout=10)
        assert answer.status_code == 200 and answer.content == b"v6"
        assert int(answer.headers["X-Consul-Index"]) > old_index
        assert "etcd history compacted to revision" in server.log_tail(20000)
    finally:
        server.stop()
