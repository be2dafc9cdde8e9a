"""The transit engine: named, versioned keys that encrypt, decrypt, rewrap, HMAC and sign for callers.

Key material stays inside the barrier; no response ever carries a key (keys are not exportable here).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from shipyard.errors import BadRequest
from shipyard.secrets.barrier import View
from shipyard.secrets.request import Missing, Request, UnsupportedOperation, as_int, data_response

KEY_TYPES = ("aes256-gcm96", "chacha20-poly1305", "ed25519", "ecdsa-p256")
_HASHES: dict[str, Callable[..., Any]] = {
    "sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256, "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512,
    "sha3-224": hashlib.sha3_224, "sha3-256": hashlib.sha3_256, "sha3-384": hashlib.sha3_384,
    "sha3-512": hashlib.sha3_512}
_EC_HASHES: dict[str, hashes.HashAlgorithm] = {"sha2-224": hashes.SHA224(), "sha2-256": hashes.SHA256(),
                                               "sha2-384": hashes.SHA384(), "sha2-512": hashes.SHA512()}


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"missing {what}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"failed to base64-decode {what}") from None


def _new_version(key_type: str) -> dict[str, Any]:
    version: dict[str, Any] = {"creation_time": int(time.time()),
                               "hmac_key": base64.b64encode(os.urandom(32)).decode()}
    if key_type in ("aes256-gcm96", "chacha20-poly1305"):
        version["key"] = base64.b64encode(os.urandom(32)).decode()
    elif key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        version["key"] = base64.b64encode(private.private_bytes_raw()).decode()
        version["public_key"] = base64.b64encode(private.public_key().public_bytes_raw()).decode()
    else:
        ec_key = ec.generate_private_key(ec.SECP256R1())
        version["key"] = base64.b64encode(ec_key.private_numbers().private_value.to_bytes(32, "big")).decode()
        version["public_key"] = ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return version


def _parse_ciphertext(value: Any, prefix: str = "vault") -> tuple[int, bytes]:
    if not isinstance(value, str) or not value.startswith(prefix + ":v"):
        raise BadRequest("invalid ciphertext: no prefix")
    head, _, body = value[len(prefix) + 2:].partition(":")
    try:
        version = int(head)
    except ValueError:
        raise BadRequest("invalid ciphertext: version number could not be decoded") from None
    return version, _b64decode(body, "ciphertext")


class Transit:
    def __init__(self, view: View) -> None:
        self.view = view

    async def exists(self, path: str) -> bool:
        return True  # every transit path is an action: writes are "update", as in Vault

    async def handle(self, req: Request, path: str) -> dict[str, Any] | None:
        head, _, rest = path.partition("/")
        if head == "keys":
            return await self._keys(req, rest)
        if head in ("random", "hash"):
            return self._random(req, rest) if head == "random" else self._hash(req, rest)
        if req.operation not in ("create", "update"):
            raise UnsupportedOperation()
        name, _, suffix = rest.partition("/")
        if not name:
            raise Missing()
        actions = {"encrypt": self._encrypt, "decrypt": self._decrypt, "rewrap": self._rewrap,
                   "hmac": self._hmac, "sign": self._sign, "verify": self._verify}
        if head == "datakey":
            kind, _, name = rest.partition("/")
            return await self._datakey(req, kind, name)
        if head not in actions:
            raise Missing()
        return await actions[head](req, name, suffix)

    async def _load(self, name: str) -> dict[str, Any]:
        key = await self.view.get_json("policy/" + name) if name and "/" not in name else None
        if key is None:
            raise BadRequest(f"encryption key not found: {name}")
        return key

    async def _keys(self, req: Request, rest: str) -> dict[str, Any] | None:
        if req.operation == "list" or not rest:
            keys = await self.view.list("policy/")
            if not keys:
                raise Missing()
            return data_response({"keys": keys})
        name, _, action = rest.partition("/")
        if action == "rotate" and req.operation in ("create", "update"):
            return data_response(self._describe(name, await self._rotate(name)))
        if action == "config" and req.operation in ("create", "update"):
            return await self._configure(name, req.data)
        if action:
            raise Missing()
        if req.operation == "read":
            doc = await self.view.get_json("policy/" + name)
            if doc is None:
                raise Missing()
            return data_response(self._describe(name, doc))
        if req.operation in ("create", "update"):
            await self._create_key(name, str(req.data.get("type") or "aes256-gcm96"))
            return data_response(self._describe(name, await self._load(name)))
        if req.operation == "delete":
            key = await self._load(name)
            if not key["deletion_allowed"]:
                raise BadRequest("deletion is not allowed for this key")
            await self.view.delete("policy/" + name)
            return None
        raise UnsupportedOperation()

    async def _rotate(self, name: str) -> dict[str, Any]:
        """A new key version; concurrent rotations each add their own (a txn on the key's revision)."""
        for _ in range(50):
            key, revision = await self.view.get_json_versioned("policy/" + name) if "/" not in name else (None, 0)
            if key is None:
                raise BadRequest(f"encryption key not found: {name}")
            key["latest_version"] += 1
            key["versions"][str(key["latest_version"])] = _new_version(key["type"])
            if await self.view.put_json_many({"policy/" + name: key}, [], {"policy/" + name: revision}):
                return key
        raise BadRequest(f"too many concurrent changes to key {name}; try again")

    async def _create_key(self, name: str, key_type: str) -> dict[str, Any]:
        if key_type not in KEY_TYPES:
            raise BadRequest(f"unknown key type {key_type}")
        existing = await self.view.get_json("policy/" + name)
        if existing is not None:
            return existing
        key = {"type": key_type, "latest_version": 1, "min_decryption_version": 1, "min_encryption_version": 0,
               "deletion_allowed": False, "versions": {"1": _new_version(key_type)}}
        await self.view.put_json("policy/" + name, key)
        return key

    async def _configure(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        key = await self._load(name)
        for field in ("min_decryption_version", "min_encryption_version"):
            if field in data:
                value = as_int(data[field], field)
                if value < 0 or value > key["latest_version"]:
                    raise BadRequest(f"{field} out of range")
                key[field] = value
        if "deletion_allowed" in data:
            key["deletion_allowed"] = bool(data["deletion_allowed"])
        await self.view.put_json("policy/" + name, key)
        return data_response(self._describe(name, key))

    @staticmethod
    def _describe(name: str, key: dict[str, Any]) -> dict[str, Any]:
        asymmetric = key["type"] in ("ed25519", "ecdsa-p256")
        versions: dict[str, Any] = {}
        for number, version in key["versions"].items():
            versions[number] = ({"creation_time": version["creation_time"], "name": key["type"],
                                 "public_key": version["public_key"]} if asymmetric else version["creation_time"])
        return {"name": name, "type": key["type"], "keys": versions, "latest_version": key["latest_version"],
                "min_decryption_version": key["min_decryption_version"],
                "min_encryption_version": key["min_encryption_version"], "min_available_version": 0,
                "deletion_allowed": key["deletion_allowed"], "exportable": False, "allow_plaintext_backup": False,
                "derived": False, "supports_encryption": not asymmetric, "supports_decryption": not asymmetric,
                "supports_derivation": False, "supports_signing": asymmetric}

    @staticmethod
    def _cipher(key: dict[str, Any], version: dict[str, Any]) -> AESGCM | ChaCha20Poly1305:
        raw = base64.b64decode(version["key"])
        if key["type"] == "aes256-gcm96":
            return AESGCM(raw)
        if key["type"] == "chacha20-poly1305":
            return ChaCha20Poly1305(raw)
        raise BadRequest(f"key type {key['type']} does not support encryption")

    def _seal(self, key: dict[str, Any], plaintext: bytes, context: bytes, want: int = 0) -> dict[str, Any]:
        number = want or key["latest_version"]
        if number < key["min_encryption_version"] or str(number) not in key["versions"]:
            raise BadRequest("requested version for encryption is not available")
        nonce = os.urandom(12)
        sealed = self._cipher(key, key["versions"][str(number)]).encrypt(nonce, plaintext, context or None)
        return {"ciphertext": f"vault:v{number}:" + base64.b64encode(nonce + sealed).decode(), "key_version": number}

    def _open(self, key: dict[str, Any], ciphertext: Any, context: bytes) -> bytes:
        number, blob = _parse_ciphertext(ciphertext)
        if number < key["min_decryption_version"]:
            raise BadRequest("ciphertext or signature version is disallowed by policy (too old)")
        version = key["versions"].get(str(number))
        if version is None or len(blob) < 12 + 16:
            raise BadRequest("invalid ciphertext: key version not found or ciphertext too short")
        try:
            return self._cipher(key, version).decrypt(blob[:12], blob[12:], context or None)
        except InvalidTag:
            raise BadRequest("cipher: message authentication failed") from None

    @staticmethod
    def _context(data: dict[str, Any]) -> bytes:
        return _b64decode(data["context"], "context") if data.get("context") else b""

    async def _encrypt(self, req: Request, name: str, _: str) -> dict[str, Any]:
        plaintext = _b64decode(req.data.get("plaintext"), "plaintext")
        key = await self.view.get_json("policy/" + name) or await self._create_key(
            name, str(req.data.get("type") or "aes256-gcm96"))  # encrypt upserts a key, as Vault's does
        version = as_int(req.data.get("key_version"), "key_version")
        return data_response(self._seal(key, plaintext, self._context(req.data), version))

    async def _decrypt(self, req: Request, name: str, _: str) -> dict[str, Any]:
        key = await self._load(name)
        plaintext = self._open(key, req.data.get("ciphertext"), self._context(req.data))
        return data_response({"plaintext": base64.b64encode(plaintext).decode()})

    async def _rewrap(self, req: Request, name: str, _: str) -> dict[str, Any]:
        key = await self._load(name)
        context = self._context(req.data)
        plaintext = self._open(key, req.data.get("ciphertext"), context)
        return data_response(self._seal(key, plaintext, context, as_int(req.data.get("key_version"), "key_version")))

    async def _datakey(self, req: Request, kind: str, name: str) -> dict[str, Any]:
        if kind not in ("plaintext", "wrapped"):
            raise Missing()
        key = await self._load(name)
        bits = as_int(req.data.get("bits"), "bits", 256)
        if bits not in (128, 256, 512):
            raise BadRequest("invalid bits: must be 128, 256 or 512")
        material = os.urandom(bits // 8)
        out = self._seal(key, material, self._context(req.data))
        if kind == "plaintext":
            out["plaintext"] = base64.b64encode(material).decode()
        return data_response(out)

    @staticmethod
    def _algorithm(req: Request, suffix: str, field: str = "algorithm") -> str:
        algorithm = suffix or str(req.data.get(field) or req.data.get("hash_algorithm") or "sha2-256")
        if algorithm not in _HASHES:
            raise BadRequest(f"unsupported algorithm {algorithm}")
        return algorithm

    async def _hmac(self, req: Request, name: str, suffix: str) -> dict[str, Any]:
        key = await self._load(name)
        algorithm = self._algorithm(req, suffix)
        number = as_int(req.data.get("key_version"), "key_version") or key["latest_version"]
        version = key["versions"].get(str(number))
        if version is None:
            raise BadRequest("invalid key version")
        digest = hmac.new(base64.b64decode(version["hmac_key"]), _b64decode(req.data.get("input"), "input"),
                          _HASHES[algorithm]).digest()
        return data_response({"hmac": f"vault:v{number}:" + base64.b64encode(digest).decode()})

    async def _sign(self, req: Request, name: str, suffix: str) -> dict[str, Any]:
        key = await self._load(name)
        data = _b64decode(req.data.get("input"), "input")
        number = key["latest_version"]
        raw = base64.b64decode(key["versions"][str(number)]["key"])
        if key["type"] == "ed25519":
            signature = ed25519.Ed25519PrivateKey.from_private_bytes(raw).sign(data)
        elif key["type"] == "ecdsa-p256":
            private = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            signature = private.sign(data, ec.ECDSA(_EC_HASHES[self._ec_hash(req, suffix)]))
        else:
            raise BadRequest(f"key type {key['type']} does not support signing")
        return data_response({"signature": f"vault:v{number}:" + base64.b64encode(signature).decode(),
                              "key_version": number})

    def _ec_hash(self, req: Request, suffix: str) -> str:
        algorithm = self._algorithm(req, suffix, "hash_algorithm")
        if algorithm not in _EC_HASHES:
            raise BadRequest(f"unsupported hash algorithm {algorithm} for ECDSA")
        return algorithm

    async def _verify(self, req: Request, name: str, suffix: str) -> dict[str, Any]:
        key = await self._load(name)
        data = _b64decode(req.data.get("input"), "input")
        if "hmac" in req.data:
            number, expected = _parse_ciphertext(req.data["hmac"])
            version = key["versions"].get(str(number))
            if version is None:
                raise BadRequest("invalid key version")
            digest = hmac.new(base64.b64decode(version["hmac_key"]), data,
                              _HASHES[self._algorithm(req, suffix)]).digest()
            return data_response({"valid": hmac.compare_digest(digest, expected)})
        number, signature = _parse_ciphertext(req.data.get("signature"))
        version = key["versions"].get(str(number))
        if version is None:
            raise BadRequest("invalid key version")
        return data_response({"valid": self._check_signature(key, version, data, signature, req, suffix)})

    def _check_signature(self, key: dict[str, Any], version: dict[str, Any], data: bytes, signature: bytes,
                         req: Request, suffix: str) -> bool:
        try:
            if key["type"] == "ed25519":
                ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(version["public_key"])).verify(
                    signature, data)
            elif key["type"] == "ecdsa-p256":
                public = serialization.load_pem_public_key(version["public_key"].encode())
                assert isinstance(public, ec.EllipticCurvePublicKey)
                public.verify(signature, data, ec.ECDSA(_EC_HASHES[self._ec_hash(req, suffix)]))
            else:
                raise BadRequest(f"key type {key['type']} does not support verification")
        except InvalidSignature:
            return False
        return True

    @staticmethod
    def _random(req: Request, rest: str) -> dict[str, Any]:
        parts = [p for p in rest.split("/") if p]
        if parts and parts[0] in ("platform", "seal", "all"):
            parts = parts[1:]
        count = int(parts[0]) if parts and parts[0].isdigit() else as_int(req.data.get("bytes"), "bytes", 32)
        if not 1 <= count <= 128 * 1024:
            raise BadRequest("number of bytes must be between 1 and 131072")
        fmt = str(req.data.get("format") or "base64")
        raw = os.urandom(count)
        return data_response({"random_bytes": raw.hex() if fmt == "hex" else base64.b64encode(raw).decode()})

    @staticmethod
    def _hash(req: Request, rest: str) -> dict[str, Any]:
        algorithm = rest or str(req.data.get("algorithm") or "sha2-256")
        if algorithm not in _HASHES:
            raise BadRequest(f"unsupported algorithm {algorithm}")
        digest = _HASHES[algorithm](_b64decode(req.data.get("input"), "input")).digest()
        fmt = str(req.data.get("format") or "hex")
        return data_response({"sum": digest.hex() if fmt == "hex" else base64.b64encode(digest).decode()})
