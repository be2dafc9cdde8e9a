"""The files service: an asset's file, uploaded and downloaded through the gateway as streams (never held in
memory), kept on disk under its data dir; publishes files.uploaded. Also keeps the thumbnail the worker makes.

It must never accept a file for an asset the caller may not change (it asks the assets service), nor more bytes
than max_upload_mb.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from mediahub.api import ApiError, Caller, CallerDep, data_dir, new_app, serve
from mediahub.database import Database
from mediahub.events import subscribing_service
from mediahub.outbox import SCHEMA as OUTBOX_SCHEMA
from mediahub.outbox import Outbox
from shipyard.sdk import client, config
from shipyard.sdk.bus import BusApp

log = logging.getLogger("mediahub.files")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    asset_id TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    uploaded_at REAL NOT NULL
);
"""
WRITE_BATCH = 1024 * 1024  # bytes gathered before one write in a thread: the loop never waits on the disk
ASSET_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Settings:
    """Live settings under KV mediahub/files/ (`shipyard kv put mediahub/files/max_upload_mb 500`)."""

    max_upload_mb: int = 100


settings = config.load(Settings, prefix="mediahub/files")
DATA = data_dir("files")
BLOBS, THUMBS, PARTIAL = DATA / "blobs", DATA / "thumbnails", DATA / "partial"
for folder in (BLOBS, THUMBS, PARTIAL):
    folder.mkdir(exist_ok=True)
db = Database(DATA / "files.db", SCHEMA + OUTBOX_SCHEMA)
bus = BusApp()
outbox = Outbox(db, bus)  # files.uploaded is committed with the file's row
assets = client("assets")
app = new_app("files", "An asset's file: upload (PUT or POST the raw bytes) and download, streamed both ways.")


class FileInfo(BaseModel):
    asset_id: str
    upload_id: str
    filename: str
    content_type: str
    size: int
    sha256: str
    uploaded_at: float


def _info(row: sqlite3.Row) -> FileInfo:
    return FileInfo(**{k: row[k] for k in FileInfo.model_fields})


async def _asset_of(asset_id: str, caller: Caller) -> dict[str, Any]:
    """The assets service decides who may touch an asset: we ask it on the caller's behalf."""
    if not ASSET_ID.match(asset_id):
        raise ApiError(404, "asset not found", {"id": asset_id})
    r = await assets.get(f"/assets/{asset_id}", headers=caller.headers())
    if r.status_code == 404:
        raise ApiError(404, "asset not found", {"id": asset_id})
    if r.status_code != 200:
        raise ApiError(502, "the assets service failed", {"status": r.status_code})
    return r.json()


async def _receive(request: Request, limit: int) -> tuple[Path, int, str]:
    """Streams the body to a partial file, hashing as it goes; stops at `limit` bytes (413)."""
    partial = PARTIAL / f"{uuid.uuid4().hex}.part"
    digest, size, pending = hashlib.sha256(), 0, bytearray()
    fh = await asyncio.to_thread(open, partial, "wb")
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "file too large", {"max_bytes": limit})
            digest.update(chunk)
            pending += chunk
            if len(pending) >= WRITE_BATCH:
                await asyncio.to_thread(fh.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(fh.write, bytes(pending))
        await asyncio.to_thread(fh.close)
    except BaseException:
        fh.close()
        partial.unlink(missing_ok=True)
        raise
    return partial, size, digest.hexdigest()


async def _upload(asset_id: str, request: Request, caller: Caller, filename: str | None) -> FileInfo:
    asset = await _asset_of(asset_id, caller)
    limit = settings.current.max_upload_mb * 1024 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "file too large", {"max_bytes": limit})
    partial, size, sha256 = await _receive(request, limit)
    os.replace(partial, BLOBS / asset_id)  # atomic: a download sees the old file or the new one, never half
    info = FileInfo(asset_id=asset_id, upload_id=uuid.uuid4().hex,
                    filename=(filename or asset["title"])[:255],
                    content_type=request.headers.get("content-type") or "application/octet-stream",
                    size=size, sha256=sha256, uploaded_at=time.time())

    def record(conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT OR REPLACE INTO files (asset_id, upload_id, owner, filename, content_type, size, sha256,"
            " uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (asset_id, info.upload_id, asset["owner"], info.filename, info.content_type, size, sha256,
             info.uploaded_at))
        return outbox.add(conn, "files.uploaded", {**info.model_dump(), "owner": asset["owner"]})

    event = await db.run(record)
    (THUMBS / asset_id).unlink(missing_ok=True)  # the old file's thumbnail no longer applies
    r = await assets.request("PATCH", f"/internal/assets/{asset_id}", json={"status": "uploaded"})
    if r.status_code != 200:
        log.warning("asset %s: could not mark it uploaded (%s)", asset_id, r.status_code)
    await outbox.send_now([event])  # after the asset is marked uploaded: the worker's "ready" must come later
    return info


