"""sys/leases for what has leases here: the tokens auth methods issue (AppRole logins, child tokens), each a lease
`<issuing path>/<accessor>` (e.g. auth/approle/login/<accessor>); KV and transit issue none, as in Vault.

Handlers for an already authorised request; a lease ID names a token by its accessor, never by the token itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest
from shipyard.secrets.request import Missing, Request, UnsupportedOperation, data_response
from shipyard.secrets.tokens import TokenEntry, parse_duration

if TYPE_CHECKING:
    from shipyard.secrets.core import VaultCore

_WRITE = ("create", "update")


def lease_id(entry: TokenEntry) -> str:
    return f"{entry.path}/{entry.accessor}"


async def _all_tokens(core: VaultCore) -> list[TokenEntry]:
    entries = []
    for token_hash in await core.barrier.list("token/id/"):
        entry = await core.tokens.by_hash(token_hash)
        if entry is not None and not entry.root:
            entries.append(entry)
    return entries


async def _by_lease(core: VaultCore, value: Any) -> TokenEntry:
    if not isinstance(value, str) or "/" not in value:
        raise BadRequest("invalid lease")
    entry = await core.tokens.by_accessor(value.rsplit("/", 1)[1])
    if entry is None or lease_id(entry) != value:
        raise BadRequest("invalid lease")
    return entry


def _describe(entry: TokenEntry) -> dict[str, Any]:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.creation_time))
    expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.expire_time)) if entry.expire_time else None
    return {"id": lease_id(entry), "issue_time": stamp, "expire_time": expire, "last_renewal": None,
            "renewable": entry.renewable, "ttl": entry.ttl(now)}


async def handle(core: VaultCore, req: Request, path: str) -> dict[str, Any] | None:
    if path.startswith("lookup/") and req.operation in ("list", "read"):
        prefix = path[len("lookup/"):].rstrip("/") + "/"
        keys = sorted({lease_id(e)[len(prefix):].split("/")[0] + ("/" if "/" in lease_id(e)[len(prefix):] else "")
                       for e in await _all_tokens(core) if lease_id(e).startswith(prefix)})
        if not keys:
            raise Missing()
        return data_response({"keys": keys})
    if req.operation not in _WRITE:
        raise UnsupportedOperation()
    if path.startswith(("revoke-prefix/", "revoke-force/")):
        prefix = path.split("/", 1)[1].rstrip("/") + "/"
        for entry in await _all_tokens(core):
            if lease_id(entry).startswith(prefix):
                await core.tokens.revoke_tree(entry)
        return None
    entry = await _by_lease(core, req.data.get("lease_id"))
    if path == "lookup":
        return data_response(_describe(entry))
    if path == "renew":
        renewed = await core.tokens.renew(entry, parse_duration(req.data.get("increment"), "increment"))
        return data_response(None, lease_id=lease_id(renewed), renewable=renewed.renewable,
                             lease_duration=renewed.ttl(time.time()))
    if path == "revoke":
        await core.tokens.revoke_tree(entry)
        return None
    raise Missing()
