"""The gateway as a system job of `shipyard server`: N worker processes sharing one port, restarted when they die.

Owns starting, restarting (with backoff) and stopping the worker processes; it never proxies a request and never
touches the route table (each worker follows the store on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from shipyard.errors import ShipyardError
from shipyard.registry.node import reachable_address
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger("shipyard.gateway")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0  # a worker that ran this long starts its backoff over


class GatewaySupervisor:
    def __init__(self, control_url: str, *, bind: str, port: int, workers: int, shared_path: str = "",
                 extra_args: tuple[str, ...] = (), stop_grace: float = 10.0) -> None:
        self.control_url = control_url
        self.bind = bind
        self.port = port
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        self.shared_path = shared_path
        self.extra_args = extra_args
        self.extra_env: dict[str, str] = {}  # e.g. the workers' ACL token (SHIPYARD_HTTP_TOKEN)
        self.stop_grace = stop_grace
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.last_exit = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def shared_files(self) -> list[str]:
        """The node's counters and metrics files the workers share (the server removes them after a --dev run)."""
        return [self.shared_path, self.shared_path + ".metrics"] if self.shared_path else []

    def metrics_text(self) -> str:
        """Prometheus text of the whole node: the prometheus plugin's sums from the shared file (every worker's
        requests) and the workers' own state. Reads a file under a short lock: call it off the event loop."""
        from shipyard.gateway.counters import shared_metrics
        from shipyard.gateway.plugins.prometheus import metrics_exposition

        text = metrics_exposition(shared_metrics(self.shared_path + ".metrics")).decode() if self.shared_path else ""
        return text + (
            "# HELP shipyard_gateway_workers Gateway worker processes running.\n"
            "# TYPE shipyard_gateway_workers gauge\n"
            f"shipyard_gateway_workers {len(self.pids)}\n"
            "# HELP shipyard_gateway_worker_restarts_total Gateway workers restarted after they exited.\n"
            "# TYPE shipyard_gateway_worker_restarts_total counter\n"
            f"shipyard_gateway_worker_restarts_total {self.restarts}\n"
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.returncode is None]

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "shipyard.gateway.worker", "--control", self.control_url,
            "--bind", self.bind, "--port", str(self.port), "--parent-pid", str(os.getpid()),
            "--shutdown-grace", str(max(1.0, self.stop_grace - 1.0)), *self.extra_args,
        ]

    async def start(self) -> None:
        for slot in range(self.workers):
            self._tasks.append(asyncio.create_task(self._keep_running(slot)))

    async def wait_listening(self, timeout: float = 30.0) -> None:
        """Returns once the gateway port accepts connections; raises if every worker exited before that (so the
        server never says ready while its workers crash-loop). A slow start past `timeout` only logs."""
        deadline = time.monotonic() + timeout
        host = reachable_address(self.bind)
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection(host, self.port)
            except OSError:
                if self.restarts >= self.workers and not self.pids:
                    raise ShipyardError(
                        f"the gateway workers exit at start ({self.last_exit}); the lines above say why "
                        "(use --gateway-port to choose another port, or --no-gateway)") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        log.warning("the gateway is not listening on port %d after %.0fs; still trying", self.port, timeout)

    async def _keep_running(self, slot: int) -> None:
        delay = BACKOFF_INITIAL
        env = dict(os.environ)
        if self.shared_path:
            env["SHIPYARD_GATEWAY_SHARED"] = self.shared_path
        env.update(self.extra_env)
        while not self._stopping:
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(*self.command(), env=env, stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                log.error("cannot start gateway worker %d: %s", slot, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.processes[slot] = proc
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            self.last_exit = f"exit code {code}" if code >= 0 else f"signal {-code}"
            if time.monotonic() - started > BACKOFF_RESET_AFTER:
                delay = BACKOFF_INITIAL
            log.warning("gateway worker %d (pid %d) exited with %s; restarting in %.1fs", slot, proc.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def stop(self) -> None:
        """SIGTERM every worker (they finish in-flight requests), SIGKILL what is left after stop_grace."""
        self._stopping = True
        procs = [p for p in self.processes.values() if p.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=self.stop_grace)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(Exception):
                        await proc.wait()
        await cancel_all_and_wait(self._tasks)
