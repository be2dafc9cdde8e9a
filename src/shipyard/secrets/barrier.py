"""The security barrier: AES-256-GCM over everything the engine stores, a keyring of terms under a root key.

It owns seal state and the /vault/ prefix of the store; it never writes plaintext (beyond the public seal
configuration) to the store and never logs a key, a share or a value.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shipyard.errors import BadRequest, ShipyardError
from shipyard.secrets import shamir
from shipyard.store import Store
from shipyard.store.base import Compare, Delete, Put

PREFIX = "/vault/"
SEAL_CONFIG = PREFIX + "core/seal-config"  # shares and threshold: public, as in Vault
KEYRING = PREFIX + "core/keyring"  # the keyring, encrypted under the root key
DATA = PREFIX + "data/"  # every logical entry, encrypted under a keyring term
_VERSION = 1


class Sealed(ShipyardError):
    status = 503

    def __init__(self) -> None:
        super().__init__("Vault is sealed")


@dataclass
class Keyring:
    """Terms of data keys (the newest encrypts; all decrypt) and the root key that protects them."""

    root_key: bytes
    keys: dict[int, bytes] = field(default_factory=dict)
    install_times: dict[int, float] = field(default_factory=dict)

    @property
    def term(self) -> int:
        return max(self.keys)

    def to_json(self) -> bytes:
        return json.dumps({"keys": {str(t): base64.b64encode(k).decode() for t, k in self.keys.items()},
                           "install_times": {str(t): v for t, v in self.install_times.items()}}).encode()

    @classmethod
    def from_json(cls, root_key: bytes, raw: bytes) -> Keyring:
        doc = json.loads(raw)
        return cls(root_key, {int(t): base64.b64decode(k) for t, k in doc["keys"].items()},
                   {int(t): float(v) for t, v in doc["install_times"].items()})


def seal_bytes(key: bytes, term: int, plaintext: bytes, aad: bytes) -> bytes:
    """term (4 bytes) | version (1) | nonce (12) | ciphertext+tag; the AAD binds it to its storage path."""
    nonce = os.urandom(12)
    header = term.to_bytes(4, "big") + bytes([_VERSION])
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def open_bytes(keys: dict[int, bytes], blob: bytes, aad: bytes) -> bytes:
    term = int.from_bytes(blob[:4], "big")
    key = keys.get(term)
    if key is None or len(blob) < 17 + 16:
        raise ShipyardError(f"no key for term {term} to decrypt an entry", status=500)
    return AESGCM(key).decrypt(blob[5:17], blob[17:], blob[:5] + aad)


class Barrier:
    """Encrypts entries into the store under DATA; knows nothing of what the entries mean."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keyring: Keyring | None = None
        self.unseal_shares: list[bytes] = []
        self.nonce = ""
        self.rekey: dict[str, Any] | None = None  # a rekey in progress: nonce, new shares/threshold, shares given

    @property
    def sealed(self) -> bool:
        return self.keyring is None

    async def seal_config(self) -> dict[str, int] | None:
        kv = await self.store.get(SEAL_CONFIG)
        return None if kv is None else dict(json.loads(kv.value))

    async def initialize(self, shares: int, threshold: int) -> list[bytes]:
        """A new root key and keyring; returns the key shares (the root key itself when shares == 1)."""
        if await self.seal_config() is not None:
            raise BadRequest("Vault is already initialized")
        if shares < 1 or threshold < 1 or threshold > shares or (shares > 1 and threshold < 2):
            raise BadRequest("invalid seal configuration: threshold must be 1..shares (and at least 2 when "
                             "shares > 1)")
        root_key = os.urandom(32)
        keyring = Keyring(root_key, {1: os.urandom(32)}, {1: time.time()})
        parts = [root_key] if shares == 1 else shamir.split(root_key, shares, threshold)
        # The keyring and the config that says "initialised" in one txn, only if no other server initialised first.
        config = json.dumps({"secret_shares": shares, "secret_threshold": threshold, "type": "shamir"}).encode()
        sealed_ring = seal_bytes(keyring.root_key, 0, keyring.to_json(), KEYRING.encode())
        done = await self.store.txn([Compare(SEAL_CONFIG, "version", "=", 0)],
                                    [Put(KEYRING, sealed_ring), Put(SEAL_CONFIG, config)])
        if not done.succeeded:
            raise BadRequest("Vault is already initialized")
        return parts

    async def _store_keyring(self, keyring: Keyring) -> None:
        await self.store.put(KEYRING, seal_bytes(keyring.root_key, 0, keyring.to_json(), KEYRING.encode()))

    async def submit_share(self, share: bytes) -> bool:
        """Adds one unseal share; unseals when the threshold is reached. Wrong shares reset the progress."""
        config = await self.seal_config()
        if config is None:
            raise BadRequest("Vault is not initialized")
        if self.keyring is not None:
            return True
        if share in self.unseal_shares:
            return False  # Vault ignores a share it already has
        if not self.unseal_shares:
            self.nonce = base64.urlsafe_b64encode(os.urandom(12)).decode()
        self.unseal_shares.append(share)
        if len(self.unseal_shares) < config["secret_threshold"]:
            return False
        shares, self.unseal_shares, self.nonce = self.unseal_shares, [], ""
        try:
            root_key = shares[0] if len(shares) == 1 else shamir.combine(shares)
            await self.unseal_with(root_key)
        except (BadRequest, InvalidTag, ValueError):
            raise BadRequest("failed to unseal: the key shares do not decrypt the keyring (wrong or mixed "
                             "shares); progress reset") from None
        return True

    async def unseal_with(self, root_key: bytes) -> None:
        kv = await self.store.get(KEYRING)
        if kv is None:
            raise BadRequest("Vault is not initialized")
        raw = open_bytes({0: root_key}, kv.value, KEYRING.encode()) if len(root_key) == 32 else b""
        if not raw:
            raise BadRequest("invalid key length")
        self.keyring = Keyring.from_json(root_key, raw)

    def rekey_status(self) -> dict[str, Any]:
        pending = self.rekey
        return {"started": pending is not None, "nonce": pending["nonce"] if pending else "",
                "t": pending["threshold"] if pending else 0, "n": pending["shares"] if pending else 0,
                "progress": len(pending["submitted"]) if pending else 0, "required": 0,
                "pgp_fingerprints": None, "backup": False, "verification_required": False}

    async def rekey_init(self, shares: int, threshold: int) -> dict[str, Any]:
        """Starts replacing the key shares (a new root key; the keyring and the data stay): Vault's sys/rekey."""
        self._ring()
        if self.rekey is not None:
            raise BadRequest("rekey already in progress")
        if shares < 1 or threshold < 1 or threshold > shares or (shares > 1 and threshold < 2) or shares > 255:
            raise BadRequest("invalid seal configuration: threshold must be 1..shares (and at least 2 when "
                             "shares > 1), shares at most 255")
        self.rekey = {"nonce": base64.urlsafe_b64encode(os.urandom(12)).decode(), "shares": shares,
                      "threshold": threshold, "submitted": []}
        return await self.rekey_view()

    async def rekey_view(self) -> dict[str, Any]:
        config = await self.seal_config() or {}
        return {**self.rekey_status(), "required": config.get("secret_threshold", 0)}

    async def rekey_update(self, share: bytes, nonce: str) -> dict[str, Any]:
        """One current share; at the current threshold, a new root key re-wraps the keyring and new shares are
        returned (once). Shares that do not rebuild the current root key cancel nothing but are refused."""
        ring = self._ring()
        pending = self.rekey
        if pending is None:
            raise BadRequest("no rekey in progress")
        if nonce != pending["nonce"]:
            raise BadRequest("incorrect nonce")
        if share not in pending["submitted"]:
            pending["submitted"].append(share)
        config = await self.seal_config() or {}
        if len(pending["submitted"]) < config.get("secret_threshold", 1):
            return await self.rekey_view()
        submitted, pending["submitted"] = pending["submitted"], []
        try:
            rebuilt = submitted[0] if len(submitted) == 1 else shamir.combine(submitted)
        except BadRequest:
            rebuilt = b""
        if rebuilt != ring.root_key:
            raise BadRequest("failed to rekey: the key shares do not rebuild the current root key; progress reset")
        return await self._finish_rekey(ring, pending)

    async def _finish_rekey(self, ring: Keyring, pending: dict[str, Any]) -> dict[str, Any]:
        root_key = os.urandom(32)
        shares, threshold = pending["shares"], pending["threshold"]
        parts = [root_key] if shares == 1 else shamir.split(root_key, shares, threshold)
        config = json.dumps({"secret_shares": shares, "secret_threshold": threshold, "type": "shamir"}).encode()
        wrapped = seal_bytes(root_key, 0, Keyring(root_key, ring.keys, ring.install_times).to_json(), KEYRING.encode())
        await self.store.txn([], [Put(KEYRING, wrapped), Put(SEAL_CONFIG, config)])
        self.keyring = Keyring(root_key, ring.keys, ring.install_times)
        self.rekey = None
        return {"complete": True, "nonce": pending["nonce"], "keys": [p.hex() for p in parts],
                "keys_base64": [base64.b64encode(p).decode() for p in parts], "backup": False,
                "verification_required": False}

    async def reload_keyring(self) -> None:
        """Another server sharing the store may have rotated: re-read the keyring under the root key we hold. After
        another server's rekey (a new root key) we cannot, and keep the terms we have until unsealed again."""
        if self.keyring is not None:
            with contextlib.suppress(InvalidTag, BadRequest):
                await self.unseal_with(self.keyring.root_key)

    def reset_progress(self) -> None:
        self.unseal_shares, self.nonce = [], ""

    def seal(self) -> None:
        self.keyring = None
        self.rekey = None
        self.reset_progress()

    def _ring(self) -> Keyring:
        if self.keyring is None:
            raise Sealed()
        return self.keyring

    async def rotate(self) -> int:
        ring = self._ring()
        term = ring.term + 1
        ring.keys[term] = os.urandom(32)
        ring.install_times[term] = time.time()
        await self._store_keyring(ring)
        return term

    # Logical storage: paths are relative ("core/mounts", "logical/<uuid>/x"); the AAD is the full store key.
    async def get(self, path: str) -> bytes | None:
        ring = self._ring()
        key = DATA + path
        kv = await self.store.get(key)
        if kv is None:
            return None
        if int.from_bytes(kv.value[:4], "big") not in ring.keys:
            await self.reload_keyring()  # written under a term another server added (rotation) since we read it
            ring = self._ring()
        return open_bytes(ring.keys, kv.value, key.encode())

    async def put(self, path: str, value: bytes) -> None:
        ring = self._ring()
        key = DATA + path
        await self.store.put(key, seal_bytes(ring.keys[ring.term], ring.term, value, key.encode()))

    async def get_versioned(self, path: str) -> tuple[bytes | None, int]:
        """The entry and its store mod_revision (0 when absent), for a write that must not race another."""
        ring = self._ring()
        key = DATA + path
        kv = await self.store.get(key)
        if kv is None:
            return None, 0
        if int.from_bytes(kv.value[:4], "big") not in ring.keys:
            await self.reload_keyring()
            ring = self._ring()
        return open_bytes(ring.keys, kv.value, key.encode()), kv.mod_revision

    async def put_many(self, entries: list[tuple[str, bytes]], deletes: Sequence[str] = (),
                       unchanged: dict[str, int] | None = None) -> bool:
        """Several entries (and deletions) in one store transaction: all or none, one durable commit. With
        `unchanged` ({path: mod_revision read}), nothing is written (False) if another write came in between."""
        ring = self._ring()
        compares = [Compare(DATA + path, "mod", "=", revision) for path, revision in (unchanged or {}).items()]
        ops: list[Put | Delete] = []
        for path, value in entries:
            key = DATA + path
            ops.append(Put(key, seal_bytes(ring.keys[ring.term], ring.term, value, key.encode())))
        ops += [Delete(DATA + path) for path in deletes]
        return (await self.store.txn(compares, ops)).succeeded

    async def delete(self, path: str, *, prefix: bool = False) -> None:
        self._ring()
        await self.store.delete(DATA + path, prefix=prefix)

    async def list(self, prefix: str) -> list[str]:
        """The immediate children under prefix: names, and folder names ending in '/' (Vault's LIST)."""
        self._ring()
        full = DATA + prefix
        result = await self.store.range(full, prefix=True)
        names: set[str] = set()
        for kv in result.kvs:
            rest = kv.key[len(full):]
            head, slash, _ = rest.partition("/")
            names.add(head + slash)
        return sorted(names)

    async def get_json(self, path: str) -> dict[str, Any] | None:
        raw = await self.get(path)
        return None if raw is None else dict(json.loads(raw))

    async def put_json(self, path: str, doc: object) -> None:
        await self.put(path, json.dumps(doc, separators=(",", ":")).encode())


