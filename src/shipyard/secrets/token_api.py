"""The auth/token/ paths and AppRole login: create, look up, renew and revoke tokens, as Vault's token store.

Handlers for an already authorised request; the token IDs they return are never stored or logged in clear.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest
from shipyard.secrets.approle import AppRole
from shipyard.secrets.request import Missing, PermissionDenied, Request, UnsupportedOperation, data_response
from shipyard.secrets.tokens import TokenEntry, TokenRequest, parse_duration

if TYPE_CHECKING:
    from shipyard.secrets.core import VaultCore

_WRITE = ("create", "update")


def auth_block(token_id: str, entry: TokenEntry, now_ttl: int) -> dict[str, Any]:
    return {"client_token": token_id, "accessor": entry.accessor, "policies": entry.policies,
            "token_policies": entry.policies, "identity_policies": None, "metadata": entry.meta or None,
            "lease_duration": now_ttl, "renewable": entry.renewable and bool(entry.expire_time), "entity_id": "",
            "token_type": "service", "orphan": entry.orphan, "mfa_requirement": None, "num_uses": entry.num_uses}


def _policies(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise BadRequest("policies must be a list of strings")


def _child_policies(parent: TokenEntry, data: dict[str, Any]) -> list[str]:
    """The policies asked for (the parent's when none), which a non-root parent must hold itself."""
    policies = _policies(data.get("policies"))
    if policies is None:
        policies = list(parent.policies)
    if not parent.root:
        extra = set(policies) - set(parent.policies) - {"default"}
        if extra:
            raise BadRequest(f"child policies must be subset of parent: {sorted(extra)[0]} is not held")
    if not data.get("no_default_policy") and "root" not in policies:
        policies = [*policies, "default"]
    return policies


def _check_privileged_fields(parent: TokenEntry, data: dict[str, Any], *, orphan: bool) -> None:
    if parent.root:
        return
    if data.get("id"):
        raise BadRequest("root or sudo privileges required to specify token id")
    if data.get("no_parent") and not orphan:
        raise BadRequest("root or sudo privileges required to create orphan token")


def _token_request(parent: TokenEntry, data: dict[str, Any], *, orphan: bool) -> TokenRequest:
    _check_privileged_fields(parent, data, orphan=orphan)
    policies = _child_policies(parent, data)
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise BadRequest("meta must be a map of strings")
    name = str(data.get("display_name") or "").strip()
    return TokenRequest(
        policies=policies, ttl=parse_duration(data.get("ttl") or data.get("lease"), "ttl"),
        explicit_max_ttl=parse_duration(data.get("explicit_max_ttl"), "explicit_max_ttl"),
        period=parse_duration(data.get("period"), "period"), num_uses=_int(data.get("num_uses"), "num_uses"),
        renewable=data.get("renewable", True) is not False, display_name=f"token-{name}" if name else "token",
        meta={str(k): str(v) for k, v in meta.items()}, orphan=orphan or bool(data.get("no_parent")),
        token_id=str(data.get("id") or ""),
    )


def _int(value: Any, name: str) -> int:
    try:
        number = int(value or 0)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer") from None
    if number < 0:
        raise BadRequest(f"{name} cannot be negative")
    return number


async def handle(core: VaultCore, req: Request) -> dict[str, Any] | None:
    action = req.path[len("auth/token/"):]
    entry = req.entry
    assert entry is not None
    if action in ("create", "create-orphan") and req.operation in _WRITE:
        return await _create(core, entry, req.data, orphan=action == "create-orphan")
    if action in ("lookup-self", "renew-self", "revoke-self"):
        return await _self_action(core, req, entry, action)
    if action in ("lookup", "renew", "revoke", "revoke-orphan"):
        target = await core.tokens.lookup(str(req.data.get("token") or ""))
        return await _on_token(core, req, target, action, str(req.data.get("token") or ""))
    if action in ("lookup-accessor", "renew-accessor", "revoke-accessor"):
        target = await core.tokens.by_accessor(str(req.data.get("accessor") or ""))
        return await _on_token(core, req, target, action.replace("-accessor", ""), "")
    if action.rstrip("/") == "accessors" and req.operation in ("list", "read"):
        return data_response({"keys": await core.tokens.accessors()})
    # Not Vault's deprecated GET auth/token/lookup/<token>: a token in a URL ends up in paths, logs and the audit.
    raise Missing()


async def _create(core: VaultCore, parent: TokenEntry, data: dict[str, Any], *, orphan: bool) -> dict[str, Any]:
    request = _token_request(parent, data, orphan=orphan)
    token_id, entry = await core.tokens.create(request, parent)
    return data_response(None, auth=auth_block(token_id, entry, entry.ttl(time.time())))


async def _self_action(core: VaultCore, req: Request, entry: TokenEntry, action: str) -> dict[str, Any] | None:
    if action == "lookup-self":
        return data_response(entry.lookup(req.token))
    if req.operation not in _WRITE:
        raise UnsupportedOperation()
    if action == "revoke-self":
        await core.tokens.revoke_tree(entry)
        return None
    return await _renew(core, entry, req.token, req.data)


async def _renew(core: VaultCore, entry: TokenEntry, token_id: str, data: dict[str, Any]) -> dict[str, Any]:
    renewed = await core.tokens.renew(entry, parse_duration(data.get("increment"), "increment"))
    return data_response(None, auth=auth_block(token_id, renewed, renewed.ttl(time.time())))


async def _on_token(core: VaultCore, req: Request, target: TokenEntry | None, action: str,
                    token_id: str) -> dict[str, Any] | None:
    if action != "lookup" and req.operation not in _WRITE:
        raise UnsupportedOperation()
    if target is None:
        if action == "lookup":
            raise BadRequest("bad token")
        if action == "revoke":
            return None  # revoking an unknown token is a no-op in Vault
        raise BadRequest("invalid token")
    if action == "lookup":
        return data_response(target.lookup(token_id))
    if action == "renew":
        return await _renew(core, target, token_id, req.data)
    if action == "revoke-orphan":
        await core.tokens.revoke_orphan(target)
        return None
    await core.tokens.revoke_tree(target)
    return None


async def approle_login(core: VaultCore, backend: AppRole, req: Request) -> dict[str, Any]:
    if req.operation not in _WRITE:
        raise UnsupportedOperation()
    try:
        _, request, meta = await backend.login(req.data)
    except BadRequest:
        raise
    except Exception:
        raise PermissionDenied() from None
    token_id, entry = await core.tokens.create(request, None)
    return data_response(None, auth=auth_block(token_id, entry, entry.ttl(time.time())) | {"metadata": meta})
