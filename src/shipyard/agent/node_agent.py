"""The node agent: runs this node's allocations (allocs/<node>/) as supervised instances, registers each running
instance in the catalog with its health check, and reports what it sees in alloc-status/<node>/.

It executes only: it must never decide placement, nor which allocations exist or should stop (the scheduler does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from shipyard.agent.adopt import adopt_instances
from shipyard.agent.drivers.exec import ExecDriver, ExecInstance
from shipyard.agent.ports import PortAllocator
from shipyard.agent.registration import AGENT_OUTPUT_PREFIX, check_id_for, check_record, service_record
from shipyard.agent.state import ExitRecord
from shipyard.agent.supervisor import BACKOFF, RUNNING, STARTING, Supervisor
from shipyard.agent.task import RestartPolicy
from shipyard.agent.task import TaskSpec as InstanceSpec
from shipyard.agent.usage import Usage
from shipyard.errors import NotFound, ShipyardError
from shipyard.registry.catalog import CHECKS, CRITICAL, PASSING, Catalog
from shipyard.registry.machine import machine_attributes
from shipyard.registry.node import NodeIdentity, reachable_address
from shipyard.scheduler.model import Allocation, Node
from shipyard.scheduler.records import (
    ALLOC_STATUS,
    ALLOCS,
    AllocStatus,
    alloc_status_key,
    decode_alloc,
    decode_job,
    decode_node,
    decode_status,
    encode_node,
    encode_status,
    job_key,
    job_version_key,
    node_key,
    split_node_alloc,
)
from shipyard.script_checks import COMMAND_CHECKS_DISABLED, ScriptChecks
from shipyard.spec import TaskSpec as JobSpec
from shipyard.store import EventType, Store, follow_prefix
from shipyard.tasks import cancel_all_and_wait, cancel_and_wait

if TYPE_CHECKING:
    from shipyard.registry.health import HealthChecker

log = logging.getLogger("shipyard.agent")

DEFAULT_DRAIN_DELAY = 1.0
RECONCILE_EVERY = 10.0  # a full pass heals anything a missed event left behind
STATUS_TICK = 0.25  # how often a runner re-reads its supervisor when nothing wakes it
MIN_CHECK_INTERVAL = 1.0  # the health checker never probes more often than this
DEFAULT_MHZ_PER_CORE = 2000
# What the instance_env hook gives that is not secret (where the engine is and its CA, which token, the secret
# files' folder): kept in the instance's recorded spec. Everything else it gives (tokens, secret values) is secret
# env: memory only.
PUBLIC_DELIVERED_ENV = frozenset({"VAULT_ADDR", "VAULT_CACERT", "VAULT_TOKEN_ACCESSOR", "SECRETS_DIR"})


# ---- the machine ----------------------------------------------------------------------------------


def cpu_mhz_per_core() -> int:
    """The clock of one core as /proc/cpuinfo or cpufreq reports it; a common figure where neither does (VMs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return max(1, int(float(line.split(":", 1)[1])))
    except (OSError, ValueError):
        pass
    try:
        return max(1, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) // 1000)
    except (OSError, ValueError):
        return DEFAULT_MHZ_PER_CORE


def machine_capacity() -> tuple[int, int]:
    """(cpu MHz, memory MB) this machine offers to allocations: all cores at their clock, all memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
                break
    except (OSError, ValueError):
        pass
    if memory <= 0:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return cores * cpu_mhz_per_core(), memory


def instance_spec_for(
    spec: JobSpec, alloc: Allocation, *, mhz_per_core: int, static_ports: dict[str, int] | None = None,
    platform_env: dict[str, str] | None = None, secret_env: dict[str, str] | None = None,
) -> InstanceSpec:
    """The agent's description of one instance of `spec` for `alloc` (what the exec driver runs).
    `platform_env` (e.g. SHIPYARD_BUS_URL) comes first, so a spec's own env can override it."""
    statics = {p.name: p.static for p in spec.ports if p.static is not None}
    statics.update(static_ports or {})
    policy = RestartPolicy(
        initial=spec.restart.initial, factor=spec.restart.factor, max=spec.restart.max,
        reset_after=spec.restart.reset_after,
    )  # fmt: skip
    return InstanceSpec(
        service=spec.name,
        alloc_id=alloc.id,
        instance=alloc.index,
        args=tuple(spec.args) if spec.cmd is None else None,
        cmd=spec.cmd,
        env={**(platform_env or {}), "SHIPYARD_STOP_GRACE": f"{spec.stop_grace:g}", **spec.env},
        ports=tuple(p.name for p in spec.ports),
        static_ports=statics,
        stop_grace=spec.stop_grace,
        restart=policy,
        memory_mb=spec.resources.memory,
        cpus=round(spec.resources.cpu / mhz_per_core, 3),
        health_cmd=spec.health.target if spec.health is not None and spec.health.kind == "command" else None,
        workdir=spec.workdir,
        secret_env=dict(secret_env or {}),
    )


def exit_dict(record: ExitRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {**record.to_dict(), "description": record.describe()}


# ---- one allocation -------------------------------------------------------------------------------


class AllocRunner:
    """Keeps one allocation's instance running, registered and reported, until stop() takes it down."""

    def __init__(
        self,
        agent: NodeAgent,
        alloc: Allocation,
        spec: JobSpec | None,
        supervisor: Supervisor,
        *,
        previous: AllocStatus | None = None,
        note: str = "",
    ) -> None:
        self.agent = agent
        self.alloc = alloc
        self.spec = spec
        self.supervisor = supervisor
        self.check_id = check_id_for(alloc.id)
        self.stopping = False
        self.failed = False
        self.check_status: str | None = None
        self.check_output = ""
        self._failing_since: float | None = None  # monotonic time of the first counted failing result
        self._healthy_since: float | None = None
        self._ever_healthy = False
        self._run_pid: int | None = None
        self._run_started = 0.0
        self._registered: dict[str, Any] | None = None
        self._written: dict[str, Any] | None = None
        self._restarts_base = previous.restarts if previous is not None else 0
        self._previous = previous
        self._note = note
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._restarting = False
        self._registration_stale = False

    @property
    def health_interval(self) -> float:
        health = self.spec.health if self.spec is not None else None
        return max(MIN_CHECK_INTERVAL, health.interval) if health is not None else MIN_CHECK_INTERVAL

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"alloc-{self.alloc.id}")

    def wake(self) -> None:
        self._wake.set()

    def update_alloc(self, alloc: Allocation, spec: JobSpec | None) -> None:
        """A newer version of the same allocation (e.g. after scaling): same instance, new metadata."""
        self.alloc = alloc
        if spec is not None:
            self.spec = spec
        self._registration_stale = True
        self.wake()

    def observe_check(self, status: str, output: str) -> None:
        """A status of this instance's check, as the health checker (or the agent) wrote it to the catalog."""
        self.check_status, self.check_output = status, output
        is_result = bool(output) and not output.startswith(AGENT_OUTPUT_PREFIX)
        if status != CRITICAL:
            self._failing_since = None
        elif is_result and self._failing_since is None:
            self._failing_since = time.monotonic()
        self.wake()

    # ---- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self.supervisor.start()
            while not self.stopping and not self.failed:
                try:
                    await self._step()
                except asyncio.CancelledError:
                    raise
                except ShipyardError as exc:
                    log.warning("alloc %s: %s", self.alloc.id, exc.message)
                except Exception:
                    log.exception("alloc %s: status pass failed", self.alloc.id)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_TICK):
                        await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("alloc %s: runner stopped unexpectedly", self.alloc.id)

    async def _step(self) -> None:
        sup = self.supervisor
        status = sup.status
        instance = sup.instance if sup.instance is not None and sup.instance.running else None
        health = self.spec.health if self.spec is not None else None

        if self._run_pid is not None and (instance is None or instance.pid != self._run_pid):
            await self._run_ended(status.last_exit)
        if instance is not None and instance.pid != self._run_pid:
            await self._run_began(instance)
        if self._registration_stale:
            self._registration_stale = False
            await self._sync_registration(instance is not None)

        message = self._note
        if instance is not None:
            client, healthy_since = await self._running_health(instance)
            if client == "healthy":
                message = ""
            elif health is not None and self.check_output:
                message = f"health check {self.check_status}: {self.check_output[:300]}"
        else:
            client, healthy_since = ("pending" if status.restarts == 0 else "unhealthy"), None
            attempts = self.spec.restart.attempts if self.spec is not None else None
            if attempts is not None and status.consecutive_failures > attempts:
                await self._give_up(status.last_exit, attempts)
                return
            if status.state == BACKOFF and status.next_restart_at is not None:
                wait = max(0.0, status.next_restart_at - time.time())
                message = f"crash loop: restarting in {wait:.1f}s" if status.crash_looping else (
                    f"restarting in {wait:.1f}s")
            elif status.state == STARTING and status.restarts:
                message = "restarting"
            if status.last_exit is not None:
                message = f"{message}; last exit: {status.last_exit.describe()}".lstrip("; ")
        await self._write_status(client, healthy_since, message)

    async def _running_health(self, instance: ExecInstance) -> tuple[str, float | None]:
        health = self.spec.health if self.spec is not None else None
        if health is None:
            return "healthy", instance.started_at
        if self.check_status == PASSING:
            if self._healthy_since is None:
                self._healthy_since = time.time()
            self._ever_healthy = True
            return "healthy", self._healthy_since
        self._healthy_since = None
        if (
            self.check_status == CRITICAL
            and self._failing_since is not None
            and not self._restarting
            and sup_state(self.supervisor) == RUNNING
        ):
            counted_from = max(self._failing_since, self._run_started + health.grace)
            if time.monotonic() >= counted_from + (health.failures - 1) * self.health_interval:
                self._restart_for_health(health.failures)
        return ("unhealthy" if self._ever_healthy else "running"), None

    def _restart_for_health(self, failures: int) -> None:
        reason = f"health check failed {failures} time{'s' if failures != 1 else ''} in a row"
        self._restarting = True

        async def restart() -> None:
            try:
                await self._set_check(CRITICAL, f"restarting: {reason}")
                await self.supervisor.restart(reason)
            finally:
                self._restarting = False
                self.wake()

        self._spawn(restart())

    async def _run_began(self, instance: ExecInstance) -> None:
        adopted = self._run_pid is None and instance.adopted
        self._run_pid = instance.pid
        # An adopted run started before this server did; its grace period counts from its real start.
        self._run_started = time.monotonic() - max(0.0, time.time() - instance.started_at)
        self._failing_since = None
        self._healthy_since = None
        self._ever_healthy = False
        self._spawn(self._watch_exit(instance))
        await self._sync_registration(True)
        previous = self._previous
        if adopted and previous is not None and previous.pid == instance.pid and previous.client == "healthy":
            self._healthy_since = previous.healthy_since
            self._ever_healthy = True
        if not adopted:
            await self._set_check(CRITICAL, f"instance started (pid {instance.pid}); waiting for its health check")
        else:
            self._note = ""
        await self._read_check()
        if self.spec is not None and self.spec.health is not None and self.spec.health.kind == "command":
            self._spawn(self._feed_command_check(instance))

    async def _run_ended(self, record: ExitRecord | None) -> None:
        self._run_pid = None
        self._healthy_since = None
        self._note = ""
        what = record.describe() if record is not None else "exited"
        await self._set_check(CRITICAL, f"instance not running: {what}")
        await self._sync_registration(False)

    async def _watch_exit(self, instance: ExecInstance) -> None:
        await instance.wait()
        self.wake()

    async def _feed_command_check(self, instance: ExecInstance) -> None:
        """A command check runs with the instance's environment, so the agent runs it and feeds a TTL check."""
        assert self.spec is not None and self.spec.health is not None
        health = self.spec.health
        if not self.agent.script_checks.enabled:
            # However the spec got here (an API, a rollback, a raw store write), nothing runs without the switch.
            await self.agent.feed_ttl_check(self.check_id, CRITICAL, COMMAND_CHECKS_DISABLED)
            return
        while instance.running and not self.stopping:
            started = time.monotonic()
            result = await instance.run_health_command(timeout=health.timeout)
            if not instance.running or self.stopping:
                return
            status = PASSING if result.ok else CRITICAL
            output = result.output.strip() or (
                "exit code 0" if result.ok else f"exit code {result.exit_code}" if result.exit_code is not None
                else "timed out")  # fmt: skip
            await self.agent.feed_ttl_check(self.check_id, status, output)
            await asyncio.sleep(max(0.0, self.health_interval - (time.monotonic() - started)))

    async def _give_up(self, record: ExitRecord | None, attempts: int) -> None:
        self.failed = True
        with contextlib.suppress(Exception):
            await self.supervisor.stop()
        await self._sync_registration(False, force=True)
        what = record.describe() if record is not None else "did not start"
        await self._write_status("failed", None, f"gave up after {attempts} restart attempts; last exit: {what}")

    # ---- catalog and status ---------------------------------------------------------------------

    def _service(self) -> dict[str, Any] | None:
        if self.spec is None:
            return None
        return service_record(
            self.spec, alloc_id=self.alloc.id, index=self.alloc.index, version=self.alloc.version,
            address=self.agent.address, ports=self.supervisor.ports,
        )  # fmt: skip

    async def _sync_registration(self, running: bool, *, force: bool = False) -> None:
        """Registered while running; a checked instance stays registered (critical) while it restarts."""
        service = self._service()
        keep = service is not None and not force and (running or self.spec.health is not None)  # type: ignore[union-attr]
        if keep and service is not None:
            if service != self._registered or await self.agent.catalog.get_service(
                self.agent.node.name, self.alloc.id
            ) is None:
                await self.agent.register_instance(service, self.spec, self.supervisor.ports)  # type: ignore[arg-type]
                self._registered = service
        elif self._registered is not None or force:
            await self.agent.catalog.deregister_service(self.agent.node.name, self.alloc.id)
            self._registered = None

    async def _set_check(self, status: str, text: str) -> None:
        if self.spec is None or self.spec.health is None:
            return
        output = AGENT_OUTPUT_PREFIX + text
        await self.agent.catalog.update_check_status(self.agent.node.name, self.check_id, status, output)
        self.observe_check(status, output)

    async def _read_check(self) -> None:
        check = await self.agent.catalog.get_check(self.agent.node.name, self.check_id)
        if check is not None:
            self.observe_check(str(check.get("Status", CRITICAL)), str(check.get("Output", "")))

    async def _write_status(self, client: str, healthy_since: float | None, message: str) -> None:
        st = self.supervisor.status
        status = AllocStatus(
            client=client,
            healthy_since=healthy_since,
            ports=dict(self.supervisor.ports),
            address=self.agent.address,
            pid=st.pid,
            restarts=self._restarts_base + st.restarts,
            crash_looping=st.crash_looping,
            last_exit=exit_dict(st.last_exit),
            next_restart_at=st.next_restart_at,
            limits=st.limits,
            message=message,
        )
        data = asdict(status)
        if data == self._written:
            return
        await self.agent.write_status(self.alloc.id, replace(status, updated_at=time.time()))
        self._written = data

    # ---- stopping -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Deregister first, wait the drain delay, then SIGTERM the group (SIGKILL after stop_grace)."""
        self.stopping = True
        await self._cancel_loop()
        was_registered = self._registered is not None
        with contextlib.suppress(Exception):
            st = self.supervisor.status
            await self.agent.write_status(self.alloc.id, AllocStatus(
                client="running" if st.pid else "pending", ports=dict(self.supervisor.ports),
                address=self.agent.address, pid=st.pid, restarts=self._restarts_base + st.restarts,
                limits=st.limits, message="stopping: deregistered, draining", updated_at=time.time(),
            ))  # fmt: skip
        await self.agent.catalog.deregister_service(self.agent.node.name, self.alloc.id)
        self._registered = None
        if was_registered and self.supervisor.status.pid is not None and self.agent.drain_delay > 0:
            await asyncio.sleep(self.agent.drain_delay)
        await self.supervisor.stop()
        await self._cancel_side_tasks()

    async def detach(self) -> None:
        """Server shutdown: stop watching, leave the instance running under its shim for the next server."""
        await self._cancel_loop()
        await self._cancel_side_tasks()
        await self.supervisor.detach()

    async def _cancel_loop(self) -> None:
        task, self._task = self._task, None
        if task is not asyncio.current_task():
            await cancel_and_wait(task)

    async def _cancel_side_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._side_tasks if t is not current]
        await cancel_all_and_wait(tasks)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Task[Any]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("alloc %s: %r", self.alloc.id, task.exception())


