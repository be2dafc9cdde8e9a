"""NodeService: the only writer of node-control/ — node eligibility and drain — and the reader behind node status;
and what to delete of a node gone for good (forget_node_ops).

It records what an operator decided about a node, each write guarded by the record it read; it must never move or
stop an instance itself: the scheduler plans the drain (planner, reconcile), the node's agent stops what it is told.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote

from shipyard.errors import BadRequest, Conflict, NotFound
from shipyard.scheduler.model import TERMINAL, Allocation, Node
from shipyard.scheduler.records import (
    ALLOC_STATUS,
    ALLOCS,
    NODE_CONTROL,
    NODES,
    NodeControl,
    decode_alloc,
    decode_control,
    decode_node,
    encode_control,
    node_control_key,
    node_key,
)
from shipyard.store import Compare, Delete, Get, KeyValue, Put, Store

WRITE_ATTEMPTS = 8
MAX_DEADLINE = 30 * 24 * 3600.0  # a month: a longer drain deadline is a typo


@dataclass(frozen=True)
class NodeView:
    """One node as `node status` shows it: the agent's record (None once liveness removed it), the operators'
    decisions, and the allocations placed on it."""

    name: str
    node: Node | None
    control: NodeControl
    allocs: tuple[Allocation, ...]

    @property
    def running(self) -> list[Allocation]:
        return [a for a in self.allocs if a.desired == "run" and a.client not in TERMINAL]

    @property
    def drain_complete(self) -> bool:
        # Done when nothing is left on it at all: the stopped instances' agent has finished stopping them too.
        return self.control.draining and not self.allocs

    def to_json(self, now: float) -> dict[str, Any]:
        node, control, running = self.node, self.control, self.running
        drain = None
        if control.draining:
            left = None if control.drain_deadline is None else max(0.0, control.drain_deadline - now)
            drain = {"started_at": control.drain_started, "deadline": control.drain_deadline,
                     "deadline_in": left, "remaining": len(running), "stopping": len(self.allocs) - len(running),
                     "complete": self.drain_complete}
        return {
            "name": self.name,
            "status": "ready" if node is not None else "down",
            "eligibility": "eligible" if control.eligible and not control.draining else "ineligible",
            "eligible": node is not None and node.eligible and control.eligible and not control.draining,
            "drain": drain,
            "class": node.node_class if node else "",
            "address": node.attributes.get("address", "") if node else "",
            "datacenter": node.attributes.get("datacenter", "") if node else "",
            "meta": dict(node.meta) if node else {},
            "attributes": dict(node.attributes) if node else {},
            "allocs": len(running),
            "resources": {"cpu": node.cpu if node else 0, "memory": node.memory if node else 0,
                          "cpu_used": sum(a.cpu for a in running), "memory_used": sum(a.memory for a in running)},
            "allocations": [{"id": a.id, "job": a.job, "index": a.index, "desired": a.desired, "version": a.version}
                            for a in sorted(self.allocs, key=lambda a: (a.job, a.index, a.id))],
        }


def parse_deadline(value: Any) -> float | None:
    """Seconds from a JSON deadline: a number of seconds, a duration text ("1m", "90s"), or null (no deadline)."""
    from shipyard.spec import parse_duration

    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadRequest(f'deadline must be a duration like "1m" or "30s", a number of seconds, or null; '
                         f"got {value!r}") from None
    if seconds > MAX_DEADLINE:
        raise BadRequest(f"deadline must be at most 30 days, got {value!r}")
    return seconds


def forget_node_ops(name: str) -> list[Delete]:
    """Everything placement keeps about a node that is gone for good (reaped or force-left, as Nomad's node GC):
    its agent's record, the operators' decisions (a machine that returns is a new node: eligible), and its leftover
    allocations and their status (replaced when the node was lost: the scheduler deletes the stopped ones of a
    vanished node itself, this only takes what it had not yet)."""
    return [Delete(node_key(name)), Delete(node_control_key(name)),
            Delete(f"{ALLOCS}{quote(name, safe='')}/", prefix=True),
            Delete(f"{ALLOC_STATUS}{quote(name, safe='')}/", prefix=True)]


class NodeService:
    """Reads node status and changes eligibility and drain; every write is one txn guarded by what it read."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def views(self, name: str | None = None) -> list[NodeView]:
        read = await self.store.txn((), (Get(NODES, True), Get(NODE_CONTROL, True), Get(ALLOCS, True)))
        node_kvs, control_kvs, alloc_kvs = read.ranges()
        nodes: dict[str, Node] = {}
        for kv in node_kvs:
            try:
                node = decode_node(kv.value)
            except Exception:  # an unreadable record is left out, never fatal for the listing
                continue
            nodes[node.id] = node
        controls: dict[str, NodeControl] = {}
        for kv in control_kvs:
            try:
                controls[unquote(kv.key[len(NODE_CONTROL):])] = decode_control(kv.value)
            except Exception:
                continue
        allocs: dict[str, list[Allocation]] = {}
        for kv in alloc_kvs:
            try:
                alloc = decode_alloc(kv.value)
            except Exception:
                continue
            allocs.setdefault(alloc.node, []).append(alloc)
        names = sorted(set(nodes) | set(controls))
        if name is not None:
            if name not in names:
                raise NotFound(f"no node {name!r} (nodes: {', '.join(names) or 'none'})", {"node": name})
            names = [name]
        return [NodeView(n, nodes.get(n), controls.get(n, NodeControl()), tuple(allocs.get(n, ())))
                for n in names]

    async def view(self, name: str) -> NodeView:
        return (await self.views(name))[0]

    async def set_eligibility(self, name: str, eligible: bool) -> NodeView:
        def change(control: NodeControl) -> NodeControl:
            if eligible and control.draining:
                raise Conflict(f"node {name!r} is draining; stop the drain to make it eligible "
                               f"(shipyard node drain {name} --disable)", {"node": name})
            return replace(control, eligible=eligible)
        return await self._update(name, change)

    async def drain(self, name: str, deadline: float | None) -> NodeView:
        """Starts (or re-times) a drain: the node turns ineligible and its instances move; deadline in seconds from
        now, after which what is left is stopped (None: never forced)."""
        now = self.clock()

        def change(control: NodeControl) -> NodeControl:
            started = control.drain_started if control.draining and control.drain_started else now
            return replace(control, eligible=False, draining=True, drain_started=started,
                           drain_deadline=None if deadline is None else now + deadline)
        return await self._update(name, change)

    async def stop_drain(self, name: str, keep_ineligible: bool = False) -> NodeView:
        """Ends a drain (as Nomad's -disable): the node takes new instances again unless keep_ineligible."""
        def change(control: NodeControl) -> NodeControl:
            return replace(control, draining=False, drain_deadline=None, drain_started=None,
                           eligible=control.eligible if keep_ineligible else True)
        return await self._update(name, change)

    async def _update(self, name: str, change: Callable[[NodeControl], NodeControl]) -> NodeView:
        for _ in range(WRITE_ATTEMPTS):
            read = await self.store.txn((), (Get(node_key(name)), Get(node_control_key(name))))
            node_kvs, control_kvs = read.ranges()
            current: KeyValue | None = control_kvs[0] if control_kvs else None
            if not node_kvs and current is None:
                raise NotFound(f"no node {name!r}", {"node": name})
            control = NodeControl()
            if current is not None:
                try:
                    control = decode_control(current.value)
                except Exception:  # an unreadable record is replaced by the operator's new decision
                    control = NodeControl()
            wanted = replace(change(control), updated_at=self.clock())
            guard = Compare(node_control_key(name), "mod", "=", current.mod_revision if current else 0)
            outcome = await self.store.txn([guard], [Put(node_control_key(name), encode_control(wanted))])
            if outcome.succeeded:
                return await self.view(name)
        raise Conflict(f"node {name!r} kept changing while it was being updated; try again", {"node": name})
