"""The token store: service tokens with TTLs, periods, use counts, accessors and parent/child revocation.

Token IDs are kept only as SHA-256 hashes (they are bearer secrets); this module never logs or stores one in clear.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets as _random
import string
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from shipyard.errors import BadRequest
from shipyard.secrets.barrier import Barrier

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_TTL = 768 * 3600  # Vault's default and maximum lease TTL (32 days)
MAX_TTL = 768 * 3600
_ALPHABET = string.ascii_letters + string.digits


def new_token_id() -> str:
    return "hvs." + "".join(_random.choice(_ALPHABET) for _ in range(24))


def hash_token(token_id: str) -> str:
    return hashlib.sha256(b"shipyard-vault-token:" + token_id.encode()).hexdigest()


def parse_duration(value: Any, what: str) -> int:
    """Vault's durations: seconds as a number or numeric string, or Go's "90s", "15m", "1h30m", "2d"."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or (isinstance(value, int | float) and value < 0):
        raise BadRequest(f"invalid {what}: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise BadRequest(f"invalid {what}: {value!r}")
    return int(sum(float(number) * _UNITS[unit] for number, unit in parts))


@dataclass
class TokenEntry:
    hash: str
    accessor: str
    policies: list[str]
    parent: str = ""  # the parent's hash; "" for root and orphan tokens
    path: str = "auth/token/create"
    display_name: str = "token"
    meta: dict[str, str] = field(default_factory=dict)
    creation_time: int = 0
    creation_ttl: int = 0
    expire_time: float = 0.0  # 0: never
    explicit_max_ttl: int = 0
    period: int = 0
    num_uses: int = 0
    renewable: bool = True
    orphan: bool = False
    max_expire: float = 0.0  # from explicit_max_ttl; 0: none

    @property
    def root(self) -> bool:
        return "root" in self.policies

    def ttl(self, now: float) -> int:
        return 0 if not self.expire_time else max(0, round(self.expire_time - now))

    def expired(self, now: float) -> bool:
        return bool(self.expire_time) and self.expire_time <= now

    def lookup(self, token_id: str = "") -> dict[str, Any]:
        now = time.time()
        return {
            "accessor": self.accessor, "creation_time": self.creation_time, "creation_ttl": self.creation_ttl,
            "display_name": self.display_name, "entity_id": "", "expire_time": _iso(self.expire_time),
            "explicit_max_ttl": self.explicit_max_ttl, "id": token_id, "issue_time": _iso(self.creation_time),
            "meta": self.meta or None, "num_uses": self.num_uses, "orphan": self.orphan, "path": self.path,
            "policies": self.policies, "renewable": self.renewable, "ttl": self.ttl(now), "type": "service",
            **({"period": self.period} if self.period else {}),
        }


def _iso(epoch: float) -> str | None:
    if not epoch:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class TokenRequest:
    policies: list[str]
    ttl: int = 0
    explicit_max_ttl: int = 0
    period: int = 0
    num_uses: int = 0
    renewable: bool = True
    display_name: str = "token"
    meta: dict[str, str] = field(default_factory=dict)
    orphan: bool = False
    path: str = "auth/token/create"
    token_id: str = ""  # root callers may choose the ID (Vault's `id`)


class TokenStore:
    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier

    async def create(self, request: TokenRequest, parent: TokenEntry | None) -> tuple[str, TokenEntry]:
        token_id = request.token_id or new_token_id()
        now = time.time()
        ttl = request.period or request.ttl or (0 if "root" in request.policies and not request.ttl else DEFAULT_TTL)
        if request.explicit_max_ttl and ttl > request.explicit_max_ttl:
            ttl = request.explicit_max_ttl
        ttl = min(ttl, MAX_TTL) if not request.period else ttl
        entry = TokenEntry(
            hash=hash_token(token_id), accessor="".join(_random.choice(_ALPHABET) for _ in range(24)),
            policies=sorted(set(request.policies)), parent="" if request.orphan or parent is None else parent.hash,
            path=request.path, display_name=request.display_name, meta=request.meta, creation_time=int(now),
            creation_ttl=ttl, expire_time=now + ttl if ttl else 0.0, explicit_max_ttl=request.explicit_max_ttl,
            period=request.period, num_uses=request.num_uses, renewable=request.renewable,
            orphan=request.orphan or parent is None,
            max_expire=now + request.explicit_max_ttl if request.explicit_max_ttl else 0.0,
        )
        if await self.barrier.get(f"token/id/{entry.hash}") is not None:
            raise BadRequest("cannot create a token with a duplicate ID")
        await self._save(entry)
        await self.barrier.put(f"token/accessor/{entry.accessor}", entry.hash.encode())
        if entry.parent:
            await self.barrier.put(f"token/parent/{entry.parent}/{entry.hash}", b"")
        return token_id, entry

    async def _save(self, entry: TokenEntry) -> None:
        await self.barrier.put_json(f"token/id/{entry.hash}", asdict(entry))

    async def by_hash(self, token_hash: str) -> TokenEntry | None:
        doc = await self.barrier.get_json(f"token/id/{token_hash}")
        if doc is None:
            return None
        entry = TokenEntry(**doc)
        if entry.expired(time.time()):
            await self.revoke_tree(entry)  # lazily reaped on the first look after expiry
            return None
        return entry

    async def lookup(self, token_id: str) -> TokenEntry | None:
        return await self.by_hash(hash_token(token_id)) if token_id else None

    async def by_accessor(self, accessor: str) -> TokenEntry | None:
        raw = await self.barrier.get(f"token/accessor/{accessor}") if accessor and "/" not in accessor else None
        return None if raw is None else await self.by_hash(raw.decode())

    async def use(self, entry: TokenEntry) -> bool:
        """Counts one use of a limited-use token; the last use revokes it (after the request it authorises).
        False when no use is left: concurrent requests each take one use (a txn on the entry's revision), so a
        token with num_uses=N authorises N requests, never more."""
        if not entry.num_uses:
            return True
        for _ in range(50):
            raw, revision = await self.barrier.get_versioned(f"token/id/{entry.hash}")
            if raw is None:
                return False
            current = TokenEntry(**json.loads(raw))
            current.num_uses -= 1
            if current.num_uses < 0:
                return False
            document = json.dumps(asdict(current), separators=(",", ":")).encode()
            if await self.barrier.put_many([(f"token/id/{entry.hash}", document)], (),
                                           {f"token/id/{entry.hash}": revision}):
                if current.num_uses == 0:
                    await self.revoke_tree(current)  # spent: the caller's request still completes, as in Vault
                return True
        return False

    async def renew(self, entry: TokenEntry, increment: int) -> TokenEntry:
        if not entry.renewable:
            raise BadRequest("token is not renewable")
        if not entry.expire_time:
            return entry  # a token without TTL (root) needs no renewal
        now = time.time()
        ttl = entry.period or increment or entry.creation_ttl
        expire = now + min(ttl, MAX_TTL if not entry.period else ttl)
        if entry.max_expire:
            expire = min(expire, entry.max_expire)
        entry.expire_time = expire
        await self._save(entry)
        return entry

    async def revoke_tree(self, entry: TokenEntry) -> None:
        """The token and every descendant (children are revoked with their parent); orphans survive."""
        for child in await self.barrier.list(f"token/parent/{entry.hash}/"):
            doc = await self.barrier.get_json(f"token/id/{child}")
            if doc is not None:
                await self.revoke_tree(TokenEntry(**doc))
        await self.barrier.delete(f"token/parent/{entry.hash}/", prefix=True)
        if entry.parent:
            await self.barrier.delete(f"token/parent/{entry.parent}/{entry.hash}")
        await self.barrier.delete(f"token/accessor/{entry.accessor}")
        await self.barrier.delete(f"token/id/{entry.hash}")

    async def revoke_orphan(self, entry: TokenEntry) -> None:
        """Revokes only this token; its children become orphans."""
        for child in await self.barrier.list(f"token/parent/{entry.hash}/"):
            doc = await self.barrier.get_json(f"token/id/{child}")
            if doc is not None:
                orphaned = TokenEntry(**doc)
                orphaned.parent, orphaned.orphan = "", True
                await self._save(orphaned)
        await self.barrier.delete(f"token/parent/{entry.hash}/", prefix=True)
        entry.parent = ""
        await self.revoke_tree(entry)

    async def accessors(self) -> list[str]:
        return await self.barrier.list("token/accessor/")
