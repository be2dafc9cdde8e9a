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
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shipyard.errors import ShipyardError
from shipyard.scheduler.model import Allocation
from shipyard.secrets import wrapping
from shipyard.secrets.approle import AppRole
from shipyard.secrets.barrier import DATA
from shipyard.secrets.core import VaultCore
from shipyard.secrets.request import Missing, PermissionDenied, Request
from shipyard.secrets.tokens import TokenEntry, TokenRequest, hash_token
from shipyard.spec import TaskSpec
from shipyard.store import Store, follow_prefix
from shipyard.tasks import cancel_all_and_wait

if TYPE_CHECKING:
    from shipyard.agent.node_agent import NodeAgent
    from shipyard.scheduler.jobs import JobService

log = logging.getLogger("shipyard.vault")
SWEEP_INTERVAL = 5.0  # seconds between sweeps of stopped instances' tokens and secret files
SWEEP_GRACE = 10.0  # a token or folder younger than this may belong to an instance that is starting


def files_root_for(data_dir: str | None) -> str:
    """This server's folder of instance secret files: on tmpfs (/dev/shm) when there is one, one per data dir so
    that servers on one machine never sweep each other's, and stable across restarts for adopted instances."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    key = hashlib.sha256((data_dir or f"pid-{os.getpid()}").encode()).hexdigest()[:12]
    return os.path.join(base, f"shipyard-secrets-{os.getuid()}-{key}")


def replace_secret_files(folder: str, files: dict[str, str]) -> None:
    for name, value in files.items():
        draft = os.path.join(folder, f".{name}.new")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        os.replace(draft, os.path.join(folder, name))  # an instance reading it sees the old or the new, whole


def remove_stale_secret_dirs(root: str, live: set[str], older_than: float) -> None:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        folder = os.path.join(root, name)
        with contextlib.suppress(OSError):
            if folder not in live and os.stat(folder).st_mtime < older_than:
                shutil.rmtree(folder, ignore_errors=True)

EnvHook = Callable[[TaskSpec, Allocation], Awaitable[dict[str, str]]]


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


async def _read_ref(core: VaultCore, spec: TaskSpec, token: str, ref: str) -> str:
    path, _, field = ref.partition("#")
    try:
        response = await core.handle(Request("read", path, token=token))
    except PermissionDenied:
        raise SecretUnavailable(f"secret {ref}: permission denied to job {spec.name} (vault.policies)") from None
    except Missing:
        raise SecretUnavailable(f"secret {ref}: not found") from None
    return _field(response, ref, field)


def write_secret_files(root: str, spec: TaskSpec, accessor: str, files: dict[str, str]) -> str:
    """The instance's secret files: 0600 in a 0700 folder of its own under a tmpfs root (never the data dir)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    folder = os.path.join(root, f"{spec.name}.{accessor}")
    os.mkdir(folder, 0o700)
    for name, value in files.items():
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
    return folder


def needs_secrets(spec: TaskSpec) -> bool:
    return bool(spec.secrets or spec.vault_policies or spec.vault_files)


@dataclass
class Delivery:
    """One instance start's engine token and the values its job's references name, read with that token."""

    token: str
    entry: TokenEntry
    env: dict[str, str]  # environment variable -> secret value
    files: dict[str, str]  # file name -> secret value


async def read_job_secrets(core: VaultCore, spec: TaskSpec, token: str) -> tuple[dict[str, str], dict[str, str]]:
    """The job's `secrets:` (env) and `vault.files` values, read with `token` (so only what its policies allow)."""
    env = {name: await _read_ref(core, spec, token, ref) for name, ref in sorted(spec.secrets.items())}
    files = {name: await _read_ref(core, spec, token, ref) for name, ref in sorted(spec.vault_files.items())}
    return env, files


