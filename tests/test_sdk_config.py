"""shipyard.sdk.config against a real server's KV: typed defaults, typed values read at load, live changes through
the blocking query with on_change callbacks, bad values keeping the last good one, deleted keys back to defaults,
and Service starting the watch; the value parsing rules in isolation.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from starlette.applications import Starlette

from shipyard.sdk import Service, config
from shipyard.sdk.config import parse_value
from support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("sdk-config") / "data", "--no-gateway").start()
    yield proc
    proc.stop()


class AssetSettings(config.Settings):
    max_upload_mb: int = 100
    thumbnail_size: int = 128
    quality: float = 0.8
    thumbnails: bool = True
    bucket: str = "assets"
    formats: list[str] = ["jpg", "png"]  # Settings copies mutable defaults per instance
    limits: dict[str, int] = {}
    retention_days: int | None = None


def put(server: ServerProcess, key: str, value: str) -> None:
    assert requests.put(f"{server.url}/v1/kv/{key}", data=value.encode(), timeout=5).json() is True


def delete(server: ServerProcess, key: str, *, recurse: bool = False) -> None:
    requests.delete(f"{server.url}/v1/kv/{key}", params={"recurse": "1"} if recurse else {}, timeout=5)


async def aput(server: ServerProcess, key: str, value: str) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.put(f"{server.url}/v1/kv/{key}", content=value.encode())).json() is True


def test_defaults_without_any_key(server: ServerProcess) -> None:
    settings = config.load(AssetSettings, prefix="cfg-empty/assets", server=server.addr)
    assert settings.current == AssetSettings()
    assert settings.max_upload_mb == 100 and settings.formats == ["jpg", "png"]
    assert settings.current.formats is not AssetSettings().formats  # a copy per instance


def test_typed_values_are_read_at_load(server: ServerProcess) -> None:
    prefix = "cfg-typed/assets"
    for key, value in {
        "max_upload_mb": "250", "quality": "0.5", "thumbnails": "off", "bucket": "media",
        "formats": '["webp"]', "limits": '{"per_user": 3}', "retention_days": "30",
        "unknown_field": "ignored", "nested/max_upload_mb": "1",
    }.items():
        put(server, f"{prefix}/{key}", value)
    put(server, "cfg-typed/assets2/thumbnail_size", "1")  # another prefix that merely starts alike
    settings = config.load(AssetSettings, prefix=prefix, server=server.addr)  # no loop running: reads at once
    assert settings.current == AssetSettings(
        max_upload_mb=250, quality=0.5, thumbnails=False, bucket="media", formats=["webp"],
        limits={"per_user": 3}, retention_days=30,
    )


async def test_kv_changes_apply_live_fire_on_change_and_bad_values_keep_the_last_good_one(
    server: ServerProcess,
) -> None:
    prefix = "cfg-live/assets"
    settings = config.load(AssetSettings, prefix=prefix, server=server.addr)
    changes: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
    sync_calls: list[int] = []

    @settings.on_change
    async def record(old: AssetSettings, new: AssetSettings) -> None:
        await changes.put((old, new))

    @settings.on_change
    def also_sync(old: AssetSettings, new: AssetSettings) -> None:
        sync_calls.append(new.max_upload_mb)

    @settings.on_change
    def broken(old: AssetSettings, new: AssetSettings) -> None:
        raise RuntimeError("a broken callback must not stop the others or the watch")

    await settings.watch()
    assert settings.current == AssetSettings()

    await aput(server, f"{prefix}/max_upload_mb", "300")
    old, new = await asyncio.wait_for(changes.get(), 10)
    assert (old.max_upload_mb, new.max_upload_mb) == (100, 300)
    assert settings.max_upload_mb == 300 and sync_calls == [300]

    # A value that does not parse is ignored: the field keeps 300 while other fields still follow the KV.
    await aput(server, f"{prefix}/max_upload_mb", "lots")
    await aput(server, f"{prefix}/thumbnail_size", "64")
    old, new = await asyncio.wait_for(changes.get(), 10)
    assert new.thumbnail_size == 64 and new.max_upload_mb == 300

    # Fixed value applies; a deleted key goes back to its default.
    await aput(server, f"{prefix}/max_upload_mb", "50")
    old, new = await asyncio.wait_for(changes.get(), 10)
    assert new.max_upload_mb == 50
    async with httpx.AsyncClient() as http:
        await http.delete(f"{server.url}/v1/kv/{prefix}/thumbnail_size")
    old, new = await asyncio.wait_for(changes.get(), 10)
    assert (old.thumbnail_size, new.thumbnail_size) == (64, 128)
    await settings.aclose()


async def test_service_starts_watching_loaded_settings(server: ServerProcess) -> None:
    prefix = "cfg-service/assets"
    delete(server, prefix, recurse=True)
    settings = config.load(AssetSettings, prefix=prefix, server=server.addr)
    await aput(server, f"{prefix}/bucket", "from-kv")
    assert settings.bucket == "assets"  # loaded inside a running loop: not read until watched
    service = Service(Starlette(), name="cfg-user", port=0, server=server.addr)
    seen: list[str] = []

    @service.on_startup
    async def startup() -> None:
        seen.append(settings.bucket)  # settings are in before the hooks run
        service.stop()

    await asyncio.wait_for(service.serve(), 15)
    assert seen == ["from-kv"]


def test_value_parsing_rules() -> None:
    assert parse_value(b" 42 ", int) == 42
    assert parse_value(b"yes", bool) is True and parse_value(b"0", bool) is False
    assert parse_value(b"", int | None) is None and parse_value(b"7", int | None) == 7
    assert parse_value(b'["a"]', tuple[str, ...]) == ("a",)
    for raw, hint in ((b"1.5", int), (b"maybe", bool), (b"{}", list), (b"[1", dict), (b"x", float)):
        with pytest.raises(ValueError):
            parse_value(raw, hint)


def test_plain_dataclasses_work_too(server: ServerProcess) -> None:
    @dataclasses.dataclass(frozen=True)
    class Plain:
        workers: int = 2

    put(server, "cfg-plain/workers", "8")
    assert config.load(Plain, prefix="cfg-plain", server=server.addr).workers == 8
