"""The basic-auth plugin: HTTP Basic credentials checked against scrypt password hashes (Kong's basic-auth).

Never stores or compares plain passwords; the slow hash runs off the event loop, and a verified pair is remembered
(by a digest, not the password) so a client's next requests cost a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import Plugin, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader
from shipyard.gateway.plugins.key_auth import anonymous_consumer, consumers_of, identify

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_verified: OrderedDict[bytes, bool] = OrderedDict()
VERIFIED_CACHE = 4096


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form: scrypt$N$r$p$salt$hash (base64)."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def is_password_hash(value: str) -> bool:
    return value.startswith("scrypt$") and value.count("$") == 5


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


async def verify_password_cached(password: str, stored: str) -> bool:
    marker = hashlib.sha256(f"{stored}\0{password}".encode()).digest()
    if marker in _verified:
        _verified.move_to_end(marker)
        return True
    ok = await asyncio.to_thread(verify_password, password, stored)
    if ok:
        _verified[marker] = True
        if len(_verified) > VERIFIED_CACHE:
            _verified.popitem(last=False)
    return ok


@register
class BasicAuthPlugin(Plugin):
    name = "basic-auth"
    priority = 1100

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.hide_credentials = r.bool("hide_credentials", False)
        self.anonymous = r.str("anonymous", "")
        self.realm = r.str("realm", "service")
        r.finish()

    def _challenge(self, message: str) -> Reject:
        return Reject(401, message, headers=[("WWW-Authenticate", f'Basic realm="{self.realm}"')])

    async def access(self, ctx: RequestContext) -> Reject | None:
        if ctx.consumer is not None and self.anonymous:
            return None
        header_name = "authorization"
        value = ctx.header("authorization")
        if value is None:
            header_name, value = "proxy-authorization", ctx.header("proxy-authorization")
        scheme, _, encoded = (value or "").strip().partition(" ")
        if value is None or scheme.lower() != "basic":
            return None if anonymous_consumer(ctx, self.anonymous) else self._challenge("Unauthorized")
        try:
            username, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            return None if anonymous_consumer(ctx, self.anonymous) else self._challenge(
                "Invalid authentication credentials")
        index = consumers_of(ctx)
        hit = index.lookup_basic(username) if index is not None else None
        if hit is None or not await verify_password_cached(password, str(hit[1].get("password") or "")):
            return None if anonymous_consumer(ctx, self.anonymous) else self._challenge(
                "Invalid authentication credentials")
        if self.hide_credentials:
            ctx.remove_header(header_name)
        identify(ctx, *hit)
        return None
