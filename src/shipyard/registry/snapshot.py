"""Snapshots of the whole store (Consul's /v1/snapshot and `shipyard snapshot save|restore`): one file holding every
key at one revision, and a restore that replaces the store's contents with it in one transaction.

The file format (version 1) is a gzipped tar, as Consul's is, with three members:
  meta.json    {"Format": "shipyard-snapshot", "Version": 1, "Revision", "Datacenter", "Node", "CreatedAt", "Keys"}
  state.jsonl  one JSON object per key, in key order: {"Key": str, "Value": base64, "Lease": int (0: none)}
  leases.json  {"<lease id>": ttl seconds} for the leases keys were attached to
  SHA256SUMS   "<sha256 hex>  <member>" lines for the three members above, checked before anything is restored.
A restored lease is a new lease with the same TTL, counted from the restore (as etcd does after a restart).
The restore is one store transaction: on SQLite any size; on etcd it is bounded by the cluster's --max-txn-ops
(default 128 keys) and --max-request-bytes, and a larger snapshot is refused whole (raise those to restore it).
A key created by a write racing the restore (after its read of the current keys) survives it.
This module never writes part of a snapshot: a file that does not verify changes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import tarfile
from typing import TYPE_CHECKING, Any

import orjson

from shipyard.errors import BadRequest, ShipyardError
from shipyard.store import Delete, LeaseNotFound, Put

if TYPE_CHECKING:
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

FORMAT = "shipyard-snapshot"
VERSION = 1
MEMBERS = ("meta.json", "state.jsonl", "leases.json")
MAX_SNAPSHOT = 1 << 30  # a restore body larger than this is refused before it is read


class SnapshotError(BadRequest):
    """The file is not a snapshot this server can restore (a 400, and nothing changed)."""


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def pack(members: dict[str, bytes]) -> bytes:
    sums = "".join(f"{hashlib.sha256(members[name]).hexdigest()}  {name}\n" for name in MEMBERS)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in MEMBERS:
            _member(tar, name, members[name])
        _member(tar, "SHA256SUMS", sums.encode())
    return gzip.compress(raw.getvalue(), mtime=0)


def unpack(data: bytes) -> dict[str, bytes]:
    """The verified members of a snapshot file, or SnapshotError saying what is wrong with it."""
    try:
        raw = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r") as tar:
            members = {}
            for info in tar.getmembers():
                handle = tar.extractfile(info) if info.isfile() else None
                if handle is not None:
                    members[info.name] = handle.read()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise SnapshotError(f"not a snapshot file (a gzipped tar): {exc}") from None
    missing = [name for name in (*MEMBERS, "SHA256SUMS") if name not in members]
    if missing:
        raise SnapshotError(f"snapshot is missing {', '.join(missing)}")
    sums: dict[str, str] = {}
    for line in members["SHA256SUMS"].decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    for name in MEMBERS:
        if sums.get(name) != hashlib.sha256(members[name]).hexdigest():
            raise SnapshotError(f"snapshot checksum mismatch for {name}: the file is damaged")
    return members


async def save_snapshot(store: Store, node: NodeIdentity) -> tuple[bytes, int]:
    """(the snapshot file, the store revision it holds)."""
    held = await store.range("", prefix=True)
    ttls: dict[int, int] = {}
    lines = []
    for kv in held.kvs:
        if kv.lease and kv.lease not in ttls:
            try:
                # The store contract offers a lease's TTL only through a keepalive: saving renews the lease once.
                ttls[kv.lease] = await store.keepalive(kv.lease)
            except LeaseNotFound:
                continue  # expired since the read: its keys are going away, so they are not saved
        lines.append(orjson.dumps({"Key": kv.key, "Value": base64.b64encode(kv.value).decode(), "Lease": kv.lease}))
    meta = {
        "Format": FORMAT, "Version": VERSION, "Revision": held.revision, "Datacenter": node.datacenter,
        "Node": node.name, "CreatedAt": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "Keys": len(lines),
    }
    members = {
        "meta.json": orjson.dumps(meta),
        "state.jsonl": b"\n".join(lines) + (b"\n" if lines else b""),
        "leases.json": orjson.dumps({str(k): v for k, v in ttls.items()}),
    }
    return pack(members), held.revision


def read_snapshot(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, int]]:
    """(meta, entries, lease TTLs) of a verified snapshot file."""
    members = unpack(data)
    try:
        meta = orjson.loads(members["meta.json"])
        entries = [orjson.loads(line) for line in members["state.jsonl"].splitlines() if line.strip()]
        leases = {int(k): int(v) for k, v in orjson.loads(members["leases.json"]).items()}
        values = [(str(e["Key"]), base64.b64decode(e["Value"], validate=True), int(e.get("Lease") or 0))
                  for e in entries]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot contents do not decode: {exc}") from None
    if meta.get("Format") != FORMAT or meta.get("Version") != VERSION:
        raise SnapshotError(f"unsupported snapshot format {meta.get('Format')!r} version {meta.get('Version')!r}")
    decoded = [{"Key": k, "Value": v, "Lease": lease} for k, v, lease in values]
    return meta, decoded, leases


async def restore_snapshot(store: Store, data: bytes) -> int:
    """Replaces everything in the store with the snapshot's keys in one transaction; returns its revision."""
    _, entries, ttls = read_snapshot(data)
    granted: dict[int, int] = {}
    try:
        for old in sorted({e["Lease"] for e in entries if e["Lease"]}):
            granted[old] = (await store.grant_lease(ttls.get(old, 60))).id
        # Every key the snapshot lacks is deleted by name, not by one range delete over everything: etcd refuses a
        # txn whose range delete covers a key it also puts ("duplicate key given in txn request").
        wanted = {e["Key"] for e in entries}
        current = await store.range("", prefix=True)
        ops: list[Put | Delete] = [Delete(kv.key) for kv in current.kvs if kv.key not in wanted]
        ops += [Put(e["Key"], e["Value"], granted.get(e["Lease"], 0)) for e in entries]
        result = await store.txn([], ops)
    except BaseException:
        for lease in granted.values():
            with contextlib.suppress(Exception):
                await store.revoke_lease(lease)
        raise
    if not result.succeeded:
        raise ShipyardError("snapshot restore did not commit", status=500)
    return result.revision
