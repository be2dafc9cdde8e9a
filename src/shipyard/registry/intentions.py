"""Connect intentions, kept as Consul 1.9+ keeps them: the Sources of `service-intentions` config entries (one per
destination), with the legacy ID API mapped onto each source's LegacyID; matching and the allow/deny decision.

Reads and writes only through shipyard.registry.config_entries; it never authorises a connection itself.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest, NotFound, ShipyardError
from shipyard.registry.config_entries import ConfigEntries, ConfigEntry, decode_entry, kind_prefix

if TYPE_CHECKING:
    from shipyard.store import Store

KIND = "service-intentions"
WILDCARD = "*"
ACTIONS = ("allow", "deny")
_ATTEMPTS = 32
# With ACLs disabled Consul's default intention policy is allow.
DEFAULT_ALLOW = True

Source = dict[str, Any]


def precedence(source: str, destination: str) -> int:
    """Consul's open-source precedence: an exact destination beats a wildcard one, then an exact source."""
    if destination != WILDCARD:
        return 9 if source != WILDCARD else 8
    return 6 if source != WILDCARD else 5


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"Request decode failed: {name} must be a string")
    return value


def intention_fields(body: Any) -> tuple[str, str, Source]:
    """(source, destination, the stored source record) from a legacy intention body, validated as Consul does."""
    if not isinstance(body, dict):
        raise BadRequest("Request decode failed: expected a JSON object")
    source, destination = _string(body, "SourceName"), _string(body, "DestinationName")
    if not source:
        raise BadRequest("Invalid Intention: SourceName must be set")
    if not destination:
        raise BadRequest("Invalid Intention: DestinationName must be set")
    action = _string(body, "Action")
    if action not in ACTIONS:
        raise BadRequest("Invalid Intention: Action must be set to 'allow' or 'deny'")
    source_type = _string(body, "SourceType") or "consul"
    if source_type != "consul":
        raise BadRequest(f"Invalid Intention: SourceType must be set to 'consul', got {source_type!r}")
    meta = body.get("Meta") or {}
    if not isinstance(meta, dict):
        raise BadRequest("Request decode failed: Meta must be an object")
    record: Source = {
        "Name": source, "Action": action, "Description": _string(body, "Description"), "Type": source_type,
        "Precedence": precedence(source, destination), "LegacyMeta": meta,
    }
    return source, destination, record


def intention_shape(destination: str, source: Source, entry: ConfigEntry) -> dict[str, Any]:
    """One source of a service-intentions entry in the shape of Consul's /v1/connect/intentions answers."""
    return {
        "ID": source.get("LegacyID", ""), "Description": source.get("Description", ""),
        "SourceNS": "default", "SourceName": source["Name"], "DestinationNS": "default",
        "DestinationName": destination, "SourcePartition": "default", "DestinationPartition": "default",
        "SourceType": source.get("Type", "consul"), "Action": source.get("Action", ""),
        "Permissions": source.get("Permissions"), "Meta": source.get("LegacyMeta") or {},
        "Precedence": precedence(source["Name"], destination),
        "CreatedAt": source.get("LegacyCreateTime", ""), "UpdatedAt": source.get("LegacyUpdateTime", ""),
        "CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index,
    }


def _matches(pattern: str, name: str) -> bool:
    return pattern in (WILDCARD, name)


