"""The transcode worker: takes a job from the bus's `transcode` queue, fetches the file from the files service,
computes its sha256, sniffs its type, reads real metadata (Pillow for images) and makes a thumbnail, then records
the outcome with the jobs and assets services. Run by the platform as `shipyard worker mediahub.transcode:bus`.

It must never reach another service's storage directly (only their APIs, through shipyard.sdk.client), and never
retry what cannot succeed (a corrupt image fails at once; an unreachable service is retried with backoff).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from shipyard.sdk import client, config
from shipyard.sdk.bus import BusApp, Reject

log = logging.getLogger("mediahub.transcode")

MAX_ATTEMPTS = 6  # 1+2+4+8+16 s of backoff: rides out a service restart; then the job is failed (dead letter)
FETCH_TIMEOUT = 120.0
CHUNK = 1024 * 1024
SNIFF_BYTES = 4096
# Leading bytes of common media containers, for files Pillow does not open.
SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF-", 0, "application/pdf"),
    (b"ID3", 0, "audio/mpeg"),
    (b"OggS", 0, "audio/ogg"),
    (b"fLaC", 0, "audio/flac"),
    (b"WAVE", 8, "audio/wav"),
    (b"AVI ", 8, "video/x-msvideo"),
    (b"ftypqt", 4, "video/quicktime"),
    (b"ftyp", 4, "video/mp4"),
    (b"\x1aE\xdf\xa3", 0, "video/webm"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"\x1f\x8b", 0, "application/gzip"),
)


@dataclass
class Settings:
    """Live settings under KV mediahub/transcode/ (`shipyard kv put mediahub/transcode/thumbnail_size 256`)."""

    thumbnail_size: int = 128


settings = config.load(Settings, prefix="mediahub/transcode")
bus = BusApp()


class Unprocessable(Exception):
    """The bytes themselves are the problem: trying again cannot help."""


def sniff(head: bytes) -> str:
    """A MIME type from a file's first bytes, for what Pillow does not open."""
    for magic, offset, mime in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return mime
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            head[:len(head) - cut].decode("utf-8")
            return "text/plain"
        except UnicodeDecodeError:
            continue
    return "application/octet-stream"


def analyze(path: Path, thumbnail_size: int) -> tuple[dict[str, Any], bytes | None]:
    """The technical metadata of the file at `path` and, for images, a PNG thumbnail. CPU work: run in a thread."""
    facts: dict[str, Any] = {}
    try:
        with Image.open(path) as image:
            facts.update(kind="image", format=image.format, mime=Image.MIME.get(image.format or "", ""),
                         width=image.width, height=image.height, mode=image.mode,
                         frames=getattr(image, "n_frames", 1))
            image.load()  # decode the pixels now: a truncated or corrupt file fails here, not in thumbnail()
            thumb = image.copy()
    except UnidentifiedImageError:
        with open(path, "rb") as fh:
            facts.update(kind="file", mime=sniff(fh.read(SNIFF_BYTES)))
        return facts, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Unprocessable(f"cannot decode the {facts.get('format') or 'image'}: {exc}") from None
    thumb.thumbnail((thumbnail_size, thumbnail_size))
    if thumb.mode not in ("RGB", "RGBA", "L", "LA"):
        thumb = thumb.convert("RGBA")
    out = io.BytesIO()
    thumb.save(out, format="PNG", optimize=True)
    facts["thumbnail"] = {"width": thumb.width, "height": thumb.height, "format": "PNG"}
    return facts, out.getvalue()


async def fetch(asset_id: str, into: Path) -> tuple[int, str]:
    """Streams the asset's file from the files service to `into`, hashing on the way: (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    async with client("files").stream("GET", f"/internal/files/{asset_id}", timeout=FETCH_TIMEOUT) as r:
        if r.status_code == 404:
            raise Unprocessable("the file is gone (asset deleted?)")
        r.raise_for_status()
        with open(into, "wb") as fh:
            async for chunk in r.aiter_bytes(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(fh.write, chunk)
    return size, digest.hexdigest()


async def _report(job_id: str, status: str, *, result: dict[str, Any] | None = None, error: str | None = None
                  ) -> None:
    r = await client("jobs").put(f"/internal/jobs/{job_id}/outcome",
                                 json={"status": status, "result": result, "error": error})
    r.raise_for_status()


async def _run(task: dict[str, Any]) -> dict[str, Any]:
    asset_id = task["asset_id"]
    fd, name = tempfile.mkstemp(prefix=f"mediahub-{asset_id}-")
    os.close(fd)
    local = Path(name)
    try:
        size, sha256 = await fetch(asset_id, local)
        facts, thumbnail = await asyncio.to_thread(analyze, local, settings.current.thumbnail_size)
    finally:
        local.unlink(missing_ok=True)
    facts.update(size=size, sha256=sha256, matches_upload=sha256 == task.get("sha256"))  # False: replaced since
    if thumbnail is not None:
        r = await client("files").put(f"/internal/files/{asset_id}/thumbnail", content=thumbnail)
        r.raise_for_status()
    r = await client("assets").request("PATCH", f"/internal/assets/{asset_id}",
                                       json={"status": "ready", "technical": facts})
    if r.status_code != 404:  # deleted meanwhile: nothing to record on
        r.raise_for_status()
    return facts


@bus.task("transcode", max_attempts=MAX_ATTEMPTS, prefetch=2)
async def transcode(task: dict[str, Any], message) -> None:  # type: ignore[no-untyped-def]
    job_id = task["job_id"]
    await settings.watch()  # no Service here to start it: follow the KV from the first task on (idempotent)
    r = await client("jobs").post(f"/internal/jobs/{job_id}/attempts")
    if r.status_code == 404:
        raise Reject(f"job {job_id} does not exist")
    r.raise_for_status()
    try:
        facts = await _run(task)
    except Unprocessable as exc:
        log.warning("job %s failed for good: %s", job_id, exc)
        await _report(job_id, "failed", error=str(exc))
        await _mark_asset(task["asset_id"], "failed")
        raise Reject(str(exc)) from None
    except Exception as exc:
        final = message.attempts >= MAX_ATTEMPTS
        log.warning("job %s attempt %d failed%s: %s", job_id, message.attempts, "" if final else ", will retry", exc)
        try:
            await _report(job_id, "failed" if final else "retrying", error=f"{type(exc).__name__}: {exc}")
        except Exception:
            pass  # the jobs service may be what is down; the bus still retries the task
        raise
    await _report(job_id, "succeeded", result=facts)
    log.info("job %s done: %s %s bytes", job_id, facts.get("mime"), facts["size"])


async def _mark_asset(asset_id: str, status: str) -> None:
    try:
        await client("assets").request("PATCH", f"/internal/assets/{asset_id}", json={"status": status})
    except Exception as exc:
        log.warning("asset %s: could not mark it %s: %s", asset_id, status, exc)
