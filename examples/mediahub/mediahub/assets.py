"""The assets service: media assets and their metadata in its own SQLite; publishes assets.created, assets.updated
and assets.deleted on the bus (the search index and anyone else follow those).

It must never store file bytes (the files service does) nor compute technical metadata (the transcode worker does).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from mediahub.api import ApiError, Caller, CallerDep, data_dir, new_app, serve
from mediahub.database import Database
from mediahub.outbox import SCHEMA as OUTBOX_SCHEMA
from mediahub.outbox import Outbox
from shipyard.sdk import Service
from shipyard.sdk.bus import BusApp

SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,            -- JSON list
    metadata TEXT NOT NULL,        -- JSON object, the user's
    technical TEXT NOT NULL,       -- JSON object, set by the transcode worker
    status TEXT NOT NULL,          -- new | uploaded | ready | failed
    version INTEGER NOT NULL,      -- +1 on every change: event consumers keep the newest
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS assets_by_owner ON assets (owner, created_at);
"""

db = Database(data_dir("assets") / "assets.db", SCHEMA + OUTBOX_SCHEMA)
bus = BusApp()
outbox = Outbox(db, bus)  # events committed with the change they announce
app = new_app("assets", "Media assets and their descriptive metadata. Changes are published as assets.* events.")


class AssetIn(BaseModel):
    title: str = Field(min_length=1, max_length=500, examples=["Sunset over the harbour"])
    description: str = Field(default="", max_length=20_000)
    tags: list[str] = Field(default_factory=list, max_length=100)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AssetPatch(BaseModel):
    title: str | None = Field(default=None, min_length=1, max_length=500)
    description: str | None = Field(default=None, max_length=20_000)
    tags: list[str] | None = Field(default=None, max_length=100)
    metadata: dict[str, Any] | None = None


class TechnicalUpdate(BaseModel):
    """What the platform's own workers record about an asset's file."""

    status: str | None = Field(default=None, pattern="^(new|uploaded|ready|failed)$")
    technical: dict[str, Any] | None = None


class Asset(BaseModel):
    id: str
    owner: str
    title: str
    description: str
    tags: list[str]
    metadata: dict[str, Any]
    technical: dict[str, Any]
    status: str
    version: int
    created_at: float
    updated_at: float


def _asset(row: sqlite3.Row) -> Asset:
    return Asset(id=row["id"], owner=row["owner"], title=row["title"], description=row["description"],
                 tags=json.loads(row["tags"]), metadata=json.loads(row["metadata"]),
                 technical=json.loads(row["technical"]), status=row["status"], version=row["version"],
                 created_at=row["created_at"], updated_at=row["updated_at"])


async def _load(asset_id: str) -> Asset:
    rows = await db.query("SELECT * FROM assets WHERE id = ?", (asset_id,))
    if not rows:
        raise ApiError(404, "asset not found", {"id": asset_id})
    return _asset(rows[0])


async def _visible(asset_id: str, caller: Caller) -> Asset:
    asset = await _load(asset_id)
    if not caller.may_change(asset.owner):
        raise ApiError(404, "asset not found", {"id": asset_id})  # others' assets are not even listed
    return asset


async def _update(asset_id: str, changes: dict[str, Any]) -> Asset:
    def write(conn: sqlite3.Connection) -> tuple[Asset, int] | None:
        sets = ", ".join(f"{k} = ?" for k in changes)
        values = [json.dumps(v) if isinstance(v, list | dict) else v for v in changes.values()]
        conn.execute(f"UPDATE assets SET {sets}, version = version + 1, updated_at = ? WHERE id = ?",
                     (*values, time.time(), asset_id))
        row = conn.execute("SELECT * FROM assets WHERE id = ?", (asset_id,)).fetchone()
        if row is None:
            return None
        asset = _asset(row)
        return asset, outbox.add(conn, "assets.updated", asset.model_dump())

    written = await db.run(write)
    if written is None:
        raise ApiError(404, "asset not found", {"id": asset_id})
    asset, event = written
    await outbox.send_now([event])
    return asset


@app.post("/assets", status_code=201, response_model=Asset, summary="Create an asset")
async def create_asset(body: AssetIn, caller: CallerDep) -> Asset:
    now = time.time()
    asset_id = uuid.uuid4().hex

    def insert(conn: sqlite3.Connection) -> tuple[Asset, int]:
        conn.execute(
            "INSERT INTO assets (id, owner, title, description, tags, metadata, technical, status, version,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, '{}', 'new', 1, ?, ?)",
            (asset_id, caller.id, body.title, body.description, json.dumps(body.tags), json.dumps(body.metadata),
             now, now))
        asset = _asset(conn.execute("SELECT * FROM assets WHERE id = ?", (asset_id,)).fetchone())
        return asset, outbox.add(conn, "assets.created", asset.model_dump())

    asset, event = await db.run(insert)
    await outbox.send_now([event])  # on the bus once this returns; if this process dies first, the relay sends it
    return asset


@app.get("/assets", response_model=list[Asset], summary="Your assets, newest first (admins: everyone's)")
async def list_assets(caller: CallerDep, limit: int = 50, offset: int = 0) -> list[Asset]:
    limit, offset = max(1, min(limit, 500)), max(0, offset)
    if caller.is_admin:
        rows = await db.query("SELECT * FROM assets ORDER BY created_at DESC LIMIT ? OFFSET ?", (limit, offset))
    else:
        rows = await db.query("SELECT * FROM assets WHERE owner = ? ORDER BY created_at DESC LIMIT ? OFFSET ?",
                              (caller.id, limit, offset))
    return [_asset(r) for r in rows]


@app.get("/assets/{asset_id}", response_model=Asset, summary="One asset")
async def get_asset(asset_id: str, caller: CallerDep) -> Asset:
    return await _visible(asset_id, caller)


@app.patch("/assets/{asset_id}", response_model=Asset, summary="Change an asset's title, description, tags, metadata")
async def patch_asset(asset_id: str, body: AssetPatch, caller: CallerDep) -> Asset:
    await _visible(asset_id, caller)
    changes = body.model_dump(exclude_none=True)
    if not changes:
        return await _load(asset_id)
    return await _update(asset_id, changes)


@app.delete("/assets/{asset_id}", status_code=204, summary="Delete an asset")
async def delete_asset(asset_id: str, caller: CallerDep) -> None:
    asset = await _visible(asset_id, caller)

    def delete(conn: sqlite3.Connection) -> int:
        conn.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
        return outbox.add(conn, "assets.deleted", {"id": asset_id, "owner": asset.owner, "version": asset.version + 1})

    await outbox.send_now([await db.run(delete)])


# ---- for the platform's own services (not routed by the gateway) ----------------------------------------------


@app.get("/internal/assets/{asset_id}", response_model=Asset, include_in_schema=False)
async def get_asset_internal(asset_id: str) -> Asset:
    return await _load(asset_id)


@app.patch("/internal/assets/{asset_id}", response_model=Asset, include_in_schema=False)
async def record_technical(asset_id: str, body: TechnicalUpdate) -> Asset:
    return await _update(asset_id, body.model_dump(exclude_none=True))


async def healthy() -> bool:
    return await db.reachable()


service = Service(app, name="assets", health=healthy)
outbox.run_with(service)

if __name__ == "__main__":
    serve(service)
