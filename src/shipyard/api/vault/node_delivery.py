"""Secrets of instances placed on a `shipyard agent` node: the server's side. An agent asks a server at each instance
start (api/native/node_secrets_api.py); the server mints the instance's engine token, bound to that node and
allocation (its meta), and reads the job's secrets with it. The tokens of allocations no longer placed on their node
are revoked by the active server's sweep; a changed secret of a `change_mode: restart` job placed there restarts it.

It answers only for an allocation the scheduler placed on the node asked for, never logs a value or a token, and never
writes a value anywhere (the agent renders files on its own tmpfs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

import orjson

from shipyard.agent.node_agent import stored_job_spec
from shipyard.api.vault.delivery import (
    SWEEP_GRACE,
    SecretChangeWatcher,
    SecretUnavailable,
    deliver,
    needs_secrets,
    read_job_secrets,
)
from shipyard.errors import ShipyardError
from shipyard.registry.agents import AGENTS
from shipyard.scheduler.model import Allocation
from shipyard.scheduler.records import ALLOC_STATUS, ALLOCS, alloc_key, decode_alloc, split_node_alloc
from shipyard.secrets.core import VaultCore
from shipyard.secrets.tokens import TokenEntry, hash_token
from shipyard.spec import TaskSpec
from shipyard.store import Get, Store

SpecOf = Callable[[str, int], Awaitable[TaskSpec | None]]


class NotPlacedHere(ShipyardError):
    status = 403


async def placed_alloc(store: Store, node: str, alloc_id: str) -> Allocation:
    """The allocation `alloc_id` when the scheduler wants it to run on `node` now; refused otherwise (an agent's
    token gets the secrets of its own node's instances only)."""
    kv = await store.get(alloc_key(node, alloc_id))
    alloc = None
    if kv is not None:
        with contextlib.suppress(TypeError, KeyError, ValueError):
            alloc = decode_alloc(kv.value)
    if alloc is None or alloc.node != node or alloc.desired != "run":
        raise NotPlacedHere(f"allocation {alloc_id!r} is not placed on node {node!r}: secrets are delivered only to "
                            "the node an instance runs on")
    return alloc


def _answer(job: str, env: dict[str, str], files: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"Job": job, "Env": env, "Files": files, **extra}


async def deliver_to_node(core: VaultCore, spec: TaskSpec, alloc: Allocation, vault_addr: str) -> dict[str, Any]:
    """An instance start on an agent node: a fresh token with the job's policies, bound to the node and allocation,
    and the job's secrets read with it."""
    if not needs_secrets(spec):
        return _answer(spec.name, {}, {})
    delivery = await deliver(core, spec, {"node": alloc.node, "alloc": alloc.id})
    return _answer(spec.name, delivery.env, delivery.files, VaultAddr=vault_addr, Token=delivery.token,
                   Accessor=delivery.entry.accessor)


async def refresh_for_node(core: VaultCore, spec: TaskSpec, alloc: Allocation, token: str) -> dict[str, Any]:
    """The current values for a running instance, read with its own token (for a `change_mode: signal` job whose
    secrets changed); only the token delivered to this node for this allocation is taken."""
    if core.barrier.sealed:
        raise SecretUnavailable(f"{spec.name}: the secrets engine is sealed")
    entry = await core.tokens.by_hash(hash_token(token)) if token else None
    if entry is None or entry.meta.get("node") != alloc.node or entry.meta.get("alloc") != alloc.id:
        raise NotPlacedHere(f"that token was not delivered to allocation {alloc.id!r} on node {alloc.node!r}")
    env, files = await read_job_secrets(core, spec, token)
    return _answer(spec.name, env, files)


async def live_node_allocs(store: Store) -> set[tuple[str, str]]:
    """(node, allocation) pairs whose instance may still run on an agent: placed to run, or still reported by a
    live agent (it deletes the report once the instance has stopped; a lost agent's reports do not count)."""
    allocs, statuses, agents = (await store.txn((), [Get(ALLOCS, True), Get(ALLOC_STATUS, True),
                                                     Get(AGENTS, True)])).ranges()
    live: set[tuple[str, str]] = set()
    for kv in allocs:
        with contextlib.suppress(TypeError, KeyError, ValueError):
            if orjson.loads(kv.value).get("desired") == "run":
                live.add(split_node_alloc(kv.key, ALLOCS))
    alive = {unquote(kv.key[len(AGENTS):]) for kv in agents}
    for kv in statuses:
        node, alloc_id = split_node_alloc(kv.key, ALLOC_STATUS)
        if node in alive:
            live.add((node, alloc_id))
    return live


async def sweep_node_tokens(core: VaultCore, store: Store, grace: float) -> int:
    """Revokes the tokens delivered to agent nodes whose allocation no longer runs there (older than `grace`: an
    instance between its delivery and its start keeps its token). Returns how many were revoked."""
    live = await live_node_allocs(store)
    now, revoked = time.time(), 0
    for token_hash in await core.barrier.list("token/id/"):
        entry = await core.tokens.by_hash(token_hash)
        if entry is not None and _stale(entry, live, now - grace):
            await core.tokens.revoke_tree(entry)
            revoked += 1
    return revoked


def _stale(entry: TokenEntry, live: set[tuple[str, str]], created_before: float) -> bool:
    node, alloc_id = entry.meta.get("node", ""), entry.meta.get("alloc", "")
    return (bool(node) and entry.path.startswith("auth/shipyard/job/") and entry.creation_time < created_before
            and (node, alloc_id) not in live)


async def specs_placed_elsewhere(store: Store, own_node: str, spec_of: SpecOf) -> dict[str, TaskSpec]:
    """The specs of jobs with secrets that run on nodes other than `own_node` (agents' nodes), by job."""
    out: dict[str, TaskSpec] = {}
    for kv in (await store.range(ALLOCS, prefix=True)).kvs:
        try:
            alloc = decode_alloc(kv.value)
        except (TypeError, KeyError, ValueError):
            continue
        if alloc.desired != "run" or alloc.node == own_node or alloc.job in out:
            continue
        spec = await spec_of(alloc.job, alloc.version)
        if spec is not None and (spec.secrets or spec.vault_files):
            out[alloc.job] = spec
    return out


class ClusterSecretChangeWatcher(SecretChangeWatcher):
    """A server's watcher that also looks after the instances its agents run, when this server is the engine's
    active node (alone, or the leader on etcd): one server acts for them, not each.

    A changed secret of a `change_mode: restart` job placed on an agent node restarts it here, through the jobs
    service (rolling, whatever node it runs on). Signal and file re-rendering are the agent's own (it follows the
    engine's changes and reads the new values with the instance's token, api/agent_secrets.py): only it can signal
    its processes and write its tmpfs, and a server pushing values to an agent's logs listener would send them over
    plain HTTP. The sweep also revokes the tokens of agent nodes' allocations that no longer run there.
    """

    async def watched_specs(self) -> dict[str, TaskSpec]:
        specs = await super().watched_specs()
        if self.core.standby():
            return specs
        if self.agent is not None:
            elsewhere = await specs_placed_elsewhere(self.store, self.agent.node.name, self.agent.job_spec)
        else:  # this server's node agent is a process of its own: every node's instances are an agent's
            elsewhere = await specs_placed_elsewhere(self.store, "", partial(stored_job_spec, self.store))
        for name, spec in elsewhere.items():
            if spec.vault_change_mode == "restart":
                specs.setdefault(name, spec)
        return specs

    async def sweep(self, grace: float = SWEEP_GRACE) -> None:
        await super().sweep(grace)
        if not self.core.barrier.sealed and not self.core.standby():
            await sweep_node_tokens(self.core, self.store, grace)
