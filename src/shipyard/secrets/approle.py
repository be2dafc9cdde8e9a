"""The AppRole auth method: roles with a role_id and issued secret_ids, logged in to get a token.

Secret IDs are stored only as hashes; this module never returns a stored secret_id after it issued it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from shipyard.errors import BadRequest
from shipyard.secrets.barrier import View
from shipyard.secrets.request import Missing, Request, UnsupportedOperation, as_int, data_response
from shipyard.secrets.tokens import TokenRequest, parse_duration

_ROLE_FIELDS = ("token_ttl", "token_max_ttl", "token_period", "secret_id_ttl", "secret_id_num_uses",
                "token_num_uses")


def _hash(value: str) -> str:
    return hashlib.sha256(b"shipyard-approle:" + value.encode()).hexdigest()


def _policies(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return [str(p) for p in value]
    return []


class AppRole:
    """Storage: role/<name>, role-id/<role_id> -> name, secret/<name>/<hash>, secret-accessor/<name>/<accessor>."""

    def __init__(self, view: View, mount: str) -> None:
        self.view = view
        self.mount = mount

    async def handle(self, req: Request, path: str) -> dict[str, Any] | None:
        if path == "role" or path == "role/":
            keys = await self.view.list("role/")
            if not keys:
                raise Missing()
            return data_response({"keys": keys})
        head, _, rest = path.partition("/")
        if head != "role" or not rest:
            raise Missing()
        name, _, action = rest.partition("/")
        if not action:
            return await self._role(req, name)
        role = await self.view.get_json("role/" + name)
        if role is None:
            raise BadRequest(f"role {name} does not exist") if req.operation != "read" else Missing()
        if action == "role-id":
            return await self._role_id(req, name, role)
        if action == "secret-id" and req.operation in ("create", "update"):
            return await self._issue_secret_id(name, role, req.data)
        if action in ("secret-id/lookup", "secret-id/destroy") and req.operation in ("create", "update"):
            return await self._secret_id_op(name, action, req.data)
        raise Missing()

    async def _role(self, req: Request, name: str) -> dict[str, Any] | None:
        role = await self.view.get_json("role/" + name)
        if req.operation == "read":
            if role is None:
                raise Missing()
            return data_response({k: v for k, v in role.items() if k != "role_id"})
        if req.operation == "delete":
            if role is not None:
                await self.view.delete("role-id/" + role["role_id"])
                await self.view.delete(f"secret/{name}/", prefix=True)
                await self.view.delete("role/" + name)
            return None
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        role = role or {"role_id": str(uuid.uuid4()), "bind_secret_id": True, "token_policies": [],
                        **{f: 0 for f in _ROLE_FIELDS}}
        for field in _ROLE_FIELDS:
            if field in req.data:
                role[field] = parse_duration(req.data[field], field)
        if "token_policies" in req.data or "policies" in req.data:
            role["token_policies"] = _policies(req.data.get("token_policies", req.data.get("policies")))
        if "bind_secret_id" in req.data:
            role["bind_secret_id"] = bool(req.data["bind_secret_id"])
        await self.view.put_json("role/" + name, role)
        await self.view.put_json("role-id/" + role["role_id"], {"name": name})
        return None

    async def _role_id(self, req: Request, name: str, role: dict[str, Any]) -> dict[str, Any] | None:
        if req.operation == "read":
            return data_response({"role_id": role["role_id"]})
        if req.operation in ("create", "update") and req.data.get("role_id"):
            await self.view.delete("role-id/" + role["role_id"])
            role["role_id"] = str(req.data["role_id"])
            await self.view.put_json("role/" + name, role)
            await self.view.put_json("role-id/" + role["role_id"], {"name": name})
            return None
        raise UnsupportedOperation()

    async def _issue_secret_id(self, name: str, role: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        secret_id, accessor = str(uuid.uuid4()), str(uuid.uuid4())
        ttl = parse_duration(data.get("ttl"), "ttl") or role["secret_id_ttl"]
        record = {"accessor": accessor, "created": time.time(), "expires": time.time() + ttl if ttl else 0,
                  "num_uses": as_int(data.get("num_uses"), "num_uses") or role["secret_id_num_uses"],
                  "metadata": data.get("metadata") or {}}
        await self.view.put_json(f"secret/{name}/{_hash(secret_id)}", record)
        return data_response({"secret_id": secret_id, "secret_id_accessor": accessor, "secret_id_ttl": ttl,
                              "secret_id_num_uses": record["num_uses"]})

    async def _secret_id_op(self, name: str, action: str, data: dict[str, Any]) -> dict[str, Any] | None:
        key = f"secret/{name}/{_hash(str(data.get('secret_id') or ''))}"
        record = await self.view.get_json(key)
        if action.endswith("destroy"):
            await self.view.delete(key)
            return None
        if record is None:
            raise Missing()
        return data_response({"secret_id_accessor": record["accessor"], "secret_id_num_uses": record["num_uses"],
                              "metadata": record["metadata"]})

    async def login(self, data: dict[str, Any]) -> tuple[str, TokenRequest, dict[str, Any]]:
        """Checks role_id and secret_id; returns the role name, the token to issue, and its metadata."""
        role_id = str(data.get("role_id") or "")
        found = await self.view.get_json("role-id/" + role_id) if role_id and "/" not in role_id else None
        if found is None:
            raise BadRequest("invalid role or secret ID")
        name = found["name"]
        role = await self.view.get_json("role/" + name)
        if role is None:
            raise BadRequest("invalid role or secret ID")
        if role["bind_secret_id"]:
            await self._consume_secret_id(name, str(data.get("secret_id") or ""))
        request = TokenRequest(policies=["default", *role["token_policies"]], ttl=role["token_ttl"],
                               explicit_max_ttl=role["token_max_ttl"], period=role["token_period"],
                               num_uses=role["token_num_uses"], display_name=f"approle-{name}", orphan=True,
                               meta={"role_name": name}, path=f"auth/{self.mount}login")
        return name, request, {"role_name": name}

    async def _consume_secret_id(self, name: str, secret_id: str) -> None:
        """One use of a secret ID, taken in a txn on its record's revision: a single-use ID logs in once, however
        many logins race with it."""
        key = f"secret/{name}/{_hash(secret_id)}"
        for _ in range(50):
            record, revision = await self.view.get_json_versioned(key) if secret_id else (None, 0)
            if record is None or (record["expires"] and record["expires"] < time.time()):
                raise BadRequest("invalid role or secret ID")
            if not record["num_uses"]:
                return
            record["num_uses"] -= 1
            last = record["num_uses"] == 0
            if await self.view.put_json_many({} if last else {key: record}, [key] if last else [], {key: revision}):
                return
        raise BadRequest("invalid role or secret ID")

