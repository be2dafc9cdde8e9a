"""The scheduler: pure planning from a snapshot of nodes, jobs, allocations and deployments to a plan.

It must never start a process or touch the store itself; agents execute plans, the caller stores them.
"""

from shipyard.scheduler.model import (
    Allocation,
    Deployment,
    Job,
    JobRevert,
    Node,
    Plan,
    Snapshot,
    Stop,
    Unplaceable,
    VersionUpdate,
    Waiting,
)
from shipyard.scheduler.planner import check_conflict, plan

__all__ = [
    "Allocation",
    "Deployment",
    "Job",
    "JobRevert",
    "Node",
    "Plan",
    "Snapshot",
    "Stop",
    "Unplaceable",
    "VersionUpdate",
    "Waiting",
    "check_conflict",
    "plan",
]
