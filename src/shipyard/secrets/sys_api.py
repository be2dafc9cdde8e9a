"""The sys/ paths: init, unseal, seal, mounts, auth methods, policies, audit devices, rotation, capabilities.

Handlers for an already authorised request; they never check tokens (the core did) and never touch HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest
from shipyard.secrets.barrier import Sealed
from shipyard.secrets.policy import parse_policy
from shipyard.secrets.request import Missing, Request, UnsupportedOperation, data_response

if TYPE_CHECKING:
    from shipyard.secrets.core import VaultCore


def decode_key(value: Any) -> bytes:
    from shipyard.secrets.core import decode_key as decode

    return decode(value)

Handler = Callable[["VaultCore", Request, str], Awaitable["dict[str, Any] | None"]]
_WRITE = ("create", "update")


def _envelope(body: dict[str, Any]) -> dict[str, Any]:
    """Vault's older sys endpoints answer with the fields at the top level and again under `data`."""
    return {**body, **data_response(body)}


async def handle_unauthenticated(core: VaultCore, req: Request) -> dict[str, Any] | None:
    if req.path == "sys/init":
        if req.operation == "read":
            return {"initialized": await core.barrier.seal_config() is not None}
        shares = _int(req.data.get("secret_shares"), "secret_shares")
        threshold = _int(req.data.get("secret_threshold"), "secret_threshold")
        return await core.initialize(shares, threshold)
    if req.path == "sys/unseal":
        if req.operation not in _WRITE:
            raise UnsupportedOperation()
        return await core.unseal(req.data)
    if req.path.startswith("sys/rekey/"):
        return await _rekey(core, req)
    if req.path.startswith("sys/generate-root/"):
        from shipyard.secrets.generate_root import handle as generate_root

        return await generate_root(core, req)
    if req.path == "sys/leader":
        return core.leader_status()
    return await core.seal_status()  # sys/seal-status (sys/health is answered by the edge with its codes)


async def _rekey(core: VaultCore, req: Request) -> dict[str, Any] | None:
    """Vault's sys/rekey: new key shares for the same data, authorised by the current shares (no token)."""
    barrier = core.barrier
    if barrier.sealed:
        raise Sealed()
    if req.path == "sys/rekey/update":
        if req.operation not in _WRITE:
            raise UnsupportedOperation()
        return await barrier.rekey_update(decode_key(req.data.get("key")), str(req.data.get("nonce") or ""))
    if req.operation == "read":
        return await barrier.rekey_view()
    if req.operation == "delete":
        barrier.rekey = None
        return None
    if req.data.get("pgp_keys") or req.data.get("require_verification"):
        raise BadRequest("pgp_keys and require_verification are not supported")
    return await barrier.rekey_init(_int(req.data.get("secret_shares"), "secret_shares"),
                                    _int(req.data.get("secret_threshold"), "secret_threshold"))


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer") from None


async def handle(core: VaultCore, req: Request) -> dict[str, Any] | None:
    rest = req.path[len("sys/"):]
    for prefix, handler in _ROUTES:
        if rest == prefix.rstrip("/") or (prefix.endswith("/") and rest.startswith(prefix)):
            return await handler(core, req, rest[len(prefix):] if rest.startswith(prefix) else "")
    raise Missing()


async def _seal(core: VaultCore, req: Request, _: str) -> None:
    if req.operation not in _WRITE:
        raise UnsupportedOperation()
    core.barrier.seal()
    return None


async def _rotate(core: VaultCore, req: Request, _: str) -> None:
    if req.operation not in _WRITE:
        raise UnsupportedOperation()
    await core.barrier.rotate()
    return None


async def _key_status(core: VaultCore, req: Request, _: str) -> dict[str, Any]:
    ring = core.barrier.keyring
    assert ring is not None
    installed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ring.install_times[ring.term]))
    return _envelope({"term": ring.term, "install_time": installed, "encryptions": 0})


async def _mounts(core: VaultCore, req: Request, path: str) -> dict[str, Any] | None:
    return await _table(core, req, path, auth=False)


async def _auth(core: VaultCore, req: Request, path: str) -> dict[str, Any] | None:
    return await _table(core, req, path, auth=True)


async def _table(core: VaultCore, req: Request, path: str, *, auth: bool) -> dict[str, Any] | None:
    table = core.auth if auth else core.mounts
    if not path:
        listing = {p: m.describe() for p, m in table.mounts.items()}
        if auth:
            listing["token/"] = {"type": "token", "accessor": "auth_token_shipyard", "description": "token based "
                                 "credentials", "config": {"default_lease_ttl": 0, "max_lease_ttl": 0},
                                 "options": None, "local": False, "seal_wrap": False, "uuid": ""}
        else:
            listing["sys/"] = {"type": "system", "accessor": "system_shipyard", "description": "system endpoints",
                               "config": {"default_lease_ttl": 0, "max_lease_ttl": 0}, "options": None,
                               "local": False, "seal_wrap": False, "uuid": ""}
        return _envelope(listing)
    if path.endswith("/tune") or path.endswith("/tune/"):
        mount_path = path.rsplit("/tune", 1)[0]
        if req.operation in _WRITE:
            await table.tune(mount_path, req.data)
            return None
        mount = table.mounts.get(mount_path.strip("/") + "/")
        if mount is None:
            raise BadRequest(f"cannot fetch mount config for {mount_path}")
        return _envelope({**mount.config, "description": mount.description, "options": mount.options})
    if req.operation in _WRITE:
        if auth and path.strip("/") == "token":
            raise BadRequest("token credential backend cannot be enabled again")
        await table.enable(path, req.data)
        return None
    if req.operation == "delete":
        if auth and path.strip("/") == "token":
            raise BadRequest("token credential backend cannot be disabled")
        await table.disable(path)
        return None
    mount = table.mounts.get(path.strip("/") + "/")
    if mount is None:
        raise Missing()
    return _envelope(mount.describe())