UPLOAD_DOC = ("Send the file's bytes as the request body (`curl -T photo.jpg` or `--data-binary @photo.jpg`); "
              "the Content-Type header is stored as given. A new upload replaces the previous file.")


@app.put("/files/{asset_id}", status_code=201, response_model=FileInfo, summary="Upload an asset's file",
         description=UPLOAD_DOC)
async def put_file(asset_id: str, request: Request, caller: CallerDep, filename: str | None = None) -> FileInfo:
    return await _upload(asset_id, request, caller, filename)


@app.post("/files/{asset_id}", status_code=201, response_model=FileInfo, summary="Upload an asset's file (POST)",
          description=UPLOAD_DOC)
async def post_file(asset_id: str, request: Request, caller: CallerDep, filename: str | None = None) -> FileInfo:
    return await _upload(asset_id, request, caller, filename)


async def _stored(asset_id: str) -> FileInfo:
    rows = await db.query("SELECT * FROM files WHERE asset_id = ?", (asset_id,))
    if not rows or not (BLOBS / asset_id).exists():
        raise ApiError(404, "no file uploaded for this asset", {"asset_id": asset_id})
    return _info(rows[0])


def _download(info: FileInfo) -> FileResponse:
    return FileResponse(BLOBS / info.asset_id, media_type=info.content_type, filename=info.filename,
                        headers={"X-Checksum-Sha256": info.sha256})


@app.get("/files/{asset_id}", summary="Download an asset's file",
         responses={200: {"content": {"application/octet-stream": {}}, "description": "The file, streamed."}})
async def get_file(asset_id: str, caller: CallerDep) -> FileResponse:
    await _asset_of(asset_id, caller)
    return _download(await _stored(asset_id))


@app.get("/files/{asset_id}/info", response_model=FileInfo, summary="Size, checksum and type of an asset's file")
async def get_file_info(asset_id: str, caller: CallerDep) -> FileInfo:
    await _asset_of(asset_id, caller)
    return await _stored(asset_id)


@app.get("/files/{asset_id}/thumbnail", summary="The thumbnail the transcode worker made (PNG, images only)",
         responses={200: {"content": {"image/png": {}}, "description": "A PNG thumbnail."}})
async def get_thumbnail(asset_id: str, caller: CallerDep) -> FileResponse:
    await _asset_of(asset_id, caller)
    if not (THUMBS / asset_id).exists():
        raise ApiError(404, "no thumbnail for this asset (not an image, or not processed yet)")
    return FileResponse(THUMBS / asset_id, media_type="image/png")


# ---- for the platform's own workers (not routed by the gateway) -----------------------------------------------


@app.get("/internal/files/{asset_id}", include_in_schema=False)
async def get_file_internal(asset_id: str) -> FileResponse:
    return _download(await _stored(asset_id))


@app.put("/internal/files/{asset_id}/thumbnail", status_code=204, include_in_schema=False)
async def put_thumbnail(asset_id: str, request: Request) -> Response:
    await _stored(asset_id)
    partial, _, _ = await _receive(request, 10 * 1024 * 1024)
    os.replace(partial, THUMBS / asset_id)
    return Response(status_code=204)


# ---- following the assets ---------------------------------------------------------------------------------------


@bus.subscribe("assets.deleted", group="files-cleanup")
async def forget_deleted(event: dict[str, Any]) -> None:
    asset_id = str(event.get("id", ""))
    if not ASSET_ID.match(asset_id):
        return
    await db.run(lambda conn: conn.execute("DELETE FROM files WHERE asset_id = ?", (asset_id,)))
    for folder in (BLOBS, THUMBS):
        (folder / asset_id).unlink(missing_ok=True)


service = subscribing_service(app, "files", bus, db.reachable)
outbox.run_with(service)

if __name__ == "__main__":
    serve(service)