class Intentions:
    """CRUD by exact pair and by legacy ID, list, match and check, over service-intentions config entries."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.entries = ConfigEntries(store)

    async def all(self) -> tuple[list[dict[str, Any]], int, int]:
        held = await self.store.range(kind_prefix(KIND), prefix=True)
        out = []
        for kv in held.kvs:
            entry = decode_entry(kv)
            out += [intention_shape(entry.name, s, entry) for s in entry.body.get("Sources") or []]
        out.sort(key=lambda i: (-i["Precedence"], i["SourceName"], i["DestinationName"]))
        return out, held.index, held.revision

    async def _edit(self, destination: str, change: Callable[[list[Source]], list[Source]]) -> None:
        """Applies `change` to the destination's sources in one cas write, retried while others write."""
        for _ in range(_ATTEMPTS):
            entry = await self.entries.find(KIND, destination)
            before = list(entry.body.get("Sources") or []) if entry else []
            after = change(before)
            cas = entry.modify_index if entry else 0
            if not after:
                done = entry is None or await self.entries.delete(KIND, destination, cas)
            else:
                body = {**(entry.body if entry else {"Kind": KIND, "Name": destination}), "Sources": after}
                done = await self.entries.set(body, cas)
            if done:
                return
        raise ShipyardError("intentions kept changing underneath this write; retry", status=500)

    async def upsert_exact(self, source: str, destination: str, body: Any) -> None:
        fields = {**(body if isinstance(body, dict) else {}), "SourceName": source, "DestinationName": destination}
        _, _, record = intention_fields(fields)

        def change(sources: list[Source]) -> list[Source]:
            old = next((s for s in sources if s["Name"] == source), None)
            now = _now()
            merged = {**record, "LegacyCreateTime": (old or {}).get("LegacyCreateTime", now), "LegacyUpdateTime": now}
            if old and old.get("LegacyID"):
                merged["LegacyID"] = old["LegacyID"]
            return [s for s in sources if s["Name"] != source] + [merged]

        await self._edit(destination, change)

    async def create(self, body: Any) -> str:
        source, destination, record = intention_fields(body)
        new_id = str(uuid.uuid4())

        def change(sources: list[Source]) -> list[Source]:
            if any(s["Name"] == source for s in sources):
                raise BadRequest(f"duplicate intention found: {source} => {destination}")
            now = _now()
            return [*sources, {**record, "LegacyID": new_id, "LegacyCreateTime": now, "LegacyUpdateTime": now}]

        await self._edit(destination, change)
        return new_id

    async def get_exact(self, source: str, destination: str) -> dict[str, Any]:
        entry = await self.entries.find(KIND, destination)
        for s in (entry.body.get("Sources") or []) if entry else []:
            if s["Name"] == source and entry is not None:
                return intention_shape(destination, s, entry)
        raise NotFound("Intention not found")

    async def delete_exact(self, source: str, destination: str) -> None:
        await self._edit(destination, lambda sources: [s for s in sources if s["Name"] != source])

    async def get_by_id(self, intention_id: str) -> dict[str, Any]:
        found, _, _ = await self.all()
        for intention in found:
            if intention["ID"] == intention_id:
                return intention
        raise NotFound("Intention not found")

    async def update_by_id(self, intention_id: str, body: Any) -> None:
        current = await self.get_by_id(intention_id)
        source, destination, record = intention_fields(body)
        if (source, destination) != (current["SourceName"], current["DestinationName"]):
            await self.delete_exact(current["SourceName"], current["DestinationName"])

        def change(sources: list[Source]) -> list[Source]:
            kept = [s for s in sources if s["Name"] != source]
            created = current["CreatedAt"] or _now()
            return [*kept, {**record, "LegacyID": intention_id, "LegacyCreateTime": created,
                            "LegacyUpdateTime": _now()}]

        await self._edit(destination, change)

    async def delete_by_id(self, intention_id: str) -> None:
        current = await self.get_by_id(intention_id)
        await self.delete_exact(current["SourceName"], current["DestinationName"])

    async def match(self, by: str, names: list[str]) -> tuple[dict[str, list[dict[str, Any]]], int, int]:
        if by not in ("source", "destination"):
            raise BadRequest("'by' parameter must be one of 'source' or 'destination'")
        if not names:
            raise BadRequest("required query parameter 'name' not set")
        found, index, revision = await self.all()
        field = "SourceName" if by == "source" else "DestinationName"
        return {name: [i for i in found if _matches(i[field], name)] for name in names}, index, revision

    async def check(self, source: str, destination: str) -> bool:
        """The decision of the most precise intention that matches both names (found is in precedence order)."""
        if not source or not destination:
            raise BadRequest("required query parameter 'source' and 'destination' not set")
        found, _, _ = await self.all()
        for intention in found:
            if _matches(intention["SourceName"], source) and _matches(intention["DestinationName"], destination):
                return bool(intention["Action"] == "allow")
        return DEFAULT_ALLOW
