"""Network coordinates (Consul's Vivaldi coordinates) under `coordinates/<node>`: updates, reads, and the RTT
estimate prepared queries sort by ("Near").

Stores what clients report; it measures nothing itself, so this server's own node sits at the origin until one
is written for it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import orjson

from shipyard.errors import BadRequest, ShipyardError

if TYPE_CHECKING:
    from shipyard.registry.catalog import Catalog
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

COORD_PREFIX = "coordinates/"
DIMENSIONALITY = 8  # Consul's default coordinate config
# serf's NewCoordinate: where a node starts before any RTT has been measured.
ORIGIN: dict[str, Any] = {"Vec": [0.0] * DIMENSIONALITY, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}


def coord_key(node: str) -> str:
    return COORD_PREFIX + quote(node, safe="")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_coord(coord: Any) -> dict[str, Any]:
    """serf's Coordinate.IsValid and the dimensionality check Consul's Coordinate.Update makes (errors are 500s
    there: they come back from the RPC, not from decoding)."""
    if not isinstance(coord, dict):
        raise BadRequest("Request decode failed: Coord must be an object")
    vec = coord.get("Vec")
    if not isinstance(vec, list) or len(vec) != DIMENSIONALITY:
        raise ShipyardError("rpc error making call: coordinate dimensionality does not match", status=500)
    fields = [coord.get("Error", 0), coord.get("Adjustment", 0), coord.get("Height", 0), *vec]
    if not all(_number(v) for v in fields):
        raise ShipyardError("rpc error making call: invalid coordinate", status=500)
    return {"Vec": [float(v) for v in vec], "Error": float(coord.get("Error", 0)),
            "Adjustment": float(coord.get("Adjustment", 0)), "Height": float(coord.get("Height", 0))}


def rtt_seconds(a: dict[str, Any], b: dict[str, Any]) -> float:
    """serf's DistanceTo: Euclidean distance plus both heights, adjusted when that stays positive."""
    dist = math.sqrt(sum((x - y) ** 2 for x, y in zip(a["Vec"], b["Vec"], strict=False)))
    dist += a["Height"] + b["Height"]
    adjusted = dist + a["Adjustment"] + b["Adjustment"]
    return adjusted if adjusted > 0 else dist


class Coordinates:
    def __init__(self, store: Store, catalog: Catalog, node: NodeIdentity) -> None:
        self.store = store
        self.catalog = catalog
        self.node = node

    async def update(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("Node"), str):
            raise BadRequest("Request decode failed: Node must be a string")
        coord = validate_coord(body.get("Coord"))
        node = body["Node"]
        snap = await self.catalog.snapshot()
        if node not in snap.nodes:
            return  # Consul's state store drops updates for nodes that are not registered
        await self.store.put(coord_key(node), orjson.dumps({"Segment": body.get("Segment") or "", "Coord": coord}))

    async def nodes(self, only: str | None = None) -> tuple[list[dict[str, Any]], int, int]:
        """[{Node, Segment, Coord, CreateIndex, ModifyIndex}] of registered nodes, sorted by node name."""
        held = await self.store.range(COORD_PREFIX, prefix=True)
        snap = await self.catalog.snapshot()
        found: dict[str, dict[str, Any]] = {}
        for kv in held.kvs:
            node = unquote(kv.key[len(COORD_PREFIX):])
            if node in snap.nodes:
                data = orjson.loads(kv.value)
                found[node] = {"Node": node, "Segment": data.get("Segment", ""), "Coord": data["Coord"],
                               "CreateIndex": kv.create_revision, "ModifyIndex": kv.mod_revision}
        if self.node.name not in found and self.node.name in snap.nodes:
            found[self.node.name] = {"Node": self.node.name, "Segment": "", "Coord": dict(ORIGIN),
                                     "CreateIndex": 0, "ModifyIndex": 0}
        out = [found[n] for n in sorted(found) if only is None or n == only]
        return out, held.index, held.revision

    async def of(self, node: str) -> dict[str, Any] | None:
        found, _, _ = await self.nodes(node)
        return found[0]["Coord"] if found else None

    async def datacenters(self) -> list[dict[str, Any]]:
        """One datacenter, with this server at its coordinate (there is no WAN pool: the server's node name)."""
        coord = await self.of(self.node.name) or dict(ORIGIN)
        return [{"Datacenter": self.node.datacenter, "AreaID": "WAN",
                 "Coordinates": [{"Node": self.node.name, "Segment": "", "Coord": coord}]}]
