"""The KV secrets engine, version 1 (one value per path) and version 2 (versions, cas, soft delete, metadata).

It reads and writes only its mount's barrier view; it never sees tokens or policies (the core checks those).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shipyard.errors import BadRequest, Conflict
from shipyard.secrets.barrier import View
from shipyard.secrets.request import Missing, Request, UnsupportedOperation, as_int, data_response
from shipyard.secrets.tokens import DEFAULT_TTL, parse_duration

_NO_TIME = ""
WRITE_ATTEMPTS = 20


def _now_iso(epoch: float | None = None) -> str:
    moment = time.time() if epoch is None else epoch
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1e6):06d}Z"


def _epoch(iso: str) -> float:
    if not iso:
        return 0.0
    head, _, frac = iso.rstrip("Z").partition(".")
    return time.mktime(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) - time.timezone + float("0." + (frac or "0"))


def _folder(path: str) -> str:
    """LIST of "app" lists the folder "app/", as Vault does."""
    return path if not path or path.endswith("/") else path + "/"


def _secret_data(req: Request) -> dict[str, Any]:
    if not isinstance(req.data, dict):
        raise BadRequest("the request body must be a JSON object")
    return req.data


class KVv1:
    def __init__(self, view: View) -> None:
        self.view = view

    async def exists(self, path: str) -> bool:
        return await self.view.get_json("data/" + path) is not None

    async def handle(self, req: Request, path: str) -> dict[str, Any] | None:
        if req.operation == "list" or (req.operation == "read" and (path == "" or path.endswith("/"))):
            keys = await self.view.list("data/" + _folder(path))
            if not keys:
                raise Missing()
            return data_response({"keys": keys})
        if not path:
            raise UnsupportedOperation()
        if req.operation == "read":
            doc = await self.view.get_json("data/" + path)
            if doc is None:
                raise Missing()
            return data_response(doc, lease_duration=DEFAULT_TTL)
        if req.operation in ("create", "update"):
            await self.view.put_json("data/" + path, _secret_data(req))
            return None
        if req.operation == "delete":
            await self.view.delete("data/" + path)
            return None
        raise UnsupportedOperation()


class KVv2:
    """Storage: config, meta/<path> (versions and settings), ver/<path>/<n> (one version's data)."""

    def __init__(self, view: View) -> None:
        self.view = view

    async def exists(self, path: str) -> bool:
        kind, _, rest = path.partition("/")
        if kind == "data":
            return await self.view.get_json("meta/" + rest) is not None
        return kind in ("config", "metadata") and (kind == "config" or await self.view.get_json("meta/" + rest)
                                                   is not None)

    async def config(self) -> dict[str, Any]:
        return await self.view.get_json("config") or {"max_versions": 0, "cas_required": False,
                                                       "delete_version_after": 0}

    async def handle(self, req: Request, path: str) -> dict[str, Any] | None:
        kind, _, rest = path.partition("/")
        handler = {"data": self._data, "metadata": self._metadata, "delete": self._delete_versions,
                   "undelete": self._undelete, "destroy": self._destroy}.get(kind)
        if kind == "config" and not rest:
            return await self._config(req)
        if handler is None or (not rest and kind != "metadata"):
            raise Missing()
        return await handler(req, rest)

    async def _config(self, req: Request) -> dict[str, Any] | None:
        if req.operation == "read":
            return data_response(await self.config())
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        config = await self.config()
        if "max_versions" in req.data:
            config["max_versions"] = as_int(req.data["max_versions"], "max_versions")
        if "cas_required" in req.data:
            config["cas_required"] = bool(req.data["cas_required"])
        if "delete_version_after" in req.data:
            config["delete_version_after"] = parse_duration(req.data["delete_version_after"], "delete_version_after")
        await self.view.put_json("config", config)
        return None

    async def _meta(self, path: str) -> dict[str, Any] | None:
        return await self.view.get_json("meta/" + path)

    @staticmethod
    def _version_meta(meta: dict[str, Any], number: int) -> dict[str, Any]:
        version = meta["versions"][str(number)]
        deletion = version["deletion_time"]
        return {"created_time": version["created_time"], "custom_metadata": meta.get("custom_metadata"),
                "deletion_time": deletion, "destroyed": version["destroyed"], "version": number}

    @staticmethod
    def _deleted(version: dict[str, Any]) -> bool:
        deletion = version["deletion_time"]
        return bool(deletion) and _epoch(deletion) <= time.time()

    async def _data(self, req: Request, path: str) -> dict[str, Any] | None:
        if req.operation == "read":
            return await self._read(req, path)
        if req.operation in ("create", "update", "patch"):
            return await self._write(req, path)
        if req.operation == "delete":
            await self._change_meta(path, lambda meta: self._mark_deleted([meta["current_version"]])(meta))
            return None
        raise UnsupportedOperation()

    async def _read(self, req: Request, path: str) -> dict[str, Any]:
        meta = await self._meta(path)
        if meta is None or not meta["current_version"]:
            raise Missing()
        number = as_int(req.data.get("version"), "version") or meta["current_version"]
        version = meta["versions"].get(str(number))
        if version is None:
            raise Missing()
        info = self._version_meta(meta, number)
        if version["destroyed"] or self._deleted(version):
            raise Missing(data_response({"data": None, "metadata": info}))
        doc = await self.view.get_json(f"ver/{path}/{number}")
        return data_response({"data": doc, "metadata": info})

    async def _write(self, req: Request, path: str) -> dict[str, Any]:
        """A new version; concurrent writers of one path each get their own version (or a cas refusal), never the
        same number: the write commits only if the metadata is still the one it read, else it reads again."""
        for _ in range(WRITE_ATTEMPTS):
            written = await self._write_once(req, path)
            if written is not None:
                return written
        raise Conflict(f"too many concurrent writes to {path}; try again")

    async def _write_once(self, req: Request, path: str) -> dict[str, Any] | None:
        body = _secret_data(req)
        data = body.get("data")
        if not isinstance(data, dict):
            raise BadRequest("no data provided")
        options = body.get("options") or {}
        meta, revision = await self.view.get_json_versioned("meta/" + path)
        config = await self.config()
        if req.operation == "patch":
            if meta is None or not meta["current_version"]:
                raise Missing()
            current = meta["versions"][str(meta["current_version"])]
            if current["destroyed"] or self._deleted(current):
                raise Missing()
            old = await self.view.get_json(f"ver/{path}/{meta['current_version']}") or {}
            data = _merge_patch(old, data)
        meta = meta or {"versions": {}, "current_version": 0, "oldest_version": 0, "max_versions": 0,
                        "cas_required": False, "delete_version_after": 0, "custom_metadata": None,
                        "created_time": _now_iso()}
        self._check_cas(meta, config, options)
        return await self._store_version(path, meta, config, data, revision)

    @staticmethod
    def _check_cas(meta: dict[str, Any], config: dict[str, Any], options: dict[str, Any]) -> None:
        cas = options.get("cas") if isinstance(options, dict) else None
        if cas is None:
            if meta["cas_required"] or config["cas_required"]:
                raise BadRequest("check-and-set parameter required for this call")
            return
        if as_int(cas, "cas") != meta["current_version"]:
            raise BadRequest("check-and-set parameter did not match the current version")

    async def _store_version(self, path: str, meta: dict[str, Any], config: dict[str, Any],
                             data: dict[str, Any], revision: int) -> dict[str, Any] | None:
        now = time.time()
        number = meta["current_version"] + 1
        after = meta["delete_version_after"] or config["delete_version_after"]
        meta["versions"][str(number)] = {"created_time": _now_iso(now), "destroyed": False,
                                         "deletion_time": _now_iso(now + after) if after else _NO_TIME}
        meta["current_version"], meta["updated_time"] = number, _now_iso(now)
        meta["oldest_version"] = meta["oldest_version"] or number
        limit = meta["max_versions"] or config["max_versions"] or 10
        dropped = sorted(int(n) for n in meta["versions"])[:-limit]
        for old in dropped:
            del meta["versions"][str(old)]
        meta["oldest_version"] = min(int(n) for n in meta["versions"])
        # The version, its metadata and the versions it pushes out: one transaction, one durable commit.
        if not await self.view.put_json_many({f"ver/{path}/{number}": data, "meta/" + path: meta},
                                             [f"ver/{path}/{old}" for old in dropped], {"meta/" + path: revision}):
            return None  # another write got in first: read again
        return data_response(self._version_meta(meta, number))

    def _versions(self, req: Request) -> list[int]:
        versions = req.data.get("versions")
        if not isinstance(versions, list) or not versions:
            raise BadRequest("no version number provided")
        return [as_int(v, "versions") for v in versions]

    async def _change_meta(self, path: str, change: Callable[[dict[str, Any]], list[str]]) -> None:
        """Applies `change` to the path's metadata (it returns the version entries to drop) as a compare-and-swap,
        as _write does: a delete, undelete or destroy racing another write of the same metadata reads it again
        instead of writing back a copy that loses the other's change."""
        for _ in range(WRITE_ATTEMPTS):
            meta, revision = await self.view.get_json_versioned("meta/" + path)
            if meta is None:
                return
            drops = change(meta)
            if await self.view.put_json_many({"meta/" + path: meta}, drops, {"meta/" + path: revision}):
                return
        raise Conflict(f"too many concurrent writes to {path}; try again")

    def _mark_deleted(self, numbers: list[int]) -> Callable[[dict[str, Any]], list[str]]:
        def change(meta: dict[str, Any]) -> list[str]:
            for number in numbers:
                version = meta["versions"].get(str(number))
                if version is not None and not self._deleted(version):
                    version["deletion_time"] = _now_iso()
            return []
        return change

    async def _delete_versions(self, req: Request, path: str) -> None:
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        await self._change_meta(path, self._mark_deleted(self._versions(req)))

    async def _undelete(self, req: Request, path: str) -> None:
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        numbers = self._versions(req)

        def change(meta: dict[str, Any]) -> list[str]:
            for number in numbers:
                version = meta["versions"].get(str(number))
                if version is not None and not version["destroyed"]:
                    version["deletion_time"] = _NO_TIME
            return []
        await self._change_meta(path, change)

    async def _destroy(self, req: Request, path: str) -> None:
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        numbers = self._versions(req)

        def change(meta: dict[str, Any]) -> list[str]:
            drops = []
            for number in numbers:
                version = meta["versions"].get(str(number))
                if version is not None:
                    version["destroyed"] = True
                    drops.append(f"ver/{path}/{number}")
            return drops
        await self._change_meta(path, change)

    async def _metadata(self, req: Request, path: str) -> dict[str, Any] | None:
        if req.operation == "list" or (req.operation == "read" and (not path or path.endswith("/"))):
            keys = await self.view.list("meta/" + _folder(path))
            if not keys:
                raise Missing()
            return data_response({"keys": keys})
        meta = await self._meta(path)
        if req.operation == "read":
            if meta is None:
                raise Missing()
            return data_response(self._metadata_body(meta))
        if req.operation == "delete":
            await self.view.delete(f"ver/{path}/", prefix=True)
            await self.view.delete("meta/" + path)
            return None
        if req.operation in ("create", "update", "patch"):
            await self._update_metadata(req, path)
            return None
        raise UnsupportedOperation()

    async def _update_metadata(self, req: Request, path: str) -> None:
        body = _secret_data(req)
        for _ in range(WRITE_ATTEMPTS):  # compare-and-swap, as _change_meta (the metadata may not exist yet)
            meta, revision = await self.view.get_json_versioned("meta/" + path)
            meta = meta or {"versions": {}, "current_version": 0, "oldest_version": 0, "max_versions": 0,
                            "cas_required": False, "delete_version_after": 0, "custom_metadata": None,
                            "created_time": _now_iso()}
            self._apply_metadata(meta, body)
            if await self.view.put_json_many({"meta/" + path: meta}, [], {"meta/" + path: revision}):
                return
        raise Conflict(f"too many concurrent writes to {path}; try again")

    @staticmethod
    def _apply_metadata(meta: dict[str, Any], body: dict[str, Any]) -> None:
        if "max_versions" in body:
            meta["max_versions"] = as_int(body["max_versions"], "max_versions")
        if "cas_required" in body:
            meta["cas_required"] = bool(body["cas_required"])
        if "delete_version_after" in body:
            meta["delete_version_after"] = parse_duration(body["delete_version_after"], "delete_version_after")
        if "custom_metadata" in body:
            custom = body["custom_metadata"]
            if custom is not None and not (isinstance(custom, dict) and all(isinstance(v, str)
                                                                            for v in custom.values())):
                raise BadRequest("custom_metadata must be a map of strings")
            meta["custom_metadata"] = custom
        meta["updated_time"] = _now_iso()

    @staticmethod
    def _metadata_body(meta: dict[str, Any]) -> dict[str, Any]:
        after = meta["delete_version_after"]
        return {"cas_required": meta["cas_required"], "created_time": meta["created_time"],
                "current_version": meta["current_version"], "custom_metadata": meta.get("custom_metadata"),
                "delete_version_after": f"{after}s" if after else "0s", "max_versions": meta["max_versions"],
                "oldest_version": meta["oldest_version"], "updated_time": meta.get("updated_time", ""),
                "versions": meta["versions"]}


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, which KV v2's PATCH applies."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge_patch(result[key], value)
        else:
            result[key] = value
    return result
