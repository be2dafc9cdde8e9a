"""The scheduler's vocabulary: nodes, jobs, allocations, deployments, the snapshot it reads and the plan it returns.

Plain immutable records only: they must never read the store, the clock or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard.spec import TaskSpec

# Client statuses after which an allocation holds no resources and needs a replacement.
TERMINAL = frozenset({"failed", "lost", "complete"})
ACTIVE_DEPLOYMENT = frozenset({"running", "paused-for-promotion"})


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    cpu: int  # MHz available to allocations
    memory: int  # MB available to allocations
    attributes: dict[str, str] = field(default_factory=dict)  # ${attr.*}: kernel.name, cpu.arch, address...
    eligible: bool = True  # False: keeps what it runs, gets nothing new (eligibility off, or draining)
    node_class: str = ""  # ${node.class}
    meta: dict[str, str] = field(default_factory=dict)  # ${meta.*}: what the operator says of the node (rack...)
    # Draining: its instances move to other nodes as a rolling update would; at drain_deadline (if any) the ones
    # left are stopped. A draining node is also ineligible.
    draining: bool = False
    drain_deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One service or worker at its current version; restarting bumps generation, not version."""

    id: str
    version: int
    spec: TaskSpec
    status: str = "running"  # "running" | "stopped"
    generation: int = 0
    stable_version: int | None = None  # last version whose deployment succeeded: where auto_revert goes
    # Instance indexes killed by name (Marathon's kill with ?scale): the job's instances occupy the lowest
    # indexes not listed here, so the named ones stop instead of the highest. See reconcile.instance_slots.
    retired: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Allocation:
    id: str
    job: str
    version: int
    index: int
    node: str
    cpu: int
    memory: int
    template: str  # TaskSpec.template_hash() of the version it was placed with
    generation: int = 0
    desired: str = "run"  # "run" | "stop"
    client: str = "pending"  # pending | running | healthy | unhealthy | failed | lost | complete
    deployment: str | None = None
    canary: bool = False
    created_at: float = 0.0
    healthy_since: float | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    job: str
    version: int
    generation: int = 0
    status: str = "running"  # running | paused-for-promotion | successful | failed | cancelled
    promoted: bool = False
    created_at: float = 0.0
    description: str = ""
    desired_total: int = 0
    desired_canaries: int = 0
    placed: int = 0
    placed_canaries: int = 0
    healthy: int = 0
    unhealthy: int = 0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_DEPLOYMENT


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the planner sees; deployments holds the latest deployment of each job, whatever its status."""

    nodes: tuple[Node, ...] | list[Node]
    jobs: tuple[Job, ...] | list[Job]
    allocations: tuple[Allocation, ...] | list[Allocation] = ()
    deployments: tuple[Deployment, ...] | list[Deployment] = ()
    now: float = 0.0
    revision: int = 0  # store revision the snapshot was read at; makes new allocation ids unique
    # Jobs whose record exists but cannot be read: their instances and deployment are left exactly as they are.
    frozen: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Stop:
    alloc: str
    job: str
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class VersionUpdate:
    """An allocation whose instance stays as it is but now belongs to a newer version (e.g. after scaling)."""

    alloc: str
    job: str
    version: int


@dataclass(frozen=True, slots=True)
class JobRevert:
    job: str
    to_version: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    job: str
    indexes: tuple[int, ...]
    reason: str
    # How many nodes were looked at and why each was left out: ("nodes", n), ("ineligible", n), ("constraint", n),
    # ("distinct", n), ("memory", n), ("cpu", n) (Marathon's queue reports them as its offer reject summary).
    counts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Waiting:
    """Instances not placed yet because a job's depends_on is not met (only before the job has started)."""

    job: str
    indexes: tuple[int, ...]
    reason: str  # e.g. "waiting for db to be healthy"


@dataclass
class Plan:
    place: list[Allocation] = field(default_factory=list)
    stop: list[Stop] = field(default_factory=list)
    update: list[VersionUpdate] = field(default_factory=list)
    deployments: list[Deployment] = field(default_factory=list)
    reverts: list[JobRevert] = field(default_factory=list)
    unplaceable: list[Unplaceable] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.place or self.stop or self.update or self.deployments or self.reverts)
