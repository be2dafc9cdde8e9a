"""Where the scheduler's records live in the store and how they are encoded: the contract between
the job API, the scheduler loop and the node agents.

Keys and JSON codecs only; it never decides anything and never talks to anything but the store.

Layout (each value is a JSON object):
  nodes/<node>                    Node: capacity, attributes, class and meta an agent offers (that node's agent)
  node-control/<node>             what operators decided for a node: eligibility, drain and its deadline
                                  (written only by the node API; merged into Node for planning)
  jobs/<job>                      Job: the current version of a service or worker (written by the job API)
  job-versions/<job>/<version>    the TaskSpec of every version, for history and auto-revert
  deployments/<job>               the latest Deployment of a job (written by the scheduler loop)
  allocs/<node>/<alloc>           Allocation as the scheduler wants it: desired run|stop (scheduler loop)
  alloc-status/<node>/<alloc>     what the agent sees: client status, healthy_since, ports, restarts...
                                  (written only by that node's agent; merged into Allocation for planning)
  unplaceable/<job>               the planner's reason why instances of a job could not be placed
  waiting/<job>                   instances held back until the job's depends_on is met, and for what
  scheduler/plan                  bumped by every committed plan: concurrent scheduler loops serialise on it
Writers never share a key, so no two components overwrite each other's fields.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote

import orjson

from shipyard.scheduler.model import Allocation, Deployment, Job, Node, Snapshot
from shipyard.spec import TaskSpec
from shipyard.store import KeyValue, Store

NODES = "nodes/"
NODE_CONTROL = "node-control/"
JOBS = "jobs/"
JOB_VERSIONS = "job-versions/"
DEPLOYMENTS = "deployments/"
ALLOCS = "allocs/"
ALLOC_STATUS = "alloc-status/"
UNPLACEABLE = "unplaceable/"
WAITING = "waiting/"
PLAN_GUARD = "scheduler/plan"


def _q(part: str) -> str:
    return quote(part, safe="")


def node_key(node: str) -> str:
    return NODES + _q(node)


def node_control_key(node: str) -> str:
    return NODE_CONTROL + _q(node)


def job_key(job: str) -> str:
    return JOBS + _q(job)


def job_version_key(job: str, version: int) -> str:
    return f"{JOB_VERSIONS}{_q(job)}/{version:010d}"


def deployment_key(job: str) -> str:
    return DEPLOYMENTS + _q(job)


def alloc_key(node: str, alloc: str) -> str:
    return f"{ALLOCS}{_q(node)}/{_q(alloc)}"


def alloc_status_key(node: str, alloc: str) -> str:
    return f"{ALLOC_STATUS}{_q(node)}/{_q(alloc)}"


def unplaceable_key(job: str) -> str:
    return UNPLACEABLE + _q(job)


def waiting_key(job: str) -> str:
    return WAITING + _q(job)


def split_node_alloc(key: str, prefix: str) -> tuple[str, str]:
    node, _, alloc = key[len(prefix) :].partition("/")
    return unquote(node), unquote(alloc)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# ---- codecs ---------------------------------------------------------------------------------------


def encode_node(node: Node) -> bytes:
    """An agent's record of its node; drain state is not in it (node-control/ holds what operators decide)."""
    return dumps({"id": node.id, "cpu": node.cpu, "memory": node.memory, "attributes": node.attributes,
                  "eligible": node.eligible, "class": node.node_class, "meta": node.meta})


def _text_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def decode_node(raw: bytes) -> Node:
    data = orjson.loads(raw)
    return Node(data["id"], int(data["cpu"]), int(data["memory"]), _text_map(data.get("attributes")),
                bool(data.get("eligible", True)), str(data.get("class") or ""), _text_map(data.get("meta")))


@dataclass(frozen=True)
class NodeControl:
    """An operator's decisions about one node (`shipyard node eligibility` / `node drain`)."""

    eligible: bool = True
    draining: bool = False
    drain_deadline: float | None = None  # epoch seconds; None: no deadline
    drain_started: float | None = None
    updated_at: float = 0.0


def encode_control(control: NodeControl) -> bytes:
    return dumps(asdict(control))


def decode_control(raw: bytes) -> NodeControl:
    data = orjson.loads(raw)
    deadline, started = data.get("drain_deadline"), data.get("drain_started")
    return NodeControl(bool(data.get("eligible", True)), bool(data.get("draining", False)),
                       None if deadline is None else float(deadline), None if started is None else float(started),
                       float(data.get("updated_at", 0.0)))