async def deliver(core: VaultCore, spec: TaskSpec, meta: dict[str, str]) -> Delivery:
    """A fresh orphan token with the job's policies and its secrets read with it; `meta` says whose sweep may
    revoke the token (a server's files root, or the agent node and allocation it was delivered to)."""
    if core.barrier.sealed:
        raise SecretUnavailable(f"{spec.name}: the secrets engine is sealed; instances start once it is unsealed")
    token, entry = await core.tokens.create(TokenRequest(
        policies=["default", *spec.vault_policies], display_name=f"job-{spec.name}", orphan=True,
        # Its leases list and revoke by job (revoke-prefix).
        meta={"job": spec.name, **meta}, path=f"auth/shipyard/job/{spec.name}"), None)
    try:
        env, files = await read_job_secrets(core, spec, token)
    except ShipyardError:
        await core.tokens.revoke_tree(entry)  # the instance does not start: its token goes now
        raise
    return Delivery(token, entry, env, files)


async def instance_secrets(core: VaultCore, spec: TaskSpec, vault_addr: str, files_root: str = "") -> dict[str, str]:
    """VAULT_ADDR, a fresh VAULT_TOKEN with the job's policies, the job's secrets read with that token as env, and
    its secret files (SECRETS_DIR)."""
    if not needs_secrets(spec):
        return {}
    delivery = await deliver(core, spec, {"server": files_root})
    # The accessor is not secret: the agent keeps it on record so that its sweep knows the token is in use.
    env = {"VAULT_ADDR": vault_addr, "VAULT_TOKEN": delivery.token, "VAULT_TOKEN_ACCESSOR": delivery.entry.accessor,
           **delivery.env}
    try:
        if delivery.files:
            if not files_root:
                raise SecretUnavailable(f"{spec.name}: secret files need the engine's delivery (not attached)")
            env["SECRETS_DIR"] = await asyncio.to_thread(write_secret_files, files_root, spec,
                                                         delivery.entry.accessor, delivery.files)
    except ShipyardError:
        await core.tokens.revoke_tree(delivery.entry)
        raise
    return env