async def _policy_list(core: VaultCore) -> list[str]:
    names = [n for n in await core.barrier.list("policy/") if not n.endswith("/")]
    return sorted({*names, "root"})


async def _policy(core: VaultCore, req: Request, name: str) -> dict[str, Any] | None:
    """sys/policy/<name> (field `rules`) — the older API hvac's create_or_update_policy uses."""
    return await _policy_common(core, req, name, legacy=True)


async def _policies_acl(core: VaultCore, req: Request, name: str) -> dict[str, Any] | None:
    return await _policy_common(core, req, name, legacy=False)


async def _policy_common(core: VaultCore, req: Request, name: str, *, legacy: bool) -> dict[str, Any] | None:
    name = name.strip("/").lower()
    if not name:
        names = await _policy_list(core)
        return _envelope({"policies": names, "keys": names}) if legacy else data_response({"keys": names})
    if req.operation == "read":
        return await _read_policy(core, name, legacy)
    if req.operation in _WRITE:
        if name == "root":
            raise BadRequest('cannot update "root" policy')
        text = req.data.get("policy", req.data.get("rules"))
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("'policy' parameter not supplied or empty")
        parse_policy(name, text)  # 400 with the parser's line before anything is stored
        await core.barrier.put_json(f"policy/{name}", {"name": name, "text": text})
        core.policy_cache.pop(name, None)
        return None
    if req.operation == "delete":
        if name in ("root", "default"):
            raise BadRequest(f'cannot delete "{name}" policy')
        await core.barrier.delete(f"policy/{name}")
        core.policy_cache.pop(name, None)
        return None
    raise UnsupportedOperation()


async def _read_policy(core: VaultCore, name: str, legacy: bool) -> dict[str, Any]:
    if name == "root":
        text = ""
    else:
        doc = await core.barrier.get_json(f"policy/{name}")
        if doc is None:
            raise Missing()
        text = doc["text"]
    return _envelope({"name": name, "rules": text}) if legacy else data_response({"name": name, "policy": text})


async def _audit(core: VaultCore, req: Request, path: str) -> dict[str, Any] | None:
    if not path:
        stored = await core.barrier.get_json("core/audit") or {}
        return _envelope({p: {"type": d["type"], "description": d["description"], "options": d["options"],
                              "path": p, "local": False} for p, d in stored.items()})
    if req.operation in _WRITE:
        await core.enable_audit(path, req.data)
        return None
    if req.operation == "delete":
        await core.disable_audit(path)
        return None
    raise UnsupportedOperation()


async def _audit_hash(core: VaultCore, req: Request, path: str) -> dict[str, Any]:
    """The HMAC a device writes for a value, so an operator can search the log for a known value."""
    device = core.audit_devices.get(path.strip("/") + "/")
    if device is None or req.operation not in _WRITE:
        raise Missing()
    if not isinstance(req.data.get("input"), str):
        raise BadRequest("'input' must be a string")
    return _envelope({"hash": device.hash(req.data["input"])})


async def _capabilities_self(core: VaultCore, req: Request, _: str) -> dict[str, Any]:
    assert req.entry is not None
    acl = await core.acl(req.entry)
    paths = req.data.get("paths") or ([req.data["path"]] if req.data.get("path") else [])
    if not isinstance(paths, list) or not paths:
        raise BadRequest("'paths' must be supplied")
    result: dict[str, Any] = {str(p): sorted(acl.capabilities(str(p))) or ["deny"] for p in paths}
    if len(paths) == 1:
        result["capabilities"] = result[str(paths[0])]
    return _envelope(result)


async def _ui_mounts(core: VaultCore, req: Request, path: str) -> dict[str, Any]:
    """What the `vault kv` CLI asks first, to learn the mount and the KV version of a path."""
    found = core.mounts.resolve(path)
    if found is None:
        raise Missing()
    mount = found[0]
    return data_response({**mount.describe(), "path": mount.path})


async def _leases(core: VaultCore, req: Request, path: str) -> dict[str, Any] | None:
    from shipyard.secrets import leases

    return await leases.handle(core, req, path)


_ROUTES: list[tuple[str, Handler]] = [
    ("seal", _seal), ("rotate", _rotate), ("key-status", _key_status), ("mounts/", _mounts), ("auth/", _auth),
    ("policy/", _policy), ("policies/acl/", _policies_acl), ("audit/", _audit), ("audit-hash/", _audit_hash),
    ("capabilities-self", _capabilities_self), ("internal/ui/mounts/", _ui_mounts), ("leases/", _leases),
]