def with_control(node: Node, control: NodeControl | None) -> Node:
    """The node as the planner sees it: eligible only if both its agent and the operators say so."""
    if control is None:
        return node
    return replace(node, eligible=node.eligible and control.eligible, draining=control.draining,
                   drain_deadline=control.drain_deadline if control.draining else None)


def controls_by_node(kvs: list[KeyValue]) -> dict[str, NodeControl]:
    out = {}
    for kv in kvs:
        try:
            out[unquote(kv.key[len(NODE_CONTROL):])] = decode_control(kv.value)
        except Exception:  # unreadable: the node is planned as if no operator had touched it
            continue
    return out


def encode_job(job: Job) -> bytes:
    data = asdict(job)
    data["spec"] = job.spec.to_dict()
    return dumps(data)


def decode_job(raw: bytes) -> Job:
    data = orjson.loads(raw)
    return Job(
        id=data["id"],
        version=int(data["version"]),
        spec=TaskSpec.from_dict(data["spec"]),
        status=data.get("status", "running"),
        generation=int(data.get("generation", 0)),
        stable_version=data.get("stable_version"),
        retired=tuple(int(i) for i in data.get("retired") or ()),
    )


def encode_alloc(alloc: Allocation) -> bytes:
    """The scheduler's side only: client status and health come from alloc-status/ instead."""
    data = asdict(alloc)
    data.pop("client", None)
    data.pop("healthy_since", None)
    return dumps(data)


def decode_alloc(raw: bytes) -> Allocation:
    data = orjson.loads(raw)
    data.pop("client", None)
    data.pop("healthy_since", None)
    return Allocation(**data)


def encode_deployment(deployment: Deployment) -> bytes:
    return dumps(asdict(deployment))


def decode_deployment(raw: bytes) -> Deployment:
    return Deployment(**orjson.loads(raw))


@dataclass
class AllocStatus:
    """What a node's agent reports about one allocation."""

    client: str = "pending"  # pending | running | healthy | unhealthy | failed | lost | complete
    healthy_since: float | None = None
    ports: dict[str, int] = field(default_factory=dict)
    address: str = "127.0.0.1"
    pid: int | None = None
    restarts: int = 0
    crash_looping: bool = False
    last_exit: dict[str, Any] | None = None  # code, signal, reason, stderr tail
    next_restart_at: float | None = None
    limits: str = ""  # how cpu/memory limits are enforced on this node, or why they are not
    message: str = ""
    updated_at: float = 0.0


def encode_status(status: AllocStatus) -> bytes:
    return dumps(asdict(status))


def decode_status(raw: bytes) -> AllocStatus:
    data = orjson.loads(raw)
    known = AllocStatus.__dataclass_fields__
    return AllocStatus(**{k: v for k, v in data.items() if k in known})


# ---- the planner's snapshot -----------------------------------------------------------------------


def _decode_all(kvs: list[KeyValue], decode: Any) -> list[Any]:
    out = []
    for kv in kvs:
        try:
            out.append(decode(kv.value))
        except Exception:  # a record we cannot read is skipped, not fatal for the whole cluster
            continue
    return out


async def read_snapshot(store: Store, now: float | None = None) -> Snapshot:
    """Everything the planner needs, with each allocation's client status merged in from its agent."""
    nodes = await store.range(NODES, prefix=True)
    controls = controls_by_node((await store.range(NODE_CONTROL, prefix=True)).kvs)
    jobs = await store.range(JOBS, prefix=True)
    deployments = await store.range(DEPLOYMENTS, prefix=True)
    allocs = await store.range(ALLOCS, prefix=True)
    statuses = await store.range(ALLOC_STATUS, prefix=True)
    status_by_alloc: dict[str, AllocStatus] = {}
    for kv in statuses.kvs:
        try:
            status_by_alloc[split_node_alloc(kv.key, ALLOC_STATUS)[1]] = decode_status(kv.value)
        except Exception:
            continue
    merged = []
    for alloc in _decode_all(allocs.kvs, decode_alloc):
        status = status_by_alloc.get(alloc.id)
        if status is not None:
            alloc = replace(alloc, client=status.client, healthy_since=status.healthy_since)
        merged.append(alloc)
    return Snapshot(
        nodes=[with_control(n, controls.get(n.id)) for n in _decode_all(nodes.kvs, decode_node)],
        jobs=_decode_all(jobs.kvs, decode_job),
        allocations=merged,
        deployments=_decode_all(deployments.kvs, decode_deployment),
        now=time.time() if now is None else now,
        revision=min(nodes.revision, jobs.revision, deployments.revision, allocs.revision, statuses.revision),
    )
