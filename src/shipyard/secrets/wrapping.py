"""Response wrapping, as Vault's: a response (any request sent with X-Vault-Wrap-TTL, or sys/wrapping/wrap's data)
kept behind the barrier under a single-use wrapping token, and sys/wrapping/unwrap, lookup and rewrap.

It owns the wrapped responses (barrier `wrapping/<token hash>`) and makes the single use hold under concurrency (the
entry is taken by a compare-and-swap delete, so of two unwraps exactly one gets the response); it never returns a
response to a caller that did not present its wrapping token.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest
from shipyard.secrets.request import PermissionDenied, Request, UnsupportedOperation, data_response
from shipyard.secrets.tokens import MAX_TTL, TokenRequest, hash_token, parse_duration

if TYPE_CHECKING:
    from shipyard.secrets.core import VaultCore

WRAPPING_POLICY = "response-wrapping"  # a wrapping token's only policy: it opens nothing but its own response
# These authorise themselves: the wrapping token is the credential (in X-Vault-Token or in the body).
SELF_AUTHORISED = ("sys/wrapping/unwrap", "sys/wrapping/lookup", "sys/wrapping/rewrap")
INVALID = "wrapping token is not valid or does not exist"


def wrap_ttl(header: str) -> int:
    """X-Vault-Wrap-TTL: seconds or a duration ("60", "5m"); 0 or absent: no wrapping."""
    if not header:
        return 0
    ttl = parse_duration(header, "X-Vault-Wrap-TTL")
    if ttl > MAX_TTL:
        raise BadRequest(f"X-Vault-Wrap-TTL: {ttl}s is longer than the maximum {MAX_TTL}s")
    return ttl


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1e6):06d}Z"


async def wrap(core: VaultCore, req: Request, response: dict[str, Any], ttl: int,
               creation_path: str = "") -> dict[str, Any]:
    """Keeps `response` behind a new wrapping token and answers with its wrap_info instead."""
    path = creation_path or req.path
    now = time.time()
    token, entry = await core.tokens.create(TokenRequest(
        policies=[WRAPPING_POLICY], ttl=ttl, explicit_max_ttl=ttl, renewable=False, orphan=True,
        display_name="response-wrapping", path=path), None)
    stored = {"response": response, "creation_path": path, "creation_time": now, "creation_ttl": ttl}
    await core.barrier.put_json(f"wrapping/{entry.hash}", stored)
    auth = response.get("auth") or {}
    info = {"token": token, "accessor": entry.accessor, "ttl": ttl, "creation_time": _iso(now),
            "creation_path": path, "wrapped_accessor": str(auth.get("accessor") or "")}
    return data_response(None, wrap_info=info)


async def _stored(core: VaultCore, token: str) -> tuple[dict[str, Any], int]:
    """The wrapped entry of `token` and its store revision; a token past its TTL is invalid (and its entry goes)."""
    entry = await core.tokens.lookup(token) if token else None
    if entry is None or entry.policies != [WRAPPING_POLICY]:
        raise BadRequest(INVALID)
    raw, revision = await core.barrier.get_versioned(f"wrapping/{entry.hash}")
    if raw is None:
        raise BadRequest(INVALID)
    stored = dict(json.loads(raw))
    if time.time() > stored["creation_time"] + stored["creation_ttl"]:
        await core.barrier.delete(f"wrapping/{entry.hash}")
        await core.tokens.revoke_tree(entry)
        raise BadRequest(INVALID)
    return stored, revision


async def purge_expired(core: VaultCore, now: float | None = None) -> int:
    """Removes wrapped responses whose TTL ran out and that nobody came for (with their tokens); returns how many."""
    now = time.time() if now is None else now
    purged = 0
    for token_hash in await core.barrier.list("wrapping/"):
        stored = await core.barrier.get_json(f"wrapping/{token_hash}")
        if stored is not None and now > stored["creation_time"] + stored["creation_ttl"]:
            await core.barrier.delete(f"wrapping/{token_hash}")
            entry = await core.tokens.by_hash(token_hash)  # an expired one is reaped on sight; else revoke it here
            if entry is not None:
                await core.tokens.revoke_tree(entry)
            purged += 1
    return purged


async def _take(core: VaultCore, token: str) -> dict[str, Any]:
    """The wrapped entry, removed with its token: a compare-and-swap delete, so only one caller ever gets it."""
    stored, revision = await _stored(core, token)
    key = f"wrapping/{hash_token(token)}"
    if not await core.barrier.put_many([], [key], {key: revision}):
        raise BadRequest(INVALID)  # another unwrap or rewrap took it first
    entry = await core.tokens.lookup(token)
    if entry is not None:
        await core.tokens.revoke_tree(entry)
    return stored


async def _authorise_other(core: VaultCore, req: Request) -> str:
    """The wrapping token to act on: the body's `token` (then the caller's own token must be allowed this path), or
    the caller's token itself."""
    given = req.data.get("token")
    if given is None or given == "":
        return req.token
    if not isinstance(given, str):
        raise BadRequest("token must be a string")
    caller = await core.tokens.lookup(req.token)
    if caller is None or caller.policies == [WRAPPING_POLICY]:
        raise PermissionDenied()
    req.entry = caller
    acl = await core.acl(caller)
    if not acl.allows(req.path, "update") or not await core.tokens.use(caller):
        raise PermissionDenied()
    return given


async def handle(core: VaultCore, req: Request) -> dict[str, Any] | None:
    """sys/wrapping/wrap (an authorised request), unwrap, lookup, rewrap (authorised by the wrapping token)."""
    if req.operation not in ("create", "update"):
        raise UnsupportedOperation()
    if req.path == "sys/wrapping/wrap":
        if not req.wrap_ttl:
            raise BadRequest("sys/wrapping/wrap needs a wrapping TTL (the X-Vault-Wrap-TTL header)")
        ttl, req.wrap_ttl = req.wrap_ttl, 0  # wrapped here, not again by the core
        return await wrap(core, req, data_response(dict(req.data)), ttl)
    if req.path == "sys/wrapping/lookup":
        token = req.data.get("token") if isinstance(req.data.get("token"), str) else ""
        stored, _ = await _stored(core, token or req.token)
        return data_response({"creation_path": stored["creation_path"], "creation_ttl": stored["creation_ttl"],
                              "creation_time": _iso(stored["creation_time"])})
    token = await _authorise_other(core, req)
    stored = await _take(core, token)
    if req.path == "sys/wrapping/unwrap":
        return dict(stored["response"])
    if req.path == "sys/wrapping/rewrap":
        return await wrap(core, req, stored["response"], stored["creation_ttl"], stored["creation_path"])
    raise UnsupportedOperation()
