"""key-auth keys as the store keeps them: an HMAC-SHA256 of the key under this installation's hash key (stored once
at gateway/settings/key-hash), never the key itself; and credentials as the admin API shows them (secrets redacted).

Pure functions: it never does I/O (callers read and create the hash key) and never logs a key or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

HASH_KEY_PATH = "gateway/settings/key-hash"
SETTINGS_PREFIX = "gateway/settings/"
HASH_PREFIX = "hmac-sha256:"
# What the admin API never shows once stored: key-auth's key (only its hash is kept), JWT HS secrets (needed in
# clear to verify, so kept, but not read back), basic-auth password hashes.
REDACTED_FIELDS = {"key-auth": ("key_hash",), "jwt": ("secret",), "basic-auth": ("password",)}


class KeyHasher:
    """key -> "hmac-sha256:<hex>" under one installation's hash key (an empty key in stores that have none yet,
    which hold no hashed keys either)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __call__(self, key: str) -> str:
        return HASH_PREFIX + hmac.new(self._secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def new_hash_key_value() -> bytes:
    return orjson.dumps({"secret": secrets.token_hex(32)})


def hasher_from_value(value: bytes | str | Mapping[str, Any] | None) -> KeyHasher:
    """The hasher for the stored gateway/settings/key-hash value (bytes, text or decoded JSON)."""
    if value is None:
        return KeyHasher(b"")
    try:
        record = value if isinstance(value, Mapping) else orjson.loads(value)
        return KeyHasher(bytes.fromhex(str(record.get("secret", ""))))
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        # A damaged setting must not stop the route table: keys then match nothing (401), never everything.
        return KeyHasher(secrets.token_bytes(32))


def seal_key(record: dict[str, Any], hasher: KeyHasher) -> str | None:
    """Replaces a key-auth record's plain key by its hash; returns the plain key (to show once), or None."""
    key = record.pop("key", None)
    if key is None:
        return None
    record["key_hash"] = hasher(str(key))
    return str(key)


def stored_key_hash(record: Mapping[str, Any], hasher: KeyHasher) -> str | None:
    """The hash a key-auth record is found by: its key_hash, or the hash of a key stored in clear by an older
    version (until the record is written again)."""
    if record.get("key_hash"):
        return str(record["key_hash"])
    if record.get("key"):
        return hasher(str(record["key"]))
    return None


def redacted(kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A credential as the admin API shows it after creation."""
    hidden = REDACTED_FIELDS.get(kind, ())
    out = {k: v for k, v in record.items() if k not in hidden and not (kind == "key-auth" and k == "key")}
    return out
