"""Secrets delivered to instances: each start gets its own engine token (the job's `vault.policies`) as VAULT_TOKEN,
and every `secrets:` reference read with that token into its environment variable.

It reads secrets only with the instance's own token (so a job gets nothing its policies do not allow) and never
logs a value or a token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.errors import ShipyardError
from shipyard.secrets.core import VaultCore
from shipyard.secrets.request import Missing, PermissionDenied, Request
from shipyard.secrets.tokens import TokenRequest
from shipyard.spec import TaskSpec

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
        meta={"job": spec.name}, path="auth/token/create"), None)
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


def secrets_env_hook(core: VaultCore, vault_addr: str, previous: EnvHook | None) -> EnvHook:
    """The agent's instance_env hook: what was there before (the ACL token), plus the secrets."""

    async def env_for(spec: TaskSpec) -> dict[str, str]:
        before = await previous(spec) if previous is not None else {}
        return {**before, **await instance_secrets(core, spec, vault_addr)}

    return env_for
