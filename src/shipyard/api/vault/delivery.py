"""Secrets delivered to instances: each start gets its own engine token (the job's `vault.policies`) as VAULT_TOKEN,
and every `secrets:` reference read with that token into its environment variable.

It reads secrets only with the instance's own token (so a job gets nothing its policies do not allow) and never
logs a value or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shipyard.errors import ShipyardError
from shipyard.secrets.approle import AppRole
from shipyard.secrets.barrier import DATA
from shipyard.secrets.core import VaultCore
from shipyard.secrets.request import Missing, PermissionDenied, Request
from shipyard.secrets.tokens import TokenRequest
from shipyard.spec import TaskSpec
from shipyard.store import Store, follow_prefix

if TYPE_CHECKING:
    from shipyard.agent.node_agent import NodeAgent
    from shipyard.scheduler.jobs import JobService

log = logging.getLogger("shipyard.vault")

EnvHook = Callable[[TaskSpec], Awaitable[dict[str, str]]]


class SecretUnavailable(ShipyardError):
    status = 503


def _field(response: dict[str, Any] | None, ref: str, field: str) -> str:
    data = (response or {}).get("data") or {}
    if isinstance(data.get("data"), dict) and isinstance(data.get("metadata"), dict):
        data = data["data"]  # KV version 2 wraps the secret with its metadata
    if field not in data:
        raise SecretUnavailable(f"secret {ref}: no field {field!r}")
    value = data[field]
    return value if isinstance(value, str) else str(value)


async def instance_secrets(core: VaultCore, spec: TaskSpec, vault_addr: str) -> dict[str, str]:
    """VAULT_ADDR, a fresh VAULT_TOKEN with the job's policies, and the job's secrets read with that token."""
    if not spec.secrets and not spec.vault_policies:
        return {}
    if core.barrier.sealed:
        raise SecretUnavailable(f"{spec.name}: the secrets engine is sealed; instances start once it is unsealed")
    token, _ = await core.tokens.create(TokenRequest(
        policies=["default", *spec.vault_policies], display_name=f"job-{spec.name}", orphan=True,
        meta={"job": spec.name}, path=f"auth/shipyard/job/{spec.name}"), None)  # its leases: revoke-prefix by job
    env = {"VAULT_ADDR": vault_addr, "VAULT_TOKEN": token}
    for name, ref in sorted(spec.secrets.items()):
        path, _, field = ref.partition("#")
        try:
            response = await core.handle(Request("read", path, token=token))
        except PermissionDenied:
            raise SecretUnavailable(f"secret {ref}: permission denied to job {spec.name} (vault.policies)") from None
        except Missing:
            raise SecretUnavailable(f"secret {ref}: not found") from None
        env[name] = _field(response, ref, field)
    return env


def secrets_env_hook(core: VaultCore, vault_addr: str, previous: EnvHook | None,
                     watcher: SecretChangeWatcher | None = None) -> EnvHook:
    """The agent's instance_env hook: what was there before (the ACL token), plus the secrets; the watcher learns
    which values each job was started with."""

    async def env_for(spec: TaskSpec) -> dict[str, str]:
        before = await previous(spec) if previous is not None else {}
        env = await instance_secrets(core, spec, vault_addr)
        if watcher is not None and spec.secrets:
            watcher.delivered[spec.name] = await secrets_digest(core, spec)
        return {**before, **env}

    return env_for


async def read_internal(core: VaultCore, path: str) -> dict[str, Any] | None:
    """The engine's own read of a secret (no token): only to notice changes, never returned to anyone."""
    found = core.mounts.resolve(path)
    backend = None if found is None else core.mounts.backends.get(found[0].path)
    if found is None or backend is None or isinstance(backend, AppRole):
        return None
    try:
        return await backend.handle(Request("read", path), found[1])
    except ShipyardError:
        return None


async def secrets_digest(core: VaultCore, spec: TaskSpec) -> str:
    """A digest of the values a job's secrets name: equal digests, same environment."""
    digest = hashlib.sha256()
    for name, ref in sorted(spec.secrets.items()):
        path, _, field = ref.partition("#")
        try:
            value = _field(await read_internal(core, path), ref, field)
        except ShipyardError:
            value = "\0missing"
        digest.update(f"{name}\0{len(value)}\0{value}\0".encode())
    return digest.hexdigest()


class SecretChangeWatcher:
    """Follows the engine's storage; when a secret a running job reads changes, acts by the job's change_mode:
    a rolling restart (new instances read the new value), a signal to its instances, or nothing."""

    def __init__(self, core: VaultCore, store: Store, agent: NodeAgent, jobs: JobService | None) -> None:
        self.core, self.store, self.agent, self.jobs = core, store, agent, jobs
        self.delivered: dict[str, str] = {}  # job -> digest of the values its latest instance start was given
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(follow_prefix(
            self.store, DATA + "logical/", lambda _: self.check(), self._resync, name="secrets engine changes"))

    async def _resync(self) -> int:
        revision = self.store.revision
        await self.check()
        return revision

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def check(self) -> None:
        if self.core.barrier.sealed:
            return
        specs = {runner.spec.name: runner.spec for runner in list(self.agent.runners.values())
                 if runner.spec is not None and runner.spec.secrets and not runner.stopping}
        for name, spec in specs.items():
            digest = await secrets_digest(self.core, spec)
            if self.delivered.setdefault(name, digest) == digest:
                continue
            self.delivered[name] = digest
            await self._act(spec)

    async def _act(self, spec: TaskSpec) -> None:
        if spec.vault_change_mode == "signal":
            sig = signal.Signals[spec.vault_change_signal]
            for runner in list(self.agent.runners.values()):
                same_job = runner.spec is not None and runner.spec.name == spec.name
                instance = runner.supervisor.instance if same_job else None
                if instance is not None:
                    instance.signal_group(sig)
            log.info("secrets of %s changed: sent %s to its instances", spec.name, sig.name)
        elif spec.vault_change_mode == "restart" and self.jobs is not None:
            try:
                await self.jobs.restart(spec.name)
                log.info("secrets of %s changed: rolling restart", spec.name)
            except ShipyardError as exc:
                log.warning("secrets of %s changed, but it cannot restart now: %s", spec.name, exc.message)
