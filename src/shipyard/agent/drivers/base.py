"""The task driver interface: what the node agent asks of any way of running an instance (exec today; docker would
be another implementation): start, stop, signal, wait, stats, logs, adopt.

An interface only; it must never hold an implementation, nor decide what runs where (the scheduler does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from shipyard.agent.state import ExitRecord, InstanceState
    from shipyard.agent.task import TaskSpec
    from shipyard.agent.usage import Usage


class DriverInstance(Protocol):
    """One run of an instance as a driver sees it."""

    @property
    def alloc_id(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> ExitRecord: ...

    async def stop(self) -> ExitRecord: ...

    def signal_group(self, sig: int) -> None: ...


Inst = TypeVar("Inst", bound=DriverInstance)


class TaskDriver(Protocol[Inst]):
    """A way of running instances on this node (its own kind of instance, Inst). Instances outlive the agent (adopt
    takes them over again)."""

    name: str

    async def start(self, spec: TaskSpec, ports: dict[str, int]) -> Inst:
        """Start one run; returns once its process exists (raises InstanceStartError if it cannot)."""
        ...

    async def stop(self, instance: Inst) -> ExitRecord:
        """Stop it (gracefully, then forcibly after its stop_grace) and reap it."""
        ...

    def signal(self, instance: Inst, sig: int) -> None:
        """Send a signal to the whole instance (e.g. SIGHUP to reload); not a stop."""
        ...

    async def wait(self, instance: Inst) -> ExitRecord:
        """Until the run ends, with how it ended."""
        ...

    async def stats(self, instance: Inst) -> Usage | None:
        """What the run uses now (CPU share and time, resident memory, processes); None once it has ended."""
        ...

    def logs(self, alloc_id: str, stream: str) -> Path:
        """The live log file of an allocation's instance ("stdout" or "stderr"; rotations sit next to it)."""
        ...

    def adopt(self, state: InstanceState) -> Inst:
        """Take over a run that outlived the previous agent, from its recorded state."""
        ...

    async def close(self) -> None: ...
