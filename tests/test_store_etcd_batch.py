"""Group commit of the etcd store (store/etcd_batch.py) against a real etcd: concurrent txns on disjoint keys share
one etcd txn, and each caller still gets exactly the answer its own txn would have had."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shipyard.store import Compare, Get, LeaseNotFound, Put, StoreError, TxnResult
from shipyard.store.etcd import EtcdStore
from shipyard.store.etcd_batch import holds
from support import EtcdProcess, free_port


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
async def store(etcd: EtcdProcess, request: pytest.FixtureRequest) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore.open(etcd.url, namespace=f"b-{request.node.name}/")
    yield s
    await s.close()


def create(key: str, value: bytes) -> tuple[list[Compare], list[Put]]:
    return [Compare(key, "version", "=", 0)], [Put(key, value)]


async def test_concurrent_disjoint_txns_share_etcd_txns_and_each_gets_its_own_answer(store: EtcdStore) -> None:
    results = await asyncio.gather(*(store.txn(*create(f"k{i}", b"v%d" % i)) for i in range(100)))
    assert all(r.succeeded for r in results)
    assert all(r.responses == [None] for r in results)  # no previous version
    assert store._writes.batches >= 1
    assert len({r.revision for r in results}) < len(results)  # some of them committed together
    for i, result in enumerate(results):
        kv = await store.get(f"k{i}")
        assert kv is not None and kv.value == b"v%d" % i
        assert kv.mod_revision == result.revision  # the revision each caller was given is its write's


async def test_a_failing_compare_fails_only_its_own_txn(store: EtcdStore) -> None:
    await store.put("taken", b"before")
    txns = [store.txn(*create(f"free{i}", b"x")) for i in range(40)]
    txns.insert(17, store.txn([Compare("taken", "version", "=", 0)], [Put("taken", b"after")], [Get("taken")]))
    results = await asyncio.gather(*txns)
    failed = results.pop(17)
    assert not failed.succeeded
    assert [[kv.value for kv in kvs] for kvs in failed.ranges()] == [[b"before"]]  # its own failure branch ran
    assert all(r.succeeded for r in results)
    assert (await store.get("taken")).value == b"before"  # type: ignore[union-attr]
    for i in range(40):
        assert (await store.get(f"free{i}")) is not None


async def test_concurrent_cas_on_one_key_has_exactly_one_winner(store: EtcdStore) -> None:
    await store.put("counter", b"0")
    kv = await store.get("counter")
    assert kv is not None
    results = await asyncio.gather(*(store.txn([Compare("counter", "mod", "=", kv.mod_revision)],
                                               [Put("counter", b"%d" % i)]) for i in range(20)))
    winners = [i for i, r in enumerate(results) if r.succeeded]
    assert len(winners) == 1
    assert (await store.get("counter")).value == b"%d" % winners[0]  # type: ignore[union-attr]


async def test_more_waiting_txns_than_one_etcd_txn_takes_are_split(store: EtcdStore) -> None:
    results = await asyncio.gather(*(store.txn(*create(f"many{i}", b"v")) for i in range(300)))
    assert all(r.succeeded for r in results)
    assert len({r.revision for r in results}) >= 3  # 300 puts do not fit in fewer txns of 128 ops
    assert len((await store.range("many", prefix=True)).kvs) == 300


async def test_a_batch_etcd_refuses_as_a_whole_is_sent_member_by_member(tmp_path: Path) -> None:
    # This etcd takes 8 ops per txn while the store groups up to 128: each member is then sent alone.
    small = EtcdProcess(tmp_path / "etcd", "--max-txn-ops", "8").start()
    store = await EtcdStore.open(small.url)
    try:
        results = await asyncio.gather(*(store.txn(*create(f"k{i}", b"v")) for i in range(50)))
        assert all(r.succeeded for r in results)
        assert len({r.revision for r in results}) == 50
        lease = await store.grant_lease(30)
        await store.revoke_lease(lease.id)
        txns = [store.txn([], [Put(f"fine{i}", b"v")]) for i in range(10)]
        txns.append(store.txn([], [Put("leased", b"v", lease.id)]))
        outcomes = await asyncio.gather(*txns, return_exceptions=True)
        assert isinstance(outcomes.pop(), LeaseNotFound)  # the member whose lease is gone, and only it
        assert all(isinstance(o, TxnResult) and o.succeeded for o in outcomes)
        bare = await EtcdStore.open(small.url, namespace="")  # where a key may be empty, which etcd refuses
        try:
            puts = await asyncio.gather(bare.put("", b"x"), *(bare.put(f"ok{i}", b"v") for i in range(5)),
                                        return_exceptions=True)
        finally:
            await bare.close()
        assert isinstance(puts[0], StoreError) and "key is not provided" in str(puts[0])
        assert all(isinstance(revision, int) for revision in puts[1:])
    finally:
        await store.close()
        small.stop()


async def test_concurrent_point_reads_share_one_read_txn(store: EtcdStore) -> None:
    await store.txn([], [Put(f"r{i}", b"%d" % i) for i in range(50)])
    found = await asyncio.gather(*(store.get(f"r{i}") for i in range(50)), store.get("absent"))
    assert [kv.value for kv in found[:50] if kv is not None] == [b"%d" % i for i in range(50)]
    assert found[50] is None
    assert store._reads.batches >= 1


class AnswerDropper:
    """A TCP relay to etcd that drops etcd's answer to every txn (after etcd applied it) and closes the
    connection: the client cannot tell whether its write happened. Everything else is relayed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def start(self) -> AnswerDropper:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        txn_sent = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(65536):
                if data.startswith(b"POST /v3/kv/txn "):
                    txn_sent.set()
                up_writer.write(data)

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if txn_sent.is_set():
                    return  # etcd has answered the txn: it is applied, and the client will never know
                writer.write(data)

        tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(answers())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        writer.close()
        up_writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_an_unknown_outcome_reaches_every_member_and_nothing_is_sent_twice(etcd: EtcdProcess) -> None:
    dropper = await AnswerDropper(etcd.client_port).start()
    store = await EtcdStore.open(f"http://127.0.0.1:{dropper.port}", namespace="dropped/")
    direct = await EtcdStore.open(etcd.url, namespace="dropped/")
    try:
        outcomes = await asyncio.gather(*(store.txn(*create(f"k{i}", b"v")) for i in range(30)),
                                        return_exceptions=True)
        assert all(isinstance(o, StoreError) and o.status == 503 for o in outcomes)
        for i in range(30):
            kv = await direct.get(f"k{i}")
            assert kv is not None and kv.version == 1  # applied once by etcd, never resent
    finally:
        await store.close()
        await direct.close()
        dropper.close()


@pytest.mark.parametrize("target", ["version", "create", "mod", "value", "lease"])
@pytest.mark.parametrize("op", ["=", "!=", "<", ">"])
async def test_the_batch_tells_whose_compare_failed_as_etcd_does(store: EtcdStore, target: str, op: str) -> None:
    # A batch whose compares failed is split by this reading of etcd's rules; etcd is the reference.
    await store.put("there", b"m")
    kv = await store.get("there")
    assert kv is not None
    for key in ("there", "absent"):
        for wanted in ((b"a", b"m", b"z") if target == "value" else (0, kv.mod_revision, kv.mod_revision + 1)):
            cmp = Compare(key, target, op, wanted)  # type: ignore[arg-type]
            encoded = store._compare(cmp)
            found = (await store._send_txn({"success": [{"request_range": {"key": encoded["key"]}}]}))
            raw = (found["responses"][0].get("response_range", {}).get("kvs") or [None])[0]
            assert holds(encoded, raw) == (await store.txn([cmp], [])).succeeded, (key, target, op, wanted)
