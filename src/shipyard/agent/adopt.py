"""Adoption after a server restart: find this node's instances from their state files and take them over.

It must never start an instance (the caller restarts the missing ones) and never adopt one twice.

Why nothing is left unmanaged when the server is killed with SIGKILL: every instance runs under its own
shim process (agent/shim.py) in a session of its own, not as a child of the server. The shim is the
instance's parent and a subreaper: it keeps writing its rotating logs, enforces its memory limit, reaps its
processes and, on exit, writes exit.json. PR_SET_PDEATHSIG alone could not give this: it reaches one process,
not a group, and it would kill instances that should survive a server upgrade. So the server may die at any
moment; the instance keeps running and keeps being managed. When the server comes back, `adopt_instances`
reads each `<data_dir>/instances/<alloc>/state.json` (written atomically by the shim) and checks pid and
start time (field 22 of /proc/<pid>/stat, so a reused pid is never mistaken for ours):
- shim alive, alloc still wanted         -> attached (one ExecInstance per alloc id: no duplicates), ports kept;
- shim alive, alloc no longer wanted     -> stopped (the reaper for allocs deleted while the server was down);
- shim dead but the instance's group alive (the shim itself was SIGKILLed) -> the group is killed, reported
  missing, so that nothing runs without a shim;
- both dead                              -> reported missing, with its exit record when the shim wrote one.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.agent.drivers.exec import ExecDriver, ExecInstance
from shipyard.agent.ports import PortAllocator
from shipyard.agent.state import EXIT_FILE, STATE_FILE, ExitRecord, InstanceState, is_same_live_process, read_json


@dataclass
class MissingInstance:
    """An instance that has a state file but no longer runs; the caller decides whether to start it again."""

    state: InstanceState
    reason: str
    exit: ExitRecord | None = None


@dataclass
class AdoptionReport:
    adopted: list[ExecInstance] = field(default_factory=list)
    missing: list[MissingInstance] = field(default_factory=list)
    reaped: list[ExitRecord] = field(default_factory=list)
    reaped_alloc_ids: list[str] = field(default_factory=list)


def count_live_instances(agent_dir: str) -> int:
    """How many instances still run under their shims in an agent's dir: what a server whose node agent is its
    own process leaves running when it stops (its next agent adopts them)."""
    count = 0
    instances = os.path.join(agent_dir, "instances")
    for name in os.listdir(instances) if os.path.isdir(instances) else []:
        data = read_json(Path(instances, name, STATE_FILE))
        if isinstance(data, dict) and is_same_live_process(int(data.get("shim_pid", 0) or 0),
                                                           data.get("shim_start_time")):
            count += 1
    return count


def _read_states(driver: ExecDriver) -> list[tuple[InstanceState, ExitRecord | None]]:
    found: list[tuple[InstanceState, ExitRecord | None]] = []
    if not driver.instances_dir.is_dir():
        return found
    for directory in sorted(driver.instances_dir.iterdir()):
        data = read_json(directory / STATE_FILE)
        if not isinstance(data, dict):
            continue
        try:
            state = InstanceState.from_dict(data)
        except TypeError:
            continue  # a state file from an incompatible version: not ours to touch
        exit_data = read_json(directory / EXIT_FILE)
        found.append((state, ExitRecord.from_dict(exit_data) if isinstance(exit_data, dict) else None))
    return found


async def adopt_instances(
    driver: ExecDriver, ports: PortAllocator | None = None, wanted: Collection[str] | None = None
) -> AdoptionReport:
    """Adopt running instances; stop those whose alloc id is not in `wanted` (None: adopt all)."""
    report = AdoptionReport()
    for state, exit_record in await asyncio.to_thread(_read_states, driver):
        is_wanted = wanted is None or state.alloc_id in wanted
        if is_same_live_process(state.shim_pid, state.shim_start_time):
            instance = driver.attach(state)
            if is_wanted:
                if ports is not None:
                    ports.reserve(state.ports.values())
                report.adopted.append(instance)
            else:
                report.reaped.append(await instance.stop())
                report.reaped_alloc_ids.append(state.alloc_id)
                await driver.forget(state.alloc_id)
            continue
        if is_same_live_process(state.pid, state.start_time):
            try:
                os.killpg(state.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reason = "its shim was gone; the orphaned process group was killed"
        else:
            reason = "not running"
        if is_wanted:
            report.missing.append(MissingInstance(state, reason, exit_record))
        else:
            await driver.forget(state.alloc_id)
    return report
