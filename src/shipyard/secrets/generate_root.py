"""Vault's sys/generate-root with a one-time pad: a new root token from the current key shares (for when every
root token was revoked), returned only XOR'd with the OTP so that the shares' holders never see it in clear.

Handlers for the unauthenticated generate-root paths; PGP-encrypted tokens are not supported.
"""

from __future__ import annotations

import base64
import secrets as _random
import string
from typing import TYPE_CHECKING, Any

from shipyard.errors import BadRequest
from shipyard.secrets import shamir
from shipyard.secrets.barrier import Sealed
from shipyard.secrets.request import Request, UnsupportedOperation
from shipyard.secrets.tokens import TokenRequest

if TYPE_CHECKING:
    from shipyard.secrets.core import VaultCore

OTP_LENGTH = 28  # the length of a token ("hvs." + 24), as Vault's OTPs for its tokens
_ALPHABET = string.ascii_letters + string.digits


class RootGeneration:
    def __init__(self, otp: str) -> None:
        self.nonce = base64.urlsafe_b64encode(_random.token_bytes(12)).decode()
        self.otp = otp
        self.submitted: list[bytes] = []


def _status(core: VaultCore, attempt: RootGeneration | None, required: int) -> dict[str, Any]:
    return {"started": attempt is not None, "nonce": attempt.nonce if attempt else "",
            "progress": len(attempt.submitted) if attempt else 0, "required": required, "complete": False,
            "encoded_token": "", "encoded_root_token": "", "pgp_fingerprint": "", "otp": "",
            "otp_length": OTP_LENGTH}


async def handle(core: VaultCore, req: Request) -> dict[str, Any] | None:
    if core.barrier.sealed:
        raise Sealed()
    config = await core.barrier.seal_config() or {}
    required = int(config.get("secret_threshold", 1))
    attempt: RootGeneration | None = getattr(core, "root_generation", None)
    if req.path == "sys/generate-root/attempt":
        if req.operation == "read":
            return _status(core, attempt, required)
        if req.operation == "delete":
            core.root_generation = None
            return None
        if req.data.get("pgp_key"):
            raise BadRequest("pgp_key is not supported: use the one-time pad (otp)")
        if attempt is not None:
            raise BadRequest("root generation already in progress")
        otp = str(req.data.get("otp") or "".join(_random.choice(_ALPHABET) for _ in range(OTP_LENGTH)))
        if len(otp) != OTP_LENGTH:
            raise BadRequest(f"otp must be {OTP_LENGTH} characters")
        core.root_generation = attempt = RootGeneration(otp)
        return {**_status(core, attempt, required), "otp": otp}
    if req.operation not in ("create", "update"):
        raise UnsupportedOperation()
    return await _update(core, req, attempt, required)


async def _update(core: VaultCore, req: Request, attempt: RootGeneration | None, required: int) -> dict[str, Any]:
    from shipyard.secrets.core import decode_key

    if attempt is None:
        raise BadRequest("no root generation in progress")
    if str(req.data.get("nonce") or "") != attempt.nonce:
        raise BadRequest("incorrect nonce")
    share = decode_key(req.data.get("key"))
    if share not in attempt.submitted:
        attempt.submitted.append(share)
    if len(attempt.submitted) < required:
        return _status(core, attempt, required)
    submitted, attempt.submitted = attempt.submitted, []
    try:
        rebuilt = submitted[0] if len(submitted) == 1 else shamir.combine(submitted)
    except BadRequest:
        rebuilt = b""
    ring = core.barrier.keyring
    if ring is None or rebuilt != ring.root_key:
        raise BadRequest("failed to generate root: the key shares do not rebuild the root key; progress reset")
    token, _ = await core.tokens.create(TokenRequest(policies=["root"], path="auth/token/root",
                                                     display_name="root"), None)
    core.root_generation = None
    encoded = base64.b64encode(bytes(a ^ b for a, b in zip(token.encode(), attempt.otp.encode(), strict=True)))
    text = encoded.decode().rstrip("=")
    return {**_status(core, None, required), "nonce": attempt.nonce, "complete": True, "encoded_token": text,
            "encoded_root_token": text}
