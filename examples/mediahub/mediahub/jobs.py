"""The jobs service: one processing job per uploaded file (planned from files.uploaded events, run by the transcode
worker through the bus's `transcode` queue), with its status, attempts and result queryable.

It must never do the processing itself, and never plan two jobs for one upload (events may be delivered twice).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from mediahub.api import ApiError, CallerDep, data_dir, new_app, serve
from mediahub.database import Database
from mediahub.events import subscribing_service
from shipyard.sdk.bus import BusApp

log = logging.getLogger("mediahub.jobs")

TRANSCODE_QUEUE = "transcode"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,             -- the upload's id: one job per upload, however often the event comes
    asset_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,            -- queued | running | retrying | succeeded | failed
    attempts INTEGER NOT NULL,
    input TEXT NOT NULL,             -- JSON: the upload (size, sha256, content type)
    result TEXT,                     -- JSON
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_asset ON jobs (asset_id, created_at);
"""
Status = Literal["queued", "running", "retrying", "succeeded", "failed"]

db = Database(data_dir("jobs") / "jobs.db", SCHEMA)
bus = BusApp()
app = new_app("jobs", "Processing jobs: one per uploaded file (checksum, type, metadata, thumbnail), with status.")


class Job(BaseModel):
    id: str
    asset_id: str
    kind: str
    status: Status
    attempts: int
    input: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float


class Outcome(BaseModel):
    status: Literal["succeeded", "retrying", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=2000)


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], asset_id=row["asset_id"], kind=row["kind"], status=row["status"],
               attempts=row["attempts"], input=json.loads(row["input"]),
               result=json.loads(row["result"]) if row["result"] else None, error=row["error"],
               created_at=row["created_at"], updated_at=row["updated_at"])


@bus.subscribe("files.uploaded", group="jobs-planner")
async def plan_job(upload: dict[str, Any]) -> None:
    job_id = str(upload["upload_id"])
    now = time.time()
    job_input = {k: upload.get(k) for k in ("asset_id", "filename", "content_type", "size", "sha256")}
    await db.run(lambda conn: conn.execute(
        "INSERT OR IGNORE INTO jobs (id, asset_id, owner, kind, status, attempts, input, created_at, updated_at)"
        " VALUES (?, ?, ?, 'analyze', 'queued', 0, ?, ?, ?)",
        (job_id, upload["asset_id"], upload.get("owner", ""), json.dumps(job_input), now, now)))
    # After the row: a crash in between redelivers the event, and the key makes the second enqueue a no-op.
    await bus.enqueue(TRANSCODE_QUEUE, {"job_id": job_id, **job_input}, idempotency_key=f"job:{job_id}")
    log.info("job %s planned for asset %s", job_id, upload["asset_id"])


@app.get("/jobs", response_model=list[Job], summary="Your jobs, newest first; filter by asset or status")
async def list_jobs(caller: CallerDep, asset_id: str | None = None, status: Status | None = None,
                    limit: int = 50) -> list[Job]:
    where, params = ["(? OR owner = ?)"], [caller.is_admin, caller.id]
    if asset_id:
        where.append("asset_id = ?")
        params.append(asset_id)
    if status:
        where.append("status = ?")
        params.append(status)
    rows = await db.query(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT ?",
                          (*params, max(1, min(limit, 500))))
    return [_job(r) for r in rows]


@app.get("/jobs/{job_id}", response_model=Job, summary="One job")
async def get_job(job_id: str, caller: CallerDep) -> Job:
    rows = await db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if not rows or not caller.may_change(rows[0]["owner"]):
        raise ApiError(404, "job not found", {"id": job_id})
    return _job(rows[0])


# ---- for the transcode worker (not routed by the gateway) ----------------------------------------------------


async def _change(job_id: str, sql: str, params: tuple[Any, ...]) -> Job:
    def write(conn: sqlite3.Connection) -> sqlite3.Row | None:
        conn.execute(f"UPDATE jobs SET {sql}, updated_at = ? WHERE id = ?", (*params, time.time(), job_id))
        return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    row = await db.run(write)
    if row is None:
        raise ApiError(404, "job not found", {"id": job_id})
    return _job(row)


@app.post("/internal/jobs/{job_id}/attempts", response_model=Job, include_in_schema=False)
async def start_attempt(job_id: str) -> Job:
    return await _change(job_id, "status = 'running', attempts = attempts + 1, error = NULL", ())


@app.put("/internal/jobs/{job_id}/outcome", response_model=Job, include_in_schema=False)
async def record_outcome(job_id: str, body: Outcome) -> Job:
    result = json.dumps(body.result) if body.result is not None else None
    return await _change(job_id, "status = ?, result = COALESCE(?, result), error = ?", (body.status, result,
                                                                                          body.error))


service = subscribing_service(app, "jobs", bus, db.reachable)

if __name__ == "__main__":
    serve(service)
