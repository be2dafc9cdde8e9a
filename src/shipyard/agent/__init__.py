"""The node agent's execution layer: runs this node's instances as supervised, limited, adoptable processes.

It executes what it is told (TaskSpec); it must never decide placement or which instances should exist.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports load lazily: the per-instance shim imports shipyard.agent.shim, and pulling asyncio and the whole
# agent into each shim would cost every instance ~15 MB and ~0.1 s of start-up.
_EXPORTS = {
    "AdoptionReport": "shipyard.agent.adopt",
    "CgroupSupport": "shipyard.agent.limits",
    "ExecDriver": "shipyard.agent.drivers.exec",
    "ExecInstance": "shipyard.agent.drivers.exec",
    "ExitRecord": "shipyard.agent.state",
    "HealthCommandResult": "shipyard.agent.drivers.exec",
    "InstanceStartError": "shipyard.agent.drivers.exec",
    "InstanceState": "shipyard.agent.state",
    "InstanceStatus": "shipyard.agent.supervisor",
    "LogLimits": "shipyard.agent.task",
    "MissingInstance": "shipyard.agent.adopt",
    "PortAllocator": "shipyard.agent.ports",
    "PortsExhausted": "shipyard.agent.ports",
    "RestartEvent": "shipyard.agent.supervisor",
    "RestartPolicy": "shipyard.agent.task",
    "Supervisor": "shipyard.agent.supervisor",
    "TaskSpec": "shipyard.agent.task",
    "adopt_instances": "shipyard.agent.adopt",
    "detect_cgroup_support": "shipyard.agent.limits",
}

__all__ = [
    "AdoptionReport",
    "CgroupSupport",
    "ExecDriver",
    "ExecInstance",
    "ExitRecord",
    "HealthCommandResult",
    "InstanceStartError",
    "InstanceState",
    "InstanceStatus",
    "LogLimits",
    "MissingInstance",
    "PortAllocator",
    "PortsExhausted",
    "RestartEvent",
    "RestartPolicy",
    "Supervisor",
    "TaskSpec",
    "adopt_instances",
    "detect_cgroup_support",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shipyard.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
