"""Consul user events under `events/`: firing (with node/service/tag filters) and the agent's buffer of the last 256.

Events are records in the store, one per Lamport time; this module never runs a handler for an event.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from shipyard.errors import BadRequest, ShipyardError
from shipyard.store import Compare, Delete, Put

if TYPE_CHECKING:
    from shipyard.registry.catalog import Catalog
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

EVENTS_PREFIX = "events/"
BUFFER_SIZE = 256  # Consul's userEventBufSize: an agent remembers its last 256 events
MAX_PAYLOAD = 512  # serf's UserEventSizeLimit: name and payload together
_ATTEMPTS = 32


def event_key(ltime: int) -> str:
    return f"{EVENTS_PREFIX}{ltime:020d}"  # zero-padded so the store's key order is the events' order


@dataclass(frozen=True, slots=True)
class UserEvent:
    id: str
    name: str
    payload: bytes | None
    node_filter: str
    service_filter: str
    tag_filter: str
    ltime: int

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    def to_json(self) -> dict[str, Any]:
        # Go renders []byte as base64 (null when nil), and so does Consul's event API.
        payload = None if self.payload is None else base64.b64encode(self.payload).decode()
        return {
            "ID": self.id, "Name": self.name, "Payload": payload, "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter, "TagFilter": self.tag_filter, "Version": 1, "LTime": self.ltime,
        }

    @classmethod
    def decode(cls, raw: bytes) -> UserEvent:
        data = orjson.loads(raw)
        payload = data.get("Payload")
        return cls(
            data["ID"], data["Name"], None if payload is None else base64.b64decode(payload),
            data.get("NodeFilter", ""), data.get("ServiceFilter", ""), data.get("TagFilter", ""), data["LTime"],
        )


def _compile(pattern: str, what: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadRequest(f"Failed to parse {what} filter: {exc}") from None


def validate_fire(name: str, payload: bytes | None, node: str, service: str, tag: str) -> None:
    """Consul's checks before an event is broadcast: a name, filters that parse, a tag only with a service."""
    if not name:
        raise BadRequest("Missing name")
    if tag and not service:
        raise BadRequest("Cannot provide tag filter without service filter")
    for pattern, what in ((node, "node"), (service, "service"), (tag, "tag")):
        _compile(pattern, what)
    if len(name) + len(payload or b"") > MAX_PAYLOAD:
        raise ShipyardError(
            f"user event exceeds configured limit of {MAX_PAYLOAD} bytes before encoding", status=500
        )


class UserEvents:
    """Fires events into the store and lists what this agent has received."""

    def __init__(self, store: Store, catalog: Catalog, node: NodeIdentity) -> None:
        self.store = store
        self.catalog = catalog
        self.node = node

    async def fire(
        self, name: str, payload: bytes | None, node: str = "", service: str = "", tag: str = ""
    ) -> UserEvent:
        validate_fire(name, payload, node, service, tag)
        for _ in range(_ATTEMPTS):
            held = await self.store.range(EVENTS_PREFIX, prefix=True)
            last = UserEvent.decode(held.kvs[-1].value).ltime if held.kvs else 0
            event = UserEvent(str(uuid.uuid4()), name, payload, node, service, tag, last + 1)
            if not await self.delivered_here(event):
                # Consul broadcasts it anyway; agents whose node/services do not match drop it. We are the only
                # agent, so it is answered with its ID and remembered nowhere.
                return event
            drop = held.kvs[: max(0, len(held.kvs) + 1 - BUFFER_SIZE)]
            ops: list[Put | Delete] = [Delete(kv.key) for kv in drop]
            ops.append(Put(event_key(event.ltime), event.encode()))
            compares = [Compare(event_key(event.ltime), "version", "=", 0)]
            compares += [Compare(kv.key, "mod", "=", kv.mod_revision) for kv in drop]
            if (await self.store.txn(compares, ops)).succeeded:
                return event
        raise ShipyardError("firing the event kept conflicting with other events; retry", status=500)

    async def delivered_here(self, event: UserEvent) -> bool:
        """Consul's shouldProcessUserEvent for this node: the node filter, then a local service (and tag)."""
        node_re = _compile(event.node_filter, "node")
        if node_re is not None and not node_re.search(self.node.name):
            return False
        service_re = _compile(event.service_filter, "service")
        if service_re is None:
            return True
        tag_re = _compile(event.tag_filter, "tag")
        snap = await self.catalog.snapshot()
        for entry in snap.services_of_node(self.node.name):
            if not service_re.search(str(entry.data.get("Service", ""))):
                continue
            if tag_re is None or any(tag_re.search(str(t)) for t in entry.data.get("Tags") or []):
                return True
        return False

    async def list(self, name: str = "") -> tuple[list[UserEvent], int, int]:
        """(events oldest first, index, store revision). The node/service/tag parameters of Consul's list do
        not filter: they only decide at fire time which agents keep an event."""
        held = await self.store.range(EVENTS_PREFIX, prefix=True)
        events = [UserEvent.decode(kv.value) for kv in held.kvs]
        if name:
            events = [e for e in events if e.name == name]
        return events, held.index, held.revision
