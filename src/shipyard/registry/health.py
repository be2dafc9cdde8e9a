"""Runs this node's health checks (HTTP, TCP, TTL, script) and records their status in the catalog.

Level-triggered from catalog/checks/<node>/; it writes a check's status only when it changes and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
import yarl

from shipyard.errors import NotFound, ShipyardError
from shipyard.registry.catalog import CHECKS, CRITICAL, PASSING, RUNNABLE_TYPES, WARNING, Catalog, _q
from shipyard.registry.node import NodeIdentity
from shipyard.script_checks import SCRIPTS_DISABLED, ScriptChecks
from shipyard.store import Event, EventType, Store, follow_prefix

log = logging.getLogger("shipyard.health")

MIN_INTERVAL = 1.0  # Consul's checks.MinInterval: shorter intervals are raised to it
DEFAULT_HTTP_TIMEOUT = 10.0
DEFAULT_SCRIPT_TIMEOUT = 30.0
OUTPUT_MAX = 4096  # Consul's checks.DefaultBufSize
REAP_EVERY = 1.0
USER_AGENT = "Consul Health Check"
MAX_REDIRECTS = 10  # Go's http.Client default, which Consul's checks use
REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _seconds(definition: dict[str, Any], name: str) -> float:
    value = definition.get(f"{name}Duration")
    return value / 1e9 if isinstance(value, int | float) and value > 0 else 0.0


def _same_origin(a: yarl.URL, b: yarl.URL) -> bool:
    return (a.scheme, (a.host or "").lower(), a.port) == (b.scheme, (b.host or "").lower(), b.port)


def _truncate(text: str) -> str:
    if len(text) <= OUTPUT_MAX:
        return text
    return f"{text[:OUTPUT_MAX]} ... (captured {OUTPUT_MAX} of {len(text)} bytes)"


@dataclass
class CheckRunner:
    """One running check: its definition, the task probing it, and what it last saw in the store."""

    check_id: str
    kind: str
    definition: dict[str, Any]
    service_id: str
    fingerprint: bytes
    status: str
    output: str
    critical_since: float | None = None
    ttl_deadline: float = 0.0
    ttl_reset: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def observe(self, status: str, output: str) -> None:
        if status == CRITICAL and self.critical_since is None:
            self.critical_since = time.monotonic()
        elif status != CRITICAL:
            self.critical_since = None
        self.status, self.output = status, output


class HealthChecker:
    """Keeps one runner per runnable check of this node, in step with the store."""

    def __init__(
        self, store: Store, catalog: Catalog, node: NodeIdentity, *, enable_script_checks: bool = False,
        http_check_output: bool = False, runs: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        # Which of its node's checks this checker probes (None: all): a server and its node agent process share a
        # node, each probing its own (registration.is_instance_check says which are the agent's).
        self.runs = runs
        self.http_check_output = http_check_output  # record HTTP checks' response bodies (--http-check-output)
        self.store = store
        self.catalog = catalog
        self.node = node
        self.scripts = ScriptChecks(enable_script_checks)  # the one switch, shared with the agent and the jobs
        self._runners: dict[str, CheckRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._prefix = f"{CHECKS}{_q(node.name)}/"

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # Consul's checker does not keep connections alive, so a stopped server is seen at once.
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0), auto_decompress=True
        )
        revision = await self._reconcile()
        self._tasks.append(asyncio.create_task(self._watch_loop(revision), name="health-watch"))
        self._tasks.append(asyncio.create_task(self._reap_loop(), name="health-reaper"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for runner in list(self._runners.values()):
            self._stop_runner(runner)
        tasks = list(self._tasks) + [r.task for r in self._runners.values() if r.task is not None]
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._runners.clear()
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ---- TTL updates (check/pass|warn|fail|update) ------------------------------------------

    async def update_ttl_check(self, check_id: str, status: str, output: str) -> None:
        """Sets a TTL check's status and restarts its TTL clock."""
        check = await self.catalog.get_check(self.node.name, check_id)
        if check is None:
            raise NotFound(f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
        if check.get("Type") != "ttl":
            raise ShipyardError(f'CheckID "{check_id}" does not have associated TTL', status=500)
        output = _truncate(output)
        runner = self._runners.get(check_id)
        if runner is not None:
            runner.ttl_deadline = time.monotonic() + _seconds(runner.definition, "TTL")
            runner.ttl_reset.set()
        await self.catalog.update_check_status(self.node.name, check_id, status, output)
        if runner is not None:
            runner.observe(status, output)

    # ---- reconcile --------------------------------------------------------------------------

    async def _reconcile(self) -> int:
        checks, revision = await self.catalog.checks_of_node(self.node.name)
        seen = set()
        for check in checks:
            cid = check.get("CheckID")
            if isinstance(cid, str):
                seen.add(cid)
                self._sync(cid, check)
        for cid in [c for c in self._runners if c not in seen]:
            self._sync(cid, None)
        return revision

    async def _watch_loop(self, revision: int) -> None:
        await follow_prefix(self.store, self._prefix, self._apply_events, self._reconcile, from_revision=revision,
                            name="health checks")

    def _apply_events(self, batch: list[Event]) -> None:
        for event in batch:
            self._apply_event(event.kv.key, event.kv.value if event.type == EventType.PUT else None)

    def _apply_event(self, key: str, value: bytes | None) -> None:
        check: dict[str, Any] | None = None
        if value is not None:
            try:
                check = orjson.loads(value)
            except orjson.JSONDecodeError:
                check = None
            if not isinstance(check, dict):
                check = None
        cid = check.get("CheckID") if check is not None else unquote(key[len(self._prefix) :])
        if isinstance(cid, str):
            self._sync(cid, check)

    def _sync(self, check_id: str, check: dict[str, Any] | None) -> None:
        """Makes the runner for check_id match its record (None: the check is gone)."""
        runner = self._runners.get(check_id)
        kind = check.get("Type") if check is not None else None
        if check is None or kind not in RUNNABLE_TYPES or (self.runs is not None and not self.runs(check)):
            if runner is not None:
                self._stop_runner(runner)
                del self._runners[check_id]
            return
        raw_definition = check.get("Definition")
        definition = raw_definition if isinstance(raw_definition, dict) else {}
        service_id = check.get("ServiceID") or ""
        fingerprint = orjson.dumps([kind, definition, service_id], option=orjson.OPT_SORT_KEYS)
        status, output = str(check.get("Status", CRITICAL)), str(check.get("Output", ""))
        if runner is not None and runner.fingerprint == fingerprint:
            runner.observe(status, output)
            return
        if runner is not None:
            self._stop_runner(runner)
        runner = CheckRunner(check_id, str(kind), definition, service_id, fingerprint, status, output)
        runner.observe(status, output)
        self._runners[check_id] = runner
        runner.task = asyncio.create_task(self._run(runner), name=f"check-{check_id}")

    def _stop_runner(self, runner: CheckRunner) -> None:
        if runner.task is not None and not runner.task.done():
            runner.task.cancel()

    # ---- running ----------------------------------------------------------------------------

    async def _run(self, runner: CheckRunner) -> None:
        try:
            if runner.kind == "ttl":
                await self._run_ttl(runner)
                return
            if runner.kind == "script" and not self.scripts.enabled:
                await self._record(runner, CRITICAL, SCRIPTS_DISABLED)
                return
            interval = max(_seconds(runner.definition, "Interval"), MIN_INTERVAL)
            while True:
                started = time.monotonic()
                try:
                    status, output = await self._probe(runner)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a probe must never take the checker down
                    log.exception("check %s failed unexpectedly", runner.check_id)
                    status, output = CRITICAL, f"check failed: {exc}"
                await self._record(runner, status, _truncate(output))
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("runner for check %s stopped", runner.check_id)

    async def _record(self, runner: CheckRunner, status: str, output: str) -> None:
        if self._runners.get(runner.check_id) is not runner:
            return  # replaced or removed while probing
        if status == runner.status and output == runner.output:
            return
        # Observed only once written: a result held back while the node is not live (catalog.update_check_status)
        # must be written on a later probe, and the watch brings the record's own status meanwhile.
        if await self.catalog.update_check_status(self.node.name, runner.check_id, status, output,
                                                  while_node_live=True):
            runner.observe(status, output)

    async def _probe(self, runner: CheckRunner) -> tuple[str, str]:
        if runner.kind == "http":
            return await self._probe_http(runner.definition)
        if runner.kind == "tcp":
            return await self._probe_tcp(runner.definition)
        return await self._probe_script(runner.definition)

    async def _probe_http(self, d: dict[str, Any]) -> tuple[str, str]:
        assert self._http is not None
        url = str(d.get("HTTP", ""))
        method = str(d.get("Method") or "GET").upper()
        timeout = _seconds(d, "Timeout") or DEFAULT_HTTP_TIMEOUT
        headers: list[tuple[str, str]] = []
        raw_headers = d.get("Header") or {}
        names = {k.lower() for k in raw_headers}
        if "user-agent" not in names:
            headers.append(("User-Agent", USER_AGENT))
        if "accept" not in names:
            headers.append(("Accept", "text/plain, text/*, */*"))
        for name, values in raw_headers.items():
            for value in values if isinstance(values, list) else [values]:
                headers.append((str(name), str(value)))
        try:
            async with asyncio.timeout(timeout):
                return await self._http_exchange(url, method, headers, d)
        except TimeoutError:
            return CRITICAL, f'{method} "{url}": request timed out after {timeout:g}s'
        except aiohttp.InvalidURL:
            return CRITICAL, f'{method} "{url}": invalid URL'
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return CRITICAL, f'{method} "{url}": {exc or type(exc).__name__}'

    async def _http_exchange(
        self, url: str, method: str, headers: list[tuple[str, str]], d: dict[str, Any]
    ) -> tuple[str, str]:
        """Follows redirects itself, and only those that stay on the checked host (scheme, host and port): a check
        is never a way to make the server fetch some other host's URL."""
        assert self._http is not None
        target, note = url, ""
        for _ in range(MAX_REDIRECTS + 1):
            async with self._http.request(
                method, target, headers=headers, data=(d.get("Body") or None),
                ssl=not d.get("TLSSkipVerify"), allow_redirects=False,
            ) as resp:  # fmt: skip
                location = resp.headers.get("Location") if resp.status in REDIRECTS else None
                if location is None or d.get("DisableRedirects", False):
                    return await self._http_result(method, url, resp, note)
                following = resp.url.join(yarl.URL(location))
                if not _same_origin(following, yarl.URL(url)):
                    note = f" (redirect to {following.host or 'another host'} not followed: checks stay on their host)"
                    return await self._http_result(method, url, resp, note)
            target = str(following)
            if resp.status == 303:
                method = "GET"
        return CRITICAL, f'{method} "{url}": stopped after {MAX_REDIRECTS} redirects'

    async def _http_result(self, method: str, url: str, resp: aiohttp.ClientResponse, note: str) -> tuple[str, str]:
        """Consul's status line; the body only with --http-check-output (it would read back whatever the URL holds,
        an internal one included), otherwise its size and type."""
        if self.http_check_output:
            summary = (await resp.content.read(OUTPUT_MAX)).decode("utf-8", errors="replace")
        else:
            size = f"{resp.content_length} bytes" if resp.content_length is not None else "unknown length"
            summary = f"body not recorded ({size}, {resp.content_type[:100]})"
        line = f"HTTP {method} {url}: {resp.status} {resp.reason or ''}{note} Output: {summary}"
        if 200 <= resp.status < 300:
            return PASSING, line
        if resp.status == 429:
            return WARNING, line
        return CRITICAL, line

    async def _probe_tcp(self, d: dict[str, Any]) -> tuple[str, str]:
        target = str(d.get("TCP", ""))
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            return CRITICAL, f"dial tcp {target}: address {target}: missing port in address"
        host = host.strip("[]")
        timeout = _seconds(d, "Timeout") or DEFAULT_HTTP_TIMEOUT
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port_text)), timeout)
        except TimeoutError:
            return CRITICAL, f"dial tcp {target}: i/o timeout"
        except OSError as exc:
            return CRITICAL, f"dial tcp {target}: connect: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return PASSING, f"TCP connect {target}: Success"

    async def _probe_script(self, d: dict[str, Any]) -> tuple[str, str]:
        if not self.scripts.enabled:
            return CRITICAL, SCRIPTS_DISABLED  # asked again right before running, whatever path led here
        args = [str(a) for a in d.get("ScriptArgs") or []]
        if not args:
            return CRITICAL, "no script arguments"
        timeout = _seconds(d, "Timeout") or DEFAULT_SCRIPT_TIMEOUT
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return CRITICAL, f"Failed to setup invoke: {exc}"
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return CRITICAL, f"Timed out ({timeout:g}s) running check"
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        text = out.decode("utf-8", errors="replace")
        if proc.returncode == 0:
            return PASSING, text
        if proc.returncode == 1:
            return WARNING, text
        return CRITICAL, text

    async def _run_ttl(self, runner: CheckRunner) -> None:
        ttl = _seconds(runner.definition, "TTL")
        if ttl <= 0:
            return
        runner.ttl_deadline = time.monotonic() + ttl
        expired_at = 0.0  # the deadline whose expiry has been recorded
        while True:
            deadline = runner.ttl_deadline
            remaining = deadline - time.monotonic()
            if remaining > 0:
                runner.ttl_reset.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.ttl_reset.wait(), remaining)
                continue
            if expired_at != deadline:
                expired_at = deadline
                await self._record_ttl_expiry(runner, deadline)
                continue
            runner.ttl_reset.clear()
            if runner.ttl_deadline == deadline:
                await runner.ttl_reset.wait()

    async def _record_ttl_expiry(self, runner: CheckRunner, deadline: float) -> None:
        last = runner.output
        if runner.status == CRITICAL and last.startswith("TTL expired"):
            output = last
        elif last:
            output = f"TTL expired (last output before timeout follows): {last}"
        else:
            output = "TTL expired"
        # An update that arrived meanwhile moved the deadline before its own write: it wins.
        if runner.ttl_deadline != deadline or self._runners.get(runner.check_id) is not runner:
            return
        await self._record(runner, CRITICAL, _truncate(output))

    # ---- DeregisterCriticalServiceAfter -----------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            try:
                await self._reap_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reaping critical services failed")

    async def _reap_once(self) -> None:
        now = time.monotonic()
        doomed: set[str] = set()
        for runner in self._runners.values():
            after = _seconds(runner.definition, "DeregisterCriticalServiceAfter")
            if after <= 0 or not runner.service_id or runner.critical_since is None:
                continue
            if now - runner.critical_since >= after:
                doomed.add(runner.service_id)
        for service_id in sorted(doomed):
            log.info("deregistering service %s: a check stayed critical past DeregisterCriticalServiceAfter",
                     service_id)
            await self.catalog.deregister_service(self.node.name, service_id)