def secrets_env_hook(core: VaultCore, vault_addr: str, previous: EnvHook | None,
                     watcher: SecretChangeWatcher | None = None) -> EnvHook:
    """The agent's instance_env hook: what was there before (the ACL token), plus the secrets; the watcher learns
    which values each job was started with."""

    async def env_for(spec: TaskSpec, alloc: Allocation) -> dict[str, str]:
        before = await previous(spec, alloc) if previous is not None else {}
        env = await instance_secrets(core, spec, vault_addr, watcher.files_root if watcher is not None else "")
        if watcher is not None and (spec.secrets or spec.vault_files):
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
    for name, ref in sorted([*spec.secrets.items(), *((f"file:{k}", v) for k, v in spec.vault_files.items())]):
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

    def __init__(self, core: VaultCore, store: Store, agent: NodeAgent | None, jobs: JobService | None,
                 files_root: str) -> None:
        # agent None: this server's node agent is its own process (api/local_agent.py), which gets its instances'
        # secrets through the node API as every agent does, and owns their files and signals.
        self.core, self.store, self.agent, self.jobs = core, store, agent, jobs
        self.files_root = files_root  # this server's tmpfs folder of instance secret files
        self.delivered: dict[str, str] = {}  # job -> digest of the values its latest instance start was given
        self.task: asyncio.Task[None] | None = None
        self.sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(follow_prefix(
            self.store, DATA + "logical/", lambda _: self.check(), self._resync, name="secrets engine changes"))
        self.sweeper = loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception as exc:  # a failed sweep is retried on the next tick, never ends the loop
                log.warning("secrets sweep failed: %s: %s", type(exc).__name__, exc)

    async def sweep(self, grace: float = SWEEP_GRACE) -> None:
        """Revokes the engine tokens and removes the secret files of instances that no longer run here (older
        than `grace`, so an instance between its env and its start keeps them)."""
        if self.core.barrier.sealed:
            return
        if self.agent is None:
            await wrapping.purge_expired(self.core, time.time())
            return
        live_tokens, live_accessors, live_dirs = set(), set(), set()
        for runner in list(self.agent.runners.values()):
            spec = runner.supervisor.spec
            live_tokens.add(hash_token(spec.secret_env.get("VAULT_TOKEN", "")))
            # An adopted instance's spec has no secret env, only the accessor of the token it was started with.
            live_accessors.add(spec.env.get("VAULT_TOKEN_ACCESSOR", ""))
            live_dirs.add(spec.env.get("SECRETS_DIR", ""))
        now = time.time()
        for token_hash in await self.core.barrier.list("token/id/"):
            entry = await self.core.tokens.by_hash(token_hash)
            if (entry is not None and entry.path.startswith("auth/shipyard/job/") and token_hash not in live_tokens
                    and entry.accessor not in live_accessors and now - entry.creation_time > grace
                    and entry.meta.get("server") == self.files_root):
                await self.core.tokens.revoke_tree(entry)
        await asyncio.to_thread(remove_stale_secret_dirs, self.files_root, live_dirs, now - grace)
        await wrapping.purge_expired(self.core, now)  # responses wrapped and never unwrapped

    async def _resync(self) -> int:
        revision = self.store.revision
        await self.check()
        return revision

    async def stop(self) -> None:
        await cancel_all_and_wait((self.task, self.sweeper))

    async def check(self) -> None:
        if self.core.barrier.sealed:
            return
        for name, spec in (await self.watched_specs()).items():
            digest = await secrets_digest(self.core, spec)
            if self.delivered.setdefault(name, digest) == digest:
                continue
            self.delivered[name] = digest
            await self._act(spec)

    async def watched_specs(self) -> dict[str, TaskSpec]:
        """The jobs whose secrets this watcher acts on, by name: those this server's node runs."""
        runners = list(self.agent.runners.values()) if self.agent is not None else []
        return {runner.spec.name: runner.spec for runner in runners
                if runner.spec is not None and (runner.spec.secrets or runner.spec.vault_files)
                and not runner.stopping}

    async def _rerender(self, spec: TaskSpec, env: dict[str, str]) -> None:
        """Rewrites a running instance's secret files with the current values, read with its own token."""
        folder, token = env.get("SECRETS_DIR", ""), env.get("VAULT_TOKEN", "")
        if not folder or not spec.vault_files:
            return
        if not token:  # adopted after a server restart: its token was never written down, so not known here
            log.warning("secrets of %s changed, but an adopted instance's files keep the old values until it "
                        "restarts", spec.name)
            return
        try:
            files = {name: await _read_ref(self.core, spec, token, ref) for name, ref in spec.vault_files.items()}
        except ShipyardError as exc:
            log.warning("secrets of %s changed, but its files keep the old values: %s", spec.name, exc.message)
            return
        await asyncio.to_thread(replace_secret_files, folder, files)

    async def _act(self, spec: TaskSpec) -> None:
        if spec.vault_change_mode == "signal":
            sig = signal.Signals[spec.vault_change_signal]
            for runner in list(self.agent.runners.values()) if self.agent is not None else []:
                same_job = runner.spec is not None and runner.spec.name == spec.name
                instance = runner.supervisor.instance if same_job else None
                if instance is not None:
                    task = runner.supervisor.spec
                    await self._rerender(spec, {**task.env, **task.secret_env})  # as Nomad: files, then the signal
                    instance.signal_group(sig)
            log.info("secrets of %s changed: sent %s to its instances", spec.name, sig.name)
        elif spec.vault_change_mode == "restart" and self.jobs is not None:
            try:
                await self.jobs.restart(spec.name)
                log.info("secrets of %s changed: rolling restart", spec.name)
            except ShipyardError as exc:
                log.warning("secrets of %s changed, but it cannot restart now: %s", spec.name, exc.message)
