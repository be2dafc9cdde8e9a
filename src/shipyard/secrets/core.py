"""The engine's core: seal state, authentication, authorisation, routing to sys/auth/engines, and auditing.

It owns the order every request goes through (sealed? token? capability? audit, handle, audit); the HTTP edge
never checks a token or a policy itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from shipyard.errors import BadRequest, ShipyardError
from shipyard.secrets import audit as audit_mod
from shipyard.secrets import wrapping
from shipyard.secrets.approle import AppRole
from shipyard.secrets.barrier import DATA, PREFIX, Barrier, Sealed
from shipyard.secrets.mounts import MountTable
from shipyard.secrets.policy import ACL, DEFAULT_POLICY, Policy, parse_policy
from shipyard.secrets.request import Missing, PermissionDenied, Request, data_response
from shipyard.secrets.tokens import TokenEntry, TokenRequest, TokenStore
from shipyard.store import follow_prefix
from shipyard.tasks import cancel_all_and_wait

VERSION = "1.15.0+shipyard"
# Answered while sealed and without a token, as in Vault.
UNAUTHENTICATED = ("sys/init", "sys/unseal", "sys/seal-status", "sys/health", "sys/leader", "sys/rekey/init",
                   "sys/rekey/update", "sys/generate-root/attempt", "sys/generate-root/update")
# Paths that need `sudo` besides their operation's capability (Vault's root-protected paths).
SUDO_PATHS = ("sys/seal", "sys/rotate", "sys/audit", "sys/auth/", "sys/raw", "auth/token/accessors",
              "auth/token/revoke-orphan", "sys/leases/revoke-prefix", "sys/leases/revoke-force",
              "sys/leases/lookup/")


def decode_key(value: Any) -> bytes:
    """An unseal key as Vault's clients send it: hex, or base64."""
    if not isinstance(value, str) or not value:
        raise BadRequest("'key' must be specified in request body as JSON, or 'reset' set to true")
    try:
        return bytes.fromhex(value)
    except ValueError:
        pass
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'key' must be a valid hex or base64 string") from None