def sup_state(supervisor: Supervisor) -> str:
    return supervisor.status.state


# ---- the node -------------------------------------------------------------------------------------


class NodeAgent:
    """Runs the allocations the scheduler placed on `node`; instances live under `data_dir`/instances."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        node: NodeIdentity,
        data_dir: Path | str,
        drain_delay: float = DEFAULT_DRAIN_DELAY,
        *,
        health: HealthChecker | None = None,
        capacity: tuple[int, int] | None = None,
        keep_instances_on_stop: bool = True,
        port_range: tuple[int, int] | None = None,
        platform_env: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.platform_env = dict(platform_env or {})  # given to every instance: where the bus is, etc.
        # More env for one allocation's instance start (with --acl: the service's own token; with a secrets engine:
        # its engine token and secrets); set by the server, or by `shipyard agent` (which asks a server for them).
        self.instance_env: Callable[[JobSpec, Allocation], Awaitable[dict[str, str]]] | None = None
        self.catalog = catalog
        self.node = node
        self.data_dir = Path(data_dir)
        self.drain_delay = max(0.0, drain_delay)
        self.health = health
        # Command checks ask the same switch as the registry's script checks; without a checker, it is off.
        self.script_checks = health.scripts if health is not None else ScriptChecks()
        self.capacity = capacity
        self.meta: dict[str, str] = {}  # an agent's --meta and --node-class: on its node record, for constraints
        self.node_class = ""
        self.keep_instances_on_stop = keep_instances_on_stop
        self.address = reachable_address(node.address)
        self.platform_env.setdefault("SHIPYARD_NODE_ADDRESS", self.address)  # what its instances bind (HOST)
        self.driver = ExecDriver(self.data_dir)
        self.ports = PortAllocator(port_range) if port_range else PortAllocator()
        self.mhz_per_core = cpu_mhz_per_core()
        self.runners: dict[str, AllocRunner] = {}
        self._allocs_prefix = f"{ALLOCS}{_q(node.name)}/"
        self._status_prefix = f"{ALLOC_STATUS}{_q(node.name)}/"
        self._checks_prefix = f"{CHECKS}{_q(node.name)}/"
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stops: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._missing: dict[str, tuple[dict[str, int], str]] = {}  # alloc -> (ports it had, why it is gone)
        self._spec_cache: dict[tuple[str, int], JobSpec] = {}

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        await self.write_node()
        allocs_rev = await self._adopt()
        checks_rev = (await self.store.range(self._checks_prefix, prefix=True)).revision
        await self.reconcile()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch(self._allocs_prefix, allocs_rev, self._on_alloc_events)))
        self._tasks.append(loop.create_task(self._watch(self._checks_prefix, checks_rev, self._on_check_events)))
        self._tasks.append(loop.create_task(self._reconcile_loop(), name="agent-reconcile"))

    async def stop(self) -> None:
        """Server shutdown: instances keep running under their shims and are adopted by the next server;
        without a data dir (--dev) nothing could adopt them, so they are stopped."""
        await cancel_all_and_wait(self._tasks)
        self._tasks.clear()
        stops = list(self._stops)
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        runners = list(self.runners.values())
        if self.keep_instances_on_stop:
            await asyncio.gather(*(r.detach() for r in runners), return_exceptions=True)
        else:
            for runner in runners:
                runner.stopping = True
            await asyncio.gather(*(r.supervisor.stop() for r in runners), return_exceptions=True)
            await asyncio.gather(*(r.detach() for r in runners), return_exceptions=True)
        self.runners.clear()
        await self.driver.close()  # the shim fork server exits; the shims it forked run on

    async def write_node(self) -> None:
        """This node's capacity for the planner; keeps an operator's eligibility (drain) as it is."""
        capacity = self.capacity if self.capacity is not None else await asyncio.to_thread(machine_capacity)
        cpu, memory = capacity
        # The machine's kernel, arch, OS... (${attr.*} in placement constraints); the agent's own keys win.
        attributes = {
            **await asyncio.to_thread(machine_attributes),
            "address": self.address, "datacenter": self.node.datacenter, "driver": "exec",
            "limits": self.driver.cgroups.reason if self.driver.cgroups.available else "rss-polling",
        }  # fmt: skip
        key = node_key(self.node.name)
        current = await self.store.get(key)
        eligible = True
        if current is not None:
            with contextlib.suppress(Exception):
                eligible = decode_node(current.value).eligible
        record = encode_node(Node(self.node.name, int(cpu), int(memory), attributes, eligible,
                                  node_class=self.node_class, meta=dict(self.meta)))
        if current is None or current.value != record:
            await self.store.put(key, record)

    async def settle(self) -> None:
        """Reconcile now and wait until what should not run has stopped (deregistered first): an agent back after
        being cut off does this before it says it is live again, so a superseded instance is never counted."""
        await self.reconcile()
        stops = list(self._stops)
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)

    # ---- adoption -------------------------------------------------------------------------------

    async def _adopt(self) -> int:
        """Take over instances still running from before (no duplicates); remember the missing ones' ports."""
        rr = await self.store.range(self._allocs_prefix, prefix=True)
        wanted: dict[str, Allocation] = {}
        for kv in rr.kvs:
            with contextlib.suppress(Exception):
                alloc = decode_alloc(kv.value)
                if alloc.desired == "run":
                    wanted[alloc.id] = alloc
        previous = await self._previous_statuses()
        # Deregister first: adoption stops instances of allocations that went away while the server was down.
        snap = await self.catalog.snapshot()
        for entry in snap.services_of_node(self.node.name):
            alloc_id = (entry.data.get("Meta") or {}).get("shipyard-alloc")
            if alloc_id and alloc_id == entry.data.get("ID") and alloc_id not in wanted:
                await self.catalog.deregister_service(self.node.name, alloc_id)
        report = await adopt_instances(self.driver, self.ports, wanted)
        for instance in report.adopted:
            alloc = wanted[instance.alloc_id]
            spec = await self.job_spec(alloc.job, alloc.version)
            supervisor = Supervisor.for_adopted(self.driver, instance)
            runner = AllocRunner(
                self, alloc, spec, supervisor, previous=previous.get(alloc.id), note="adopted after a server restart",
            )  # fmt: skip
            if self.instance_env is not None:
                # Its secret env was never written down: its next start (a restart) fetches it again.
                supervisor.respec = lambda runner=runner: self._respec(runner)  # type: ignore[misc]
            self.runners[alloc.id] = runner
            runner.start()
            log.info("adopted instance %s of %s (pid %s)", alloc.id, alloc.job, instance.pid)
        for missing in report.missing:
            why = missing.reason
            if missing.exit is not None:
                why += f"; last exit: {missing.exit.describe()}"
            self._missing[missing.state.alloc_id] = (dict(missing.state.ports), why)
            if missing.state.alloc_id in wanted:
                # Replace the last status (it may still say healthy) before anyone plans with it.
                old = previous.get(missing.state.alloc_id)
                await self.write_status(missing.state.alloc_id, AllocStatus(
                    client="pending", ports=dict(missing.state.ports), address=self.address,
                    restarts=old.restarts if old is not None else 0, last_exit=exit_dict(missing.exit),
                    message=f"starting again after a server restart: {why}", updated_at=time.time(),
                ))  # fmt: skip
        for alloc_id in report.reaped_alloc_ids:
            await self.catalog.deregister_service(self.node.name, alloc_id)
            await self.store.delete(alloc_status_key(self.node.name, alloc_id))
        return rr.revision

    async def _previous_statuses(self) -> dict[str, AllocStatus]:
        out = {}
        for kv in (await self.store.range(self._status_prefix, prefix=True)).kvs:
            with contextlib.suppress(Exception):
                out[split_node_alloc(kv.key, ALLOC_STATUS)[1]] = decode_status(kv.value)
        return out

    # ---- reconcile ------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the running instances match allocs/<node>/: start what should run, stop what should not."""
        async with self._lock:
            rr = await self.store.range(self._allocs_prefix, prefix=True)
            wanted: dict[str, Allocation] = {}
            for kv in rr.kvs:
                try:
                    alloc = decode_alloc(kv.value)
                except Exception:
                    log.warning("unreadable allocation record %s", kv.key)
                    continue
                if alloc.desired == "run" and alloc.node == self.node.name:
                    wanted[alloc.id] = alloc
            for alloc_id, alloc in wanted.items():
                runner = self.runners.get(alloc_id)
                if runner is None:
                    await self._start_runner(alloc)
                elif runner.alloc != alloc and not runner.stopping:
                    spec = await self.job_spec(alloc.job, alloc.version)
                    runner.update_alloc(alloc, spec)
            for alloc_id, runner in list(self.runners.items()):
                if alloc_id not in wanted and not runner.stopping:
                    runner.stopping = True
                    task = asyncio.get_running_loop().create_task(self._stop_runner(runner))
                    self._stops.add(task)
                    task.add_done_callback(self._stops.discard)
            await self._collect_leftovers(set(wanted))

    async def _start_runner(self, alloc: Allocation) -> None:
        spec = await self.job_spec(alloc.job, alloc.version)
        if spec is None:
            await self.write_status(alloc.id, AllocStatus(
                client="pending", address=self.address, updated_at=time.time(),
                message=f"job {alloc.job!r} version {alloc.version} not found in the store",
            ))  # fmt: skip
            return
        old_ports, note = self._missing.pop(alloc.id, ({}, ""))
        names = [p.name for p in spec.ports]
        try:
            ports = self._allocate_ports(spec, old_ports)
        except ShipyardError as exc:
            await self.write_status(alloc.id, AllocStatus(
                client="failed", address=self.address, updated_at=time.time(), message=str(exc.message),
            ))  # fmt: skip
            return
        try:
            task = await self._instance_spec(spec, alloc)
        except ShipyardError as exc:  # e.g. a secret it needs cannot be read yet (sealed engine): not started
            self.ports.release(ports.values())  # taken again at the next try
            await self.write_status(alloc.id, AllocStatus(
                client="pending", address=self.address, updated_at=time.time(), message=str(exc.message),
            ))  # fmt: skip
            return
        ports = {name: ports[name] for name in names if name in ports}
        supervisor = Supervisor(self.driver, task, ports)
        previous = None
        if note:
            previous_kv = await self.store.get(alloc_status_key(self.node.name, alloc.id))
            if previous_kv is not None:
                with contextlib.suppress(Exception):
                    previous = decode_status(previous_kv.value)
            note = f"restarted after a server restart: {note}"
        if previous is not None:
            previous = replace(previous, restarts=previous.restarts + 1)  # the run that died while we were away
        runner = AllocRunner(self, alloc, spec, supervisor, previous=previous, note=note)
        self.runners[alloc.id] = runner
        runner.start()

    async def _instance_spec(self, spec: JobSpec, alloc: Allocation) -> InstanceSpec:
        """What the driver runs for `alloc`, with what the instance_env hook delivers split into public env and
        secret env (memory only)."""
        delivered = await self.instance_env(spec, alloc) if self.instance_env is not None else {}
        public = {k: v for k, v in delivered.items() if k in PUBLIC_DELIVERED_ENV}
        secret = {k: v for k, v in delivered.items() if k not in PUBLIC_DELIVERED_ENV}
        return instance_spec_for(spec, alloc, mhz_per_core=self.mhz_per_core,
                                 platform_env={**self.platform_env, **public}, secret_env=secret)

    async def _respec(self, runner: AllocRunner) -> InstanceSpec:
        if runner.spec is None:
            raise ShipyardError(f"job {runner.alloc.job!r} version {runner.alloc.version} not found in the store")
        return await self._instance_spec(runner.spec, runner.alloc)

    def _allocate_ports(self, spec: JobSpec, old_ports: dict[str, int]) -> dict[str, int]:
        names = [p.name for p in spec.ports]
        statics = {p.name: p.static for p in spec.ports if p.static is not None}
        if old_ports:
            # An instance restarted after a server restart keeps its ports when they are still free.
            with contextlib.suppress(ShipyardError):
                return self.ports.allocate(names, {**{n: old_ports[n] for n in names if n in old_ports}, **statics})
        return self.ports.allocate(names, statics)

    async def _stop_runner(self, runner: AllocRunner) -> None:
        try:
            await runner.stop()
        except Exception:
            log.exception("stopping alloc %s failed", runner.alloc.id)
        finally:
            self.ports.release(runner.supervisor.ports.values())
            if self.runners.get(runner.alloc.id) is runner:
                del self.runners[runner.alloc.id]
            with contextlib.suppress(Exception):
                await self.store.delete(alloc_status_key(self.node.name, runner.alloc.id))
            self._dirty.set()

    async def _collect_leftovers(self, wanted: set[str]) -> None:
        """Catalog entries and statuses of allocations this agent no longer runs (e.g. stopped while it was down)."""
        keep = wanted | set(self.runners)
        snap = await self.catalog.snapshot()
        for entry in snap.services_of_node(self.node.name):
            alloc_id = (entry.data.get("Meta") or {}).get("shipyard-alloc")
            if alloc_id and alloc_id == entry.data.get("ID") and alloc_id not in keep:
                await self.catalog.deregister_service(self.node.name, alloc_id)
        for kv in (await self.store.range(self._status_prefix, prefix=True)).kvs:
            alloc_id = split_node_alloc(kv.key, ALLOC_STATUS)[1]
            if alloc_id not in keep:
                await self.store.delete(kv.key)

    def reconcile_soon(self) -> None:
        """Asks for a pass now rather than at the next tick (e.g. an instance start that waited for something)."""
        self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_EVERY):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent reconcile failed")
                await asyncio.sleep(1.0)

    # ---- watches --------------------------------------------------------------------------------

    async def _watch(self, prefix: str, revision: int, apply: Any) -> None:
        await follow_prefix(self.store, prefix, apply, lambda: self._resync(prefix), from_revision=revision,
                            name=f"agent {prefix}")

    async def _resync(self, prefix: str) -> int:
        rr = await self.store.range(prefix, prefix=True)
        if prefix == self._checks_prefix:
            for kv in rr.kvs:
                self._apply_check(kv.value)
        self._dirty.set()
        return rr.revision

    def _on_alloc_events(self, batch: list[Any]) -> None:
        self._dirty.set()

    def _on_check_events(self, batch: list[Any]) -> None:
        for event in batch:
            if event.type == EventType.PUT:
                self._apply_check(event.kv.value)

    def _apply_check(self, raw: bytes) -> None:
        try:
            check = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(check, dict):
            return
        runner = self.runners.get(str(check.get("ServiceID") or ""))
        if runner is not None and check.get("CheckID") == runner.check_id:
            runner.observe_check(str(check.get("Status", CRITICAL)), str(check.get("Output", "")))

    # ---- helpers used by runners ----------------------------------------------------------------

    async def job_spec(self, job: str, version: int) -> JobSpec | None:
        """The spec of `job` at `version` (stored_job_spec), cached: a version's spec never changes."""
        cached = self._spec_cache.get((job, version))
        if cached is not None:
            return cached
        spec = await stored_job_spec(self.store, job, version)
        if spec is not None:
            self._spec_cache[(job, version)] = spec
        return spec

    async def register_instance(self, service: dict[str, Any], spec: JobSpec, ports: dict[str, int]) -> None:
        checks = []
        if spec.health is not None:
            checks.append(check_record(spec.health, job=spec.name, alloc_id=service["ID"], address=self.address,
                                       ports=ports))
        await self.catalog.register_service(self.node.name, service, checks, replace_existing_checks=True)

    async def feed_ttl_check(self, check_id: str, status: str, output: str) -> None:
        try:
            if self.health is not None:
                await self.health.update_ttl_check(check_id, status, output)
            else:
                await self.catalog.update_check_status(self.node.name, check_id, status, output)
        except NotFound:
            pass  # deregistered meanwhile (the instance is being stopped)

    async def write_status(self, alloc_id: str, status: AllocStatus) -> None:
        await self.store.put(alloc_status_key(self.node.name, alloc_id), encode_status(status))

    async def usage(self, alloc_ids: set[str] | None = None) -> dict[str, Usage]:
        """Real CPU and memory of the instances running on this node (of `alloc_ids`, or all): the driver's stats
        of each, read at once; an instance that is not running here has no entry."""
        wanted = [i for a, i in self.driver.running.items() if alloc_ids is None or a in alloc_ids]
        readings = await asyncio.gather(*(self.driver.stats(i) for i in wanted))
        return {i.alloc_id: usage for i, usage in zip(wanted, readings, strict=True) if usage is not None}

    def log_file(self, alloc_id: str, stream: str = "stdout") -> Path:
        """The live log file of an allocation's instance on this node (its rotations sit next to it)."""
        path = self.driver.logs(alloc_id, stream)  # the driver's interface: it knows where its logs are
        if not path.parent.is_dir():
            raise NotFound(f"no instance of allocation {alloc_id!r} ran on node {self.node.name}")
        return path


def _q(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


async def stored_job_spec(store: Store, job: str, version: int) -> JobSpec | None:
    """The spec of `job` at `version`: the job record when it is that version, else its version history."""
    spec = None
    kv = await store.get(job_key(job))
    if kv is not None:
        with contextlib.suppress(Exception):
            record = decode_job(kv.value)
            if record.version == version:
                spec = record.spec
    if spec is None:
        kv = await store.get(job_version_key(job, version))
        if kv is not None:
            with contextlib.suppress(Exception):
                data = orjson.loads(kv.value)
                spec = JobSpec.from_dict(data["spec"] if isinstance(data.get("spec"), dict) else data)
    return spec
