"""Keeps one instance running: restarts it on exit (or when told, e.g. failing health) with exponential
backoff that resets after a stable run, and exposes a crash loop as state. It must never decide placement.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shipyard.agent.drivers.exec import ExecDriver, ExecInstance
from shipyard.agent.state import ExitRecord
from shipyard.agent.task import TaskSpec
from shipyard.errors import ShipyardError

STARTING, RUNNING, BACKOFF, STOPPING, STOPPED, DETACHED = (
    "starting", "running", "backoff", "stopping", "stopped", "detached"
)  # fmt: skip


@dataclass(frozen=True)
class RestartEvent:
    """One restart decision: when the run ended, how, and how long the supervisor waited before the next."""

    at: float
    delay: float
    exit: ExitRecord


@dataclass
class InstanceStatus:
    """What `shipyard ps` shows for one instance."""

    alloc_id: str
    service: str
    instance: int
    state: str
    pid: int | None
    ports: dict[str, int]
    started_at: float | None
    restarts: int
    consecutive_failures: int
    crash_looping: bool
    last_exit: ExitRecord | None
    next_restart_at: float | None
    limits: str
    adopted: bool = False
    recent_restarts: list[RestartEvent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Supervisor:
    """Runs `spec` with `ports` through `driver` and keeps it running until stop() or detach()."""

    def __init__(
        self, driver: ExecDriver, spec: TaskSpec, ports: dict[str, int], *, instance: ExecInstance | None = None
    ) -> None:
        self.driver = driver
        self.spec = spec
        self.ports = dict(ports)
        self._instance = instance
        self._adopted = instance is not None
        self._state = RUNNING if instance is not None else STARTING
        # An adopted run started before this process did: its stability counts from its real start.
        self._run_started = time.monotonic() - (max(0.0, time.time() - instance.started_at) if instance else 0.0)
        self._restarts = 0
        self._consecutive = 0
        self._last_exit: ExitRecord | None = None
        self._next_restart_at: float | None = None
        self._history: deque[RestartEvent] = deque(maxlen=20)
        self._restart_reason: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._finished = False
        self._loop_task: asyncio.Task[None] | None = None
        # Called once before the next start, for a spec made afresh: an adopted instance's recorded spec has no
        # secret env (never written down), so its restart fetches it again.
        self.respec: Callable[[], Awaitable[TaskSpec]] | None = None

    @classmethod
    def for_adopted(cls, driver: ExecDriver, instance: ExecInstance) -> Supervisor:
        """Supervise an instance found by adopt_instances, with the spec it was started with."""
        return cls(driver, instance.spec, instance.ports, instance=instance)

    @property
    def instance(self) -> ExecInstance | None:
        return self._instance

    @property
    def status(self) -> InstanceStatus:
        consecutive = self._consecutive
        if self._state == RUNNING and time.monotonic() - self._run_started >= self.spec.restart.reset_after:
            consecutive = 0
        instance = self._instance if self._instance is not None and self._instance.running else None
        return InstanceStatus(
            alloc_id=self.spec.alloc_id,
            service=self.spec.service,
            instance=self.spec.instance,
            state=self._state,
            pid=instance.pid if instance else None,
            ports=dict(self.ports),
            started_at=instance.started_at if instance else None,
            restarts=self._restarts,
            consecutive_failures=consecutive,
            crash_looping=consecutive >= 2,
            last_exit=self._last_exit,
            next_restart_at=self._next_restart_at if self._state == BACKOFF else None,
            limits=self.driver.limits_note(self.spec),
            adopted=self._adopted and instance is not None and instance.adopted,
            recent_restarts=list(self._history),
        )

    async def start(self) -> None:
        """Start (or, for an adopted instance, begin watching) and return; failures go into backoff."""
        if self._loop_task is not None:
            return
        failure = await self._start_run() if self._instance is None else None
        self._loop_task = asyncio.get_running_loop().create_task(self._supervise(failure))

    async def restart(self, reason: str) -> None:
        """Restart now (e.g. health checks failing); counts towards backoff like a crash."""
        self._restart_reason = reason
        instance = self._instance
        if instance is not None and instance.running:
            await instance.stop()
        else:
            self._wake.set()  # in backoff: cut the wait short

    async def stop(self) -> ExitRecord | None:
        """Stop the instance for good (SIGTERM, SIGKILL after stop_grace) and forget its state file."""
        record = await self._finish(STOPPING)
        await self.driver.forget(self.spec.alloc_id)
        self._state = STOPPED
        return record

    async def detach(self) -> None:
        """Stop supervising but leave the instance running under its shim (server shutdown; adopted later)."""
        self._finished = True
        await self._cancel_loop()
        self._state = DETACHED

    async def _finish(self, state: str) -> ExitRecord | None:
        self._finished = True
        self._state = state
        # The lock makes us wait for a start in progress, so no instance is born after we looked.
        async with self._lock:
            await self._cancel_loop()
            instance = self._instance
            if instance is None:
                return None
            record = await instance.stop()
            self._last_exit = record
            return record

    async def _cancel_loop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _start_run(self) -> ExitRecord | None:
        async with self._lock:
            if self._finished:
                return None
            self._state = STARTING
            self._run_started = time.monotonic()
            try:
                if self.respec is not None:
                    self.spec = await self.respec()
                    self.respec = None
                self._instance = await self._launch()
            except ShipyardError as exc:  # InstanceStartError, or a secret the fresh spec needs cannot be read
                self._instance = None
                return ExitRecord(127, None, "start failed", [exc.message], time.time())
            self._state = RUNNING
            return None

    async def _launch(self) -> ExecInstance:
        """driver.start, never abandoned half-way: a stop cancels the task that starts an instance (the
        runner's loop), and a start cut off after the shim was forked but before its instance was known left
        a process nobody could stop. So a cancelled start still runs to the end and its instance is recorded
        (under the lock) before the cancellation goes on; the stop that follows then finds and ends it."""
        launch = asyncio.ensure_future(self.driver.start(self.spec, self.ports))
        cancelled: asyncio.CancelledError | None = None
        while not launch.done():
            try:
                await asyncio.shield(launch)
            except asyncio.CancelledError as exc:
                if not launch.done():
                    cancelled = exc  # keep waiting; re-raised once the instance is ours to stop
            except Exception:
                break  # launch.result() below raises it
        if cancelled is None:
            return launch.result()
        if not launch.cancelled() and launch.exception() is None:
            self._instance = launch.result()
        raise cancelled

    async def _supervise(self, start_failure: ExitRecord | None) -> None:
        while not self._finished:
            instance = self._instance
            if instance is not None:
                record = await instance.wait()
            elif start_failure is not None:
                record = start_failure
            else:
                start_failure = await self._start_run()
                continue
            if self._finished:
                return
            self._instance = None
            start_failure = None
            delay = self._count_exit(record)
            self._wake.clear()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
            if self._finished:
                return
            self._next_restart_at = None
            start_failure = await self._start_run()

    def _count_exit(self, record: ExitRecord) -> float:
        if self._restart_reason is not None:
            record = ExitRecord(
                record.exit_code, record.signal, f"restarted: {self._restart_reason}", record.stderr_tail,
                record.finished_at,
            )  # fmt: skip
            self._restart_reason = None
        policy = self.spec.restart
        if time.monotonic() - self._run_started >= policy.reset_after:
            self._consecutive = 0
        self._consecutive += 1
        self._restarts += 1
        delay = policy.delay_for(self._consecutive)
        self._last_exit = record
        self._history.append(RestartEvent(time.time(), delay, record))
        self._next_restart_at = time.time() + delay
        self._state = BACKOFF if delay > 0 else STARTING
        return delay
