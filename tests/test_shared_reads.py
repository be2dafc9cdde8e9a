"""Blocking queries woken by the same change that ask the same thing share one read (api/consul/common.py)."""

from __future__ import annotations

import asyncio

import pytest

from shipyard.api.consul.common import _SHARED_READS, _shared_read

ReadResult = tuple[object, int, int]


async def test_concurrent_reads_of_one_key_run_once_and_all_get_the_answer() -> None:
    calls = 0
    release = asyncio.Event()

    async def read() -> ReadResult:
        nonlocal calls
        calls += 1
        await release.wait()
        return ["answer"], 7, 70

    waiters = [asyncio.ensure_future(_shared_read(("k", 1), read)) for _ in range(50)]
    other = asyncio.ensure_future(_shared_read(("k", 2), read))  # another key: its own read
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*waiters, other)
    assert calls == 2 and all(a == (["answer"], 7, 70) for a in answers)
    assert _SHARED_READS == {}  # forgotten once done: the next change reads again
    await _shared_read(("k", 1), read)
    assert calls == 3


async def test_a_waiter_that_leaves_does_not_cancel_the_read_of_the_others() -> None:
    release = asyncio.Event()

    async def read() -> ReadResult:
        await release.wait()
        return "fresh", 1, 1

    leaving = asyncio.ensure_future(_shared_read("k", read))
    staying = asyncio.ensure_future(_shared_read("k", read))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await staying == ("fresh", 1, 1)
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_a_failed_read_fails_every_waiter_and_is_not_kept() -> None:
    async def read() -> ReadResult:
        await asyncio.sleep(0.01)
        raise RuntimeError("store closed")

    results = await asyncio.gather(*(_shared_read("bad", read) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "bad" not in _SHARED_READS