def check_path(path: str) -> str:
    """Refuses path tricks (.., empty or control characters) before any routing or storage key is built."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise BadRequest("invalid path: control characters")
    parts = path.split("/")
    if any(part in (".", "..") for part in parts) or "" in parts[:-1]:
        raise BadRequest(f"invalid path {path!r}")
    return path


class VaultCore:
    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.tokens = TokenStore(barrier)
        self.mounts = MountTable(barrier, "core/mounts", auth=False)
        self.auth = MountTable(barrier, "core/auth", auth=True)
        self.audit_devices: dict[str, audit_mod.FileAuditDevice] = {}
        self.policy_cache: dict[str, Policy] = {}
        # Called (as tasks) after each unseal: the agent starts the instances that waited for their secrets.
        self.on_unseal: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._followers: list[asyncio.Task[None]] = []
        self.root_generation: Any = None  # a sys/generate-root attempt in progress (generate_root.RootGeneration)
        # Servers on one etcd: the leader is the active node, the others standbys (set by the server). A standby
        # serves every request itself (the state is the shared store, written with compare-and-swap); only
        # sys/health and sys/leader tell the difference, so load balancers can prefer the active one.
        self.ha_enabled = False
        self.standby: Callable[[], bool] = lambda: False
        self.address = ""  # this server's engine address, for sys/leader

    # --- seal lifecycle -------------------------------------------------------------------------------------
    async def initialize(self, shares: int, threshold: int) -> dict[str, Any]:
        keys = await self.barrier.initialize(shares, threshold)
        # Set up the tables and the root token once, unsealed for the moment, then sealed again as Vault leaves it.
        await self.barrier.unseal_with(keys[0] if shares == 1 else _combine(keys[:threshold]))
        await self.barrier.put_json("core/mounts", {})
        await self.barrier.put_json("core/auth", {})
        await self.barrier.put_json("policy/default", {"name": "default", "text": DEFAULT_POLICY})
        root_id, _ = await self.tokens.create(TokenRequest(policies=["root"], path="auth/token/root",
                                                           display_name="root"), None)
        self.barrier.seal()
        return {"keys": [k.hex() for k in keys], "keys_base64": [base64.b64encode(k).decode() for k in keys],
                "root_token": root_id}

    async def unseal(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("reset"):
            self.barrier.reset_progress()
            return await self.seal_status()
        if await self.barrier.submit_share(decode_key(data.get("key"))):
            await self.post_unseal()
        return await self.seal_status()

    async def post_unseal(self) -> None:
        await self.reload()
        self._follow_shared_state()
        for callback in self.on_unseal:
            task = asyncio.get_running_loop().create_task(callback())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """Re-reads what this process keeps of the shared state: the keyring's terms, mounts, auth methods, audit
        devices; forgets parsed policies."""
        await self.barrier.reload_keyring()
        await self.mounts.load()
        await self.auth.load()
        await self._load_audit()
        self.policy_cache.clear()

    def _follow_shared_state(self) -> None:
        """Servers sharing one store (etcd) see each other's rotations, mounts, auth methods, audit devices and
        policies: each change under those prefixes reloads them here (level-triggered, like every loop)."""
        if self._followers:
            return

        async def on_change(_: object) -> None:
            if not self.barrier.sealed:
                await self.reload()

        async def resync() -> int:
            revision = self.barrier.store.revision
            await on_change(None)
            return revision

        loop = asyncio.get_running_loop()
        for prefix in (PREFIX + "core/", DATA + "core/", DATA + "policy/"):
            self._followers.append(loop.create_task(follow_prefix(self.barrier.store, prefix, on_change, resync,
                                                                  from_revision=self.barrier.store.revision,
                                                                  name=f"secrets engine {prefix}")))

    async def stop_following(self) -> None:
        await cancel_all_and_wait(self._followers)
        self._followers = []

    async def seal_status(self) -> dict[str, Any]:
        config = await self.barrier.seal_config()
        return {"type": "shamir", "initialized": config is not None, "sealed": self.barrier.sealed,
                "t": config["secret_threshold"] if config else 0, "n": config["secret_shares"] if config else 0,
                "progress": len(self.barrier.unseal_shares), "nonce": self.barrier.nonce, "version": VERSION,
                "build_date": "", "migration": False, "recovery_seal": False, "storage_type": "shipyard",
                **({"cluster_name": "shipyard", "cluster_id": ""} if not self.barrier.sealed else {})}

    async def health(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Vault's /sys/health: 200 active, 429 standby, 501 uninitialised, 503 sealed (query overrides)."""
        config = await self.barrier.seal_config()
        body = {"initialized": config is not None, "sealed": self.barrier.sealed, "standby": False,
                "performance_standby": False, "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled", "server_time_utc": int(time.time()), "version": VERSION,
                "cluster_name": "shipyard", "cluster_id": ""}
        if config is None:
            return _code(query, "uninitcode", 501), body
        if self.barrier.sealed:
            return _code(query, "sealedcode", 503), body
        body["standby"] = self.standby()
        # Vault's order: a standby is 429 unless ?standbyok; ?perfstandbyok concerns performance standbys, which
        # these are not (they report performance_standby false), so it changes nothing here.
        if body["standby"] and not _flag(query, "standbyok"):
            return _code(query, "standbycode", 429), body
        return _code(query, "activecode", 200), body

    def leader_status(self) -> dict[str, Any]:
        """sys/leader: in a cluster, whether this server is the active node (its own address when it is; a
        standby does not know the active node's engine port, so it answers an empty leader_address). A lone
        server answers as Vault without HA: ha_enabled and is_self false."""
        active = self.ha_enabled and not self.standby()
        return {"ha_enabled": self.ha_enabled, "is_self": active, "active_time": "0001-01-01T00:00:00Z",
                "leader_address": self.address if active else "", "leader_cluster_address": "",
                "performance_standby": False, "performance_standby_last_remote_wal": 0, "raft_committed_index": 0}

    async def dev_start(self, token_id: str = "") -> dict[str, Any]:
        """Dev mode: initialise with one share, unseal, mount kv v2 at secret/ (as `vault server -dev`)."""
        result = await self.initialize(1, 1)
        await self.barrier.unseal_with(decode_key(result["keys"][0]))
        await self.post_unseal()
        await self.mounts.enable("secret/", {"type": "kv", "options": {"version": "2"}})
        if token_id:
            await self.tokens.create(TokenRequest(policies=["root"], path="auth/token/root", display_name="root",
                                                  token_id=token_id), None)
        return result

    # --- requests -------------------------------------------------------------------------------------------
    async def handle(self, req: Request) -> dict[str, Any] | None:
        check_path(req.path)
        if req.path in UNAUTHENTICATED:
            from shipyard.secrets.sys_api import handle_unauthenticated

            return await handle_unauthenticated(self, req)
        if self.barrier.sealed:
            raise Sealed()
        login = self._login_backend(req)
        if login is None and req.path not in wrapping.SELF_AUTHORISED:
            try:
                await self._authorise(req)
            except PermissionDenied:
                # Refusals are audited too (the token HMAC'd): they are what an investigation looks for.
                request_id = str(uuid.uuid4())
                await self._audit("request", req, request_id)
                await self._audit("response", req, request_id, error="permission denied")
                raise
        return await self._audited(req, login)

    def _login_backend(self, req: Request) -> AppRole | None:
        if not req.path.startswith("auth/") or not req.path.endswith("/login"):
            return None
        found = self.auth.resolve(req.path[len("auth/"):])
        if found is None or found[1] != "login":
            return None
        backend = self.auth.backends.get(found[0].path)
        return backend if isinstance(backend, AppRole) else None

    async def _authorise(self, req: Request) -> None:
        entry = await self.tokens.lookup(req.token)
        if entry is None:
            raise PermissionDenied()
        req.entry = entry
        if req.path.startswith("sys/internal/ui/mounts/"):
            return  # any valid token may ask which mount and KV version a path is on (the vault CLI's first call)
        if req.operation == "update":
            req.operation = "update" if await self._exists(req) else "create"
        acl = await self.acl(entry)
        if not acl.allows(req.path, req.operation):
            raise PermissionDenied()
        if req.path.startswith(SUDO_PATHS) and not acl.allows(req.path, "sudo"):
            raise PermissionDenied()
        if not await self.tokens.use(entry):
            raise PermissionDenied()

    async def _exists(self, req: Request) -> bool:
        """Vault's existence check, which makes a write `create` or `update` for the policy check."""
        found = self.mounts.resolve(req.path)
        if found is None:
            return True
        backend = self.mounts.backends.get(found[0].path)
        return backend is None or isinstance(backend, AppRole) or await backend.exists(found[1])

    async def acl(self, entry: TokenEntry) -> ACL:
        if entry.root:
            return ACL([], root=True)
        policies = [p for p in [await self.policy(name) for name in entry.policies] if p is not None]
        return ACL(policies)

    async def policy(self, name: str) -> Policy | None:
        if name in self.policy_cache:
            return self.policy_cache[name]
        doc = await self.barrier.get_json(f"policy/{name}") if name != "root" else None
        policy = None if doc is None else parse_policy(name, doc["text"])
        if policy is not None:
            self.policy_cache[name] = policy
        return policy

    async def _audited(self, req: Request, login: AppRole | None) -> dict[str, Any] | None:
        request_id = str(uuid.uuid4())
        await self._audit("request", req, request_id)
        try:
            response = await self._dispatch(req, login)
        except ShipyardError as exc:
            await self._audit("response", req, request_id, error=exc.message or str(exc.status))
            raise
        if response is not None and req.wrap_ttl:
            response = await wrapping.wrap(self, req, response, req.wrap_ttl)
        if response is not None:
            response["request_id"] = request_id
        await self._audit("response", req, request_id, response)
        return response

    async def _dispatch(self, req: Request, login: AppRole | None) -> dict[str, Any] | None:
        from shipyard.secrets import sys_api, token_api

        if login is not None:
            return await token_api.approle_login(self, login, req)
        if req.path.startswith("sys/wrapping/"):
            return await wrapping.handle(self, req)
        if req.path.startswith("sys/"):
            return await sys_api.handle(self, req)
        if req.path.startswith("auth/token/"):
            return await token_api.handle(self, req)
        if req.path.startswith("auth/"):
            found = self.auth.resolve(req.path[len("auth/"):])
            backend = None if found is None else self.auth.backends.get(found[0].path)
            if found is None or backend is None or isinstance(backend, AppRole) is False:
                raise _no_route(req.path)
            assert isinstance(backend, AppRole)
            return await backend.handle(req, found[1])
        found = self.mounts.resolve(req.path)
        if found is None:  # mounted by another server a moment ago? (their watch reloads us too, a bit later)
            await self.mounts.load()
            found = self.mounts.resolve(req.path)
        engine = None if found is None else self.mounts.backends.get(found[0].path)
        if found is None or engine is None or isinstance(engine, AppRole):
            raise _no_route(req.path)
        return await engine.handle(req, found[1])

    # --- audit ----------------------------------------------------------------------------------------------
    async def _load_audit(self) -> None:
        self.audit_devices = {}
        for path, conf in (await self.barrier.get_json("core/audit") or {}).items():
            try:
                self.audit_devices[path] = audit_mod.file_device(path, conf["options"],
                                                                 base64.b64decode(conf["salt"]))
            except ShipyardError:
                continue  # a device whose file went away: the others keep logging

    async def _audit(self, kind: str, req: Request, request_id: str, response: dict[str, Any] | None = None,
                     error: str = "") -> None:
        if not self.audit_devices:
            return
        entry = req.entry
        auth = None if entry is None else {"client_token": req.token, "accessor": entry.accessor,
                                           "policies": entry.policies, "token_policies": entry.policies,
                                           "display_name": entry.display_name, "metadata": entry.meta}
        request = {"id": request_id, "operation": req.operation, "path": req.path, "data": req.data or None,
                   "remote_address": req.remote_address, "client_token": req.token}
        for device in list(self.audit_devices.values()):
            await device.write(audit_mod.entry(kind, device, auth, request, response, error))

    async def enable_audit(self, path: str, data: dict[str, Any]) -> None:
        path = path.strip("/") + "/"
        if data.get("type") != "file":
            raise BadRequest("unknown audit backend type: only `file` is supported")
        salt = os.urandom(32)
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise BadRequest("options must be a map")
        if path in self.audit_devices:
            raise BadRequest(f"path already in use: {path}")
        self.audit_devices[path] = audit_mod.file_device(path, options, salt)
        stored = await self.barrier.get_json("core/audit") or {}
        stored[path] = {"type": "file", "description": str(data.get("description") or ""),
                        "options": {str(k): str(v) for k, v in options.items()},
                        "salt": base64.b64encode(salt).decode()}
        await self.barrier.put_json("core/audit", stored)

    async def disable_audit(self, path: str) -> None:
        path = path.strip("/") + "/"
        self.audit_devices.pop(path, None)
        stored = await self.barrier.get_json("core/audit") or {}
        stored.pop(path, None)
        await self.barrier.put_json("core/audit", stored)


def _combine(keys: list[bytes]) -> bytes:
    from shipyard.secrets.shamir import combine

    return combine(keys)


def _flag(query: dict[str, str], name: str) -> bool:
    """A boolean query parameter as Vault reads it: present and empty, or a true value."""
    return name in query and query[name].strip().lower() in ("", "1", "t", "true", "yes")


def _code(query: dict[str, str], name: str, default: int) -> int:
    try:
        return int(query.get(name, default))
    except ValueError:
        return default


def _no_route(path: str) -> ShipyardError:
    return Missing(data_response(None) | {"errors": [f'no handler for route "{path}". route entry not found.']})
