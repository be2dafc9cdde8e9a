"""Secrets of the instances a `shipyard agent` runs: at each instance start it asks a server (POST
/api/v1/nodes/<node>/secrets, api/native/node_secrets_api.py) for the instance's engine token and its job's secret
values, gives them as secret env (memory only, over the shim's pipe) and renders `vault.files` on its own tmpfs
folder; it follows the engine's changes for `change_mode: signal` jobs and removes the files of instances gone.

It never logs a value or a token and never writes one under its data dir; it mints nothing itself (the server does,
for allocations placed on this node only) and revokes nothing (the active server's sweep does).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
from typing import Any
from urllib.parse import quote

from shipyard.agent.node_agent import AllocRunner, NodeAgent
from shipyard.api.vault.delivery import (
    SWEEP_GRACE,
    SWEEP_INTERVAL,
    SecretUnavailable,
    needs_secrets,
    remove_stale_secret_dirs,
    replace_secret_files,
    write_secret_files,
)
from shipyard.errors import ShipyardError
from shipyard.scheduler.model import Allocation
from shipyard.secrets.barrier import DATA
from shipyard.spec import TaskSpec
from shipyard.store import StoreError, follow_prefix
from shipyard.store.remote import RemoteStore
from shipyard.tasks import cancel_all_and_wait

log = logging.getLogger("shipyard.agent")
RETRY_SOON = 2.0  # a start refused for now (sealed engine, no server): tried again this soon, not at the next tick
CHANGES = DATA + "logical/"  # the engine's secrets (encrypted): the agent sees that they change, never what they are


def _digest(answer: dict[str, Any]) -> str:
    """Equal digests, same values delivered (env and files)."""
    digest = hashlib.sha256()
    for kind in ("Env", "Files"):
        for name, value in sorted((answer.get(kind) or {}).items()):
            digest.update(f"{kind}\0{name}\0{len(str(value))}\0{value}\0".encode())
    return digest.hexdigest()


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class AgentSecrets:
    """The agent's instance_env hook for secrets, its change follower and its file sweep.

    Signal and file re-rendering are done here rather than pushed by a server: only this agent can signal its
    processes and write its tmpfs, and the values then travel once, over the agent's own (HTTPS with TLS) link to the
    servers, read with the instance's own token. A `change_mode: restart` job is restarted by the active server
    (rolling, through the jobs service), as on a server's node.
    """

    def __init__(self, store: RemoteStore, agent: NodeAgent, files_root: str) -> None:
        self.store, self.agent, self.files_root = store, agent, files_root
        self.delivered: dict[str, str] = {}  # alloc -> digest of the values its running instance was given
        self.tasks: list[asyncio.Task[None]] = []
        self._warned: set[str] = set()
        self._checking = asyncio.Lock()

    def _path(self) -> str:
        return f"/api/v1/nodes/{quote(self.agent.node.name, safe='')}/secrets"

    def attach(self) -> None:
        """Each instance start gets its secrets after what the hook already gave (the ACL service token)."""
        previous = self.agent.instance_env

        async def env_for(spec: TaskSpec, alloc: Allocation) -> dict[str, str]:
            before = await previous(spec, alloc) if previous is not None else {}
            return {**before, **await self.env_for(spec, alloc)}

        self.agent.instance_env = env_for
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(follow_prefix(
            self.store, CHANGES, lambda _: self.check(), self._resync, name="secrets engine changes")))
        self.tasks.append(loop.create_task(self._sweep_forever(), name="secret files sweep"))

    async def _call(self, body: dict[str, str]) -> Any:
        """The route on the current server (the store's failover, token and TLS); a server whose engine is sealed
        refused before minting anything, so the next --server is asked at once (each is unsealed on its own), and
        the agent's store moves on to it."""
        for attempt in range(len(self.store.base_urls)):
            try:
                return await self.store._call("POST", self._path(), json_body=body)
            except StoreError as exc:
                if exc.status != 503 or "sealed" not in exc.message or attempt == len(self.store.base_urls) - 1:
                    raise
                self.store.next_server()
        raise AssertionError("unreachable")

    async def _ask(self, spec: TaskSpec, body: dict[str, str]) -> dict[str, Any]:
        try:
            answer = await self._call(body)
        except StoreError as exc:
            if exc.status in (502, 503, 504):  # sealed, or no server now: the start waits and is tried again
                asyncio.get_running_loop().call_later(RETRY_SOON, self.agent.reconcile_soon)
            raise SecretUnavailable(f"{spec.name}: its secrets were not delivered: {exc.message}") from None
        if not isinstance(answer, dict):
            raise SecretUnavailable(f"{spec.name}: its secrets were not delivered: unexpected answer")
        return answer

    async def env_for(self, spec: TaskSpec, alloc: Allocation) -> dict[str, str]:
        """VAULT_ADDR, the instance's own VAULT_TOKEN (and its accessor), the job's secrets, SECRETS_DIR."""
        if not needs_secrets(spec):
            return {}
        answer = await self._ask(spec, {"Alloc": alloc.id})
        accessor = str(answer.get("Accessor", ""))
        env = {"VAULT_ADDR": str(answer.get("VaultAddr", "")), "VAULT_TOKEN": str(answer.get("Token", "")),
               "VAULT_TOKEN_ACCESSOR": accessor, **_strings(answer.get("Env"))}
        ca_file = self.agent.platform_env.get("SHIPYARD_CACERT", "")
        if env["VAULT_ADDR"].startswith("https://") and ca_file:
            env["VAULT_CACERT"] = ca_file  # the engine speaks TLS with the control API's certificate: the same CA
        files = _strings(answer.get("Files"))
        if files:
            try:
                env["SECRETS_DIR"] = await asyncio.to_thread(write_secret_files, self.files_root, spec, accessor,
                                                             files)
            except OSError as exc:  # its token is revoked by the server's sweep once the allocation goes
                raise SecretUnavailable(f"{spec.name}: its secret files cannot be written: {exc.strerror}") from None
        self.delivered[alloc.id] = _digest(answer)
        return env

    # ---- changes ----------------------------------------------------------------------------------------------

    async def _resync(self) -> int:
        revision = (await self.store.range(CHANGES)).revision  # one absent key: only the revision comes back
        await self.check()
        return revision

    async def check(self) -> None:
        """Something in the engine changed: each running instance of a `change_mode: signal` job whose values
        differ from what it was given gets its files rewritten, then its signal (as Nomad's template does)."""
        async with self._checking:
            for runner in list(self.agent.runners.values()):
                spec = runner.spec
                if (spec is not None and not runner.stopping and spec.vault_change_mode == "signal"
                        and (spec.secrets or spec.vault_files)):
                    await self._refresh(runner, spec)

    async def _refresh(self, runner: AllocRunner, spec: TaskSpec) -> None:
        task, instance = runner.supervisor.spec, runner.supervisor.instance
        token = task.secret_env.get("VAULT_TOKEN", "")
        if instance is None:
            return
        if not token:  # adopted after an agent restart: its token was never written down
            if runner.alloc.id not in self._warned:
                self._warned.add(runner.alloc.id)
                log.warning("secrets of %s may change, but an adopted instance is not told until it restarts",
                            spec.name)
            return
        try:
            answer = await self._ask(spec, {"Alloc": runner.alloc.id, "Token": token})
        except ShipyardError as exc:
            log.warning("secrets of %s: cannot read them again (%s)", spec.name, exc.message)
            return
        digest = _digest(answer)
        if self.delivered.setdefault(runner.alloc.id, digest) == digest:
            return
        self.delivered[runner.alloc.id] = digest
        folder = task.env.get("SECRETS_DIR", "")
        if folder and answer.get("Files"):
            await asyncio.to_thread(replace_secret_files, folder, _strings(answer.get("Files")))
        sig = signal.Signals[spec.vault_change_signal]
        instance.signal_group(sig)
        log.info("secrets of %s changed: sent %s to its instance %s", spec.name, sig.name, runner.alloc.id)

    # ---- sweep ------------------------------------------------------------------------------------------------

    async def sweep(self, grace: float = SWEEP_GRACE) -> None:
        """Removes the secret files of instances that no longer run here (older than `grace`: an instance between
        its delivery and its start keeps them); their tokens are the active server's to revoke."""
        runners = list(self.agent.runners.values())
        live_dirs = {runner.supervisor.spec.env.get("SECRETS_DIR", "") for runner in runners}
        await asyncio.to_thread(remove_stale_secret_dirs, self.files_root, live_dirs, time.time() - grace)
        live_allocs = {runner.alloc.id for runner in runners}
        for alloc_id in [a for a in self.delivered if a not in live_allocs]:
            del self.delivered[alloc_id]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception as exc:  # the next sweep tries again; the agent goes on
                log.warning("secret files sweep failed: %s: %s", type(exc).__name__, exc)

    async def stop(self) -> None:
        await cancel_all_and_wait(self.tasks)
        self.tasks.clear()
