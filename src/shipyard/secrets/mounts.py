"""The mount tables: secrets engines under sys/mounts and auth methods under sys/auth, kept in the barrier.

It owns which engine answers which path prefix; it never handles an engine's requests itself.
"""

from __future__ import annotations

import secrets as _random
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from shipyard.errors import BadRequest
from shipyard.secrets.approle import AppRole
from shipyard.secrets.barrier import Barrier, View
from shipyard.secrets.kv import KVv1, KVv2
from shipyard.secrets.tokens import parse_duration
from shipyard.secrets.transit import Transit

RESERVED = ("sys/", "auth/", "cubbyhole/", "identity/")
ENGINE_TYPES = ("kv", "kv-v2", "transit")
AUTH_TYPES = ("approle",)
Engine = KVv1 | KVv2 | Transit


@dataclass
class Mount:
    path: str  # "secret/" (engines) or "approle/" (auth methods, under auth/)
    type: str
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    accessor: str = ""
    description: str = ""
    options: dict[str, str] | None = None
    config: dict[str, Any] = field(default_factory=lambda: {"default_lease_ttl": 0, "max_lease_ttl": 0,
                                                            "force_no_cache": False})
    created: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"accessor": self.accessor, "config": self.config, "description": self.description,
                "external_entropy_access": False, "local": False, "options": self.options, "seal_wrap": False,
                "type": self.type, "uuid": self.uuid, "plugin_version": "", "running_plugin_version": "",
                "running_sha256": ""}


def clean_mount_path(path: str) -> str:
    path = path.strip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")):
        raise BadRequest(f"invalid mount path {path!r}")
    return path + "/"


class MountTable:
    """Secrets engines (`core/mounts`) or auth methods (`core/auth`), each with its storage view."""

    def __init__(self, barrier: Barrier, key: str, auth: bool) -> None:
        self.barrier = barrier
        self.key = key
        self.auth = auth
        self.mounts: dict[str, Mount] = {}
        self.backends: dict[str, Engine | AppRole] = {}

    async def load(self) -> None:
        doc = await self.barrier.get_json(self.key) or {}
        self.mounts = {path: Mount(**entry) for path, entry in doc.items()}
        self.backends = {path: self._backend(mount) for path, mount in self.mounts.items()}

    def _backend(self, mount: Mount) -> Engine | AppRole:
        view = View(self.barrier, ("auth/" if self.auth else "logical/") + mount.uuid + "/")
        if mount.type == "approle":
            return AppRole(view, mount.path)
        if mount.type == "transit":
            return Transit(view)
        return KVv2(view) if (mount.options or {}).get("version") == "2" else KVv1(view)

    async def save(self) -> None:
        await self.barrier.put_json(self.key, {path: asdict(mount) for path, mount in self.mounts.items()})

    def resolve(self, path: str) -> tuple[Mount, str] | None:
        """The mount with the longest prefix of path, and the path inside it."""
        best: Mount | None = None
        for mount_path, mount in self.mounts.items():
            if (path + "/").startswith(mount_path) and (best is None or len(mount_path) > len(best.path)):
                best = mount
        if best is None:
            return None
        return best, path[len(best.path):]

    async def enable(self, path: str, data: dict[str, Any]) -> Mount:
        path = clean_mount_path(path)
        kind = str(data.get("type") or "")
        allowed = AUTH_TYPES if self.auth else ENGINE_TYPES
        if kind not in allowed:
            raise BadRequest(f"plugin not found in the catalog: {kind} (supported: {', '.join(allowed)})")
        if not self.auth and path.startswith(RESERVED):
            raise BadRequest(f"cannot mount under a reserved path: {path}")
        for existing in self.mounts:
            if existing.startswith(path) or path.startswith(existing):
                raise BadRequest(f"path is already in use at {existing}")
        options = {str(k): str(v) for k, v in (data.get("options") or {}).items()} or None
        if kind == "kv-v2":
            kind, options = "kv", {**(options or {}), "version": "2"}
        elif kind == "kv":
            options = {**(options or {}), "version": (options or {}).get("version", "1")}
        mount = Mount(path, kind, description=str(data.get("description") or ""), options=options,
                      accessor=f"{'auth_' if self.auth else ''}{kind}_{_random.token_hex(4)}")
        self._tune(mount, data.get("config") or {})
        self.mounts[path] = mount
        self.backends[path] = self._backend(mount)
        await self.save()
        return mount

    async def disable(self, path: str) -> None:
        path = clean_mount_path(path)
        mount = self.mounts.pop(path, None)
        if mount is None:
            return
        self.backends.pop(path, None)
        await self.save()
        await self.barrier.delete(("auth/" if self.auth else "logical/") + mount.uuid + "/", prefix=True)

    async def tune(self, path: str, data: dict[str, Any]) -> None:
        mount = self.mounts.get(clean_mount_path(path))
        if mount is None:
            raise BadRequest(f"no mount at {path}")
        self._tune(mount, data)
        if "description" in data:
            mount.description = str(data["description"])
        await self.save()

    @staticmethod
    def _tune(mount: Mount, data: dict[str, Any]) -> None:
        for field_name in ("default_lease_ttl", "max_lease_ttl"):
            if field_name in data:
                mount.config[field_name] = parse_duration(data[field_name], field_name)