class View:
    """A barrier scoped to one prefix (a mount's storage); its paths cannot climb out of it."""

    def __init__(self, barrier: Barrier, prefix: str) -> None:
        self.barrier = barrier
        self.prefix = prefix

    async def get_json(self, path: str) -> dict[str, Any] | None:
        return await self.barrier.get_json(self.prefix + path)

    async def put_json(self, path: str, doc: object) -> None:
        await self.barrier.put_json(self.prefix + path, doc)

    async def delete(self, path: str, *, prefix: bool = False) -> None:
        await self.barrier.delete(self.prefix + path, prefix=prefix)

    async def get_json_versioned(self, path: str) -> tuple[dict[str, Any] | None, int]:
        raw, revision = await self.barrier.get_versioned(self.prefix + path)
        return (None if raw is None else dict(json.loads(raw))), revision

    async def put_json_many(self, docs: dict[str, object], deletes: list[str],
                            unchanged: dict[str, int] | None = None) -> bool:
        entries = [(self.prefix + path, json.dumps(doc, separators=(",", ":")).encode()) for path, doc in docs.items()]
        return await self.barrier.put_many(entries, [self.prefix + path for path in deletes],
                                           {self.prefix + p: r for p, r in (unchanged or {}).items()})

    async def list(self, path: str) -> list[str]:
        return await self.barrier.list(self.prefix + path)
