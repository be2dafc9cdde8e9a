"""The search service: full-text search over assets (SQLite FTS5), kept current by following assets.* events.

It must never ask the assets service for data (the events carry it) and never apply an event older than what it
has: events for one asset may arrive out of order across instances, so each carries the asset's version.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from typing import Any

from pydantic import BaseModel

from mediahub.api import CallerDep, data_dir, new_app, serve
from mediahub.database import Database
from mediahub.events import subscribing_service
from shipyard.sdk.bus import BusApp

log = logging.getLogger("mediahub.search")

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    asset_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,   -- a tombstone, so a late assets.updated cannot bring it back
    body TEXT NOT NULL                    -- the asset as last seen (JSON)
);
CREATE VIRTUAL TABLE IF NOT EXISTS assets_fts USING fts5(
    asset_id UNINDEXED, title, description, tags, metadata, tokenize = 'unicode61 remove_diacritics 2'
);
"""
TERM = re.compile(r"\w+", re.UNICODE)

db = Database(data_dir("search") / "search.db", SCHEMA)
bus = BusApp()
app = new_app("search", "Full-text search over assets: title, description, tags and metadata (SQLite FTS5).")


class Hit(BaseModel):
    id: str
    title: str
    description: str
    tags: list[str]
    status: str
    snippet: str
    score: float


def _text(value: Any) -> str:
    """Metadata values as words: {"camera": "X100", "iso": 200} -> "camera X100 iso 200"."""
    if isinstance(value, dict):
        return " ".join(f"{k} {_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def fts_query(text: str) -> str:
    """User text -> an FTS5 query that cannot be a syntax error: every word quoted, all required, the last one
    also as a prefix (search as you type)."""
    words = TERM.findall(text)
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " AND ".join(quoted)


def _apply(conn: sqlite3.Connection, asset_id: str, owner: str, version: int, asset: dict[str, Any] | None) -> bool:
    row = conn.execute("SELECT version FROM documents WHERE asset_id = ?", (asset_id,)).fetchone()
    if row is not None and row["version"] >= version:
        return False  # we already have this or a newer state
    conn.execute("DELETE FROM assets_fts WHERE asset_id = ?", (asset_id,))
    conn.execute("INSERT OR REPLACE INTO documents (asset_id, owner, version, deleted, body) VALUES (?, ?, ?, ?, ?)",
                 (asset_id, owner, version, int(asset is None), json.dumps(asset or {})))
    if asset is not None:
        technical = asset.get("technical") or {}
        conn.execute("INSERT INTO assets_fts (asset_id, title, description, tags, metadata) VALUES (?, ?, ?, ?, ?)",
                     (asset_id, asset.get("title", ""), asset.get("description", ""),
                      " ".join(asset.get("tags") or ()),
                      _text(asset.get("metadata")) + " " + _text({k: technical.get(k) for k in ("format", "mime")})))
    return True


@bus.subscribe(["assets.created", "assets.updated", "assets.deleted"], group="search-indexer")
async def index_asset(event: dict[str, Any], message) -> None:  # type: ignore[no-untyped-def]
    asset_id, owner, version = str(event["id"]), str(event.get("owner", "")), int(event["version"])
    asset = None if message.topic == "assets.deleted" else event
    changed = await db.run(lambda conn: _apply(conn, asset_id, owner, version, asset))
    log.info("%s %s v%d: %s", message.topic, asset_id, version, "indexed" if changed else "already newer")


@app.get("/search", response_model=list[Hit], summary="Search your assets (admins: everyone's)")
async def search(caller: CallerDep, q: str, limit: int = 20) -> list[Hit]:
    query = fts_query(q)
    if not query:
        return []
    limit = max(1, min(limit, 200))
    rows = await db.query(
        "SELECT d.body, bm25(assets_fts) AS score,"
        " snippet(assets_fts, -1, '[', ']', '…', 12) AS snippet"
        " FROM assets_fts JOIN documents d ON d.asset_id = assets_fts.asset_id"
        " WHERE assets_fts MATCH ? AND d.deleted = 0 AND (? OR d.owner = ?)"
        " ORDER BY score LIMIT ?",
        (query, caller.is_admin, caller.id, limit))
    hits = []
    for row in rows:
        body = json.loads(row["body"])
        hits.append(Hit(id=body["id"], title=body["title"], description=body["description"], tags=body["tags"],
                        status=body["status"], snippet=row["snippet"], score=-row["score"]))
    return hits


service = subscribing_service(app, "search", bus, db.reachable)

if __name__ == "__main__":
    serve(service)
