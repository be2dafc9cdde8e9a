"""The autopilot configuration Consul's operator API reads and writes, kept under `operator/autopilot`.

Only the stored settings; what they mean for a deployment without Raft is decided by the operator API, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from shipyard.errors import BadRequest
from shipyard.store import Compare, Put

if TYPE_CHECKING:
    from shipyard.store import Store

AUTOPILOT_KEY = "operator/autopilot"
# Consul's defaults (agent/config/default.go).
DEFAULTS: dict[str, Any] = {
    "CleanupDeadServers": True, "LastContactThreshold": "200ms", "MaxTrailingLogs": 250, "MinQuorum": 0,
    "ServerStabilizationTime": "10s", "RedundancyZoneTag": "", "DisableUpgradeMigration": False,
    "UpgradeVersionTag": "",
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "CleanupDeadServers": bool, "LastContactThreshold": str, "MaxTrailingLogs": int, "MinQuorum": int,
    "ServerStabilizationTime": str, "RedundancyZoneTag": str, "DisableUpgradeMigration": bool,
    "UpgradeVersionTag": str,
}


async def read_autopilot(store: Store) -> dict[str, Any]:
    kv = await store.get(AUTOPILOT_KEY)
    if kv is None:
        return {**DEFAULTS, "CreateIndex": 0, "ModifyIndex": 0}
    return {**DEFAULTS, **orjson.loads(kv.value), "CreateIndex": kv.create_revision, "ModifyIndex": kv.mod_revision}


async def write_autopilot(store: Store, body: Any, cas: int | None) -> bool:
    """Replaces the configuration (fields left out take Consul's defaults); with cas, only if ModifyIndex is it."""
    if not isinstance(body, dict):
        raise BadRequest("Request decode failed: expected a JSON object")
    config = dict(DEFAULTS)
    for key, value in body.items():
        if key in ("CreateIndex", "ModifyIndex"):
            continue
        wanted = _TYPES.get(key)
        if wanted is None:
            raise BadRequest(f"Request decode failed: unknown field {key!r}")
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise BadRequest(f"Request decode failed: {key} has the wrong type")
        config[key] = value
    compares = [] if cas is None else [Compare(AUTOPILOT_KEY, "mod", "=", cas)]
    result = await store.txn(compares, [Put(AUTOPILOT_KEY, orjson.dumps(config))])
    return result.succeeded
