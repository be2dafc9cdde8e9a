"""The auth service: users (SQLite, argon2 hashes of peppered passwords), sign-up, log-in issuing RS256 JWTs, roles.

Its signing key and password pepper come from the platform's secrets engine at start (a file on tmpfs and an env
variable, shipyard.yaml `secrets:`/`vault:`), never from its data dir. The gateway verifies its tokens with the
public key this service registers as a jwt credential of the gateway consumer `mediahub-users`; it must never hand
out the private key, nor log a password, the pepper or a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, Field

from mediahub.api import ApiError, CallerDep, data_dir, new_app, serve, shipyard_addr
from mediahub.database import Database
from shipyard.sdk import Service, config

log = logging.getLogger("mediahub.auth")

ISSUER = "mediahub"  # the `iss` claim: the gateway's jwt plugin finds the credential by it (key_claim_name)
GATEWAY_CONSUMER = "mediahub-users"
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at REAL NOT NULL
);
"""


@dataclass
class Settings:
    """Live settings under KV mediahub/auth/ (e.g. `shipyard kv put mediahub/auth/token_ttl_seconds 600`)."""

    token_ttl_seconds: int = 3600


settings = config.load(Settings, prefix="mediahub/auth")
hasher = PasswordHasher()
DATA = data_dir("auth")
db = Database(DATA / "users.db", SCHEMA)


# ---- the signing key and the gateway credential ---------------------------------------------------------------


class MissingSecret(SystemExit):
    """Started without what the secrets engine delivers: exit with one line saying what and where from."""

    def __init__(self, what: str) -> None:
        super().__init__(f"auth: {what} (shipyard.yaml secrets:/vault: of auth, from the secrets engine; "
                         "`shipyard up` creates them from vault/secrets.yaml)")


def signing_key() -> rsa.RSAPrivateKey:
    """The key from the secrets engine, delivered as $SECRETS_DIR/jwt-signing-key.pem (tmpfs, 0600). Both instances
    read the same one, so either's tokens verify. A key an older version kept in the data dir is removed."""
    legacy = DATA / "jwt-signing-key.pem"
    if legacy.exists():
        legacy.unlink(missing_ok=True)
        log.warning("removed %s: the signing key now lives in the secrets engine", legacy)
    folder = os.environ.get("SECRETS_DIR", "")
    try:
        pem = (Path(folder) / "jwt-signing-key.pem").read_bytes() if folder else b""
    except OSError:
        pem = b""
    if not pem:
        raise MissingSecret("no signing key in $SECRETS_DIR/jwt-signing-key.pem")
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise MissingSecret("the signing key is not an RSA key (RS256)")
    return loaded


def password_pepper() -> bytes:
    """A secret mixed into every password before argon2 (HMAC-SHA256), kept apart from the users database: a copy
    of the database alone does not let anyone test guesses offline."""
    pepper = os.environ.get("PASSWORD_PEPPER", "")
    if len(pepper) < 16:
        raise MissingSecret("PASSWORD_PEPPER is missing or shorter than 16 characters")
    return pepper.encode()


PRIVATE_KEY = signing_key()
PEPPER = password_pepper()
PEPPERED = "pepper1"  # prefix of a stored hash made from the peppered password; hashes without it predate the pepper
PUBLIC_PEM = PRIVATE_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
gateway_ready = asyncio.Event()


async def register_with_gateway() -> None:
    """Makes sure the gateway trusts our tokens: consumer `mediahub-users` with a jwt credential whose key is our
    issuer and whose RS256 public key is ours. Idempotent (both instances do it), retried until the server answers."""
    base = f"http://{shipyard_addr()}/api/gateway/consumers/{GATEWAY_CONSUMER}"
    delay = 0.2
    # Under --acl the platform hands each instance its token; the gateway admin API needs `gateway = "write"`,
    # which the operator grants this service with a policy named service-auth (docs/acl.md).
    token = os.environ.get("SHIPYARD_HTTP_TOKEN", "")
    async with httpx.AsyncClient(timeout=5.0, headers={"X-Consul-Token": token} if token else {}) as http:
        while True:
            try:
                r = await http.put(base, json={"username": GATEWAY_CONSUMER})
                if r.status_code not in (200, 201, 409):
                    r.raise_for_status()
                credential = {"key": ISSUER, "algorithm": "RS256", "rsa_public_key": PUBLIC_PEM}
                r = await http.get(f"{base}/jwt/{ISSUER}")
                if r.status_code == 404:
                    r = await http.post(f"{base}/jwt", json=credential)
                    if r.status_code == 409:  # the other instance was first: check its key on the next pass
                        continue
                elif r.status_code == 200 and r.json().get("rsa_public_key") != PUBLIC_PEM:
                    r = await http.patch(f"{base}/jwt/{ISSUER}", json=credential)
                r.raise_for_status()
                gateway_ready.set()
                log.info("gateway consumer %s trusts issuer %r (RS256)", GATEWAY_CONSUMER, ISSUER)
                return
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("cannot register the jwt credential with the gateway yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


# ---- passwords -------------------------------------------------------------------------------------------------


def _peppered(password: str) -> str:
    return hmac.new(PEPPER, password.encode(), hashlib.sha256).hexdigest()


def hash_password(password: str) -> str:
    return f"{PEPPERED}{hasher.hash(_peppered(password))}"


def verify_password(stored: str, password: str) -> bool:
    """Raises VerificationError/InvalidHashError on a wrong password; True when the stored hash should be remade
    (an argon2 parameter change, or a hash from before the pepper, which is upgraded at its next log-in)."""
    if stored.startswith(PEPPERED):
        stored = stored[len(PEPPERED):]
        hasher.verify(stored, _peppered(password))
        return hasher.check_needs_rehash(stored)
    hasher.verify(stored, password)
    return True


# ---- the API ---------------------------------------------------------------------------------------------------

app = new_app("auth", "Users, sign-up and log-in. Log-in returns a JWT to send as `Authorization: Bearer <token>`.")


class SignUp(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254, examples=["ada@example.com"])
    password: str = Field(min_length=8, max_length=1024)
    name: str = Field(default="", max_length=200)


class LogIn(BaseModel):
    email: str = Field(max_length=254)
    password: str = Field(max_length=1024)


class User(BaseModel):
    id: str
    email: str
    name: str
    role: Literal["admin", "user"]
    created_at: float


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    user: User


class RoleChange(BaseModel):
    role: Literal["admin", "user"]


def _user(row: sqlite3.Row) -> User:
    return User(id=row["id"], email=row["email"], name=row["name"], role=row["role"], created_at=row["created_at"])


@app.post("/auth/signup", status_code=201, response_model=User, summary="Create an account (the first is admin)")
async def signup(body: SignUp) -> User:
    password_hash = await asyncio.to_thread(hash_password, body.password)
    user_id = uuid.uuid4().hex

    def insert(conn: sqlite3.Connection) -> sqlite3.Row:
        first = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
        conn.execute("INSERT INTO users (id, email, name, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (user_id, body.email, body.name or body.email.split("@")[0], password_hash,
                      "admin" if first else "user", time.time()))
        return conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()

    try:
        return _user(await db.run(insert))
    except sqlite3.IntegrityError:
        raise ApiError(409, "email already registered", {"email": body.email}) from None


@app.post("/auth/login", response_model=Token, summary="Exchange email and password for a JWT")
async def login(body: LogIn) -> Token:
    rows = await db.query("SELECT * FROM users WHERE email = ?", (body.email,))
    try:
        if not rows:
            raise VerificationError("no such user")
        stale = await asyncio.to_thread(verify_password, rows[0]["password_hash"], body.password)
    except (VerificationError, InvalidHashError):
        raise ApiError(401, "wrong email or password") from None
    row = rows[0]
    if stale:
        new_hash = await asyncio.to_thread(hash_password, body.password)
        await db.run(lambda c: c.execute("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, row["id"])))
    ttl = settings.current.token_ttl_seconds
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "sub": row["id"], "name": row["name"], "role": row["role"],
                              "iat": now, "exp": now + ttl}
    token = jwt.encode(claims, PRIVATE_KEY, algorithm="RS256")
    return Token(access_token=token, expires_in=ttl, user=_user(row))


@app.get("/auth/me", response_model=User, summary="The account of the token's holder")
async def me(caller: CallerDep) -> User:
    rows = await db.query("SELECT * FROM users WHERE id = ?", (caller.id,))
    if not rows:
        raise ApiError(404, "user not found", {"id": caller.id})
    return _user(rows[0])


@app.get("/auth/users", response_model=list[User], summary="Every account (admins only)")
async def list_users(caller: CallerDep) -> list[User]:
    if not caller.is_admin:
        raise ApiError(403, "admins only")
    return [_user(r) for r in await db.query("SELECT * FROM users ORDER BY created_at")]


@app.put("/auth/users/{user_id}/role", response_model=User, summary="Make a user admin or not (admins only)")
async def set_role(user_id: str, body: RoleChange, caller: CallerDep) -> User:
    if not caller.is_admin:
        raise ApiError(403, "admins only")

    def update(conn: sqlite3.Connection) -> sqlite3.Row | None:
        conn.execute("UPDATE users SET role = ? WHERE id = ?", (body.role, user_id))
        return conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()

    row = await db.run(update)
    if row is None:
        raise ApiError(404, "user not found", {"id": user_id})
    return _user(row)


async def healthy() -> bool:
    # Not ready until the gateway knows our key: a token issued before that would be refused.
    return gateway_ready.is_set() and await db.reachable()


service = Service(app, name="auth", health=healthy)


@service.on_startup
async def start() -> None:
    service_tasks.append(asyncio.create_task(register_with_gateway()))


service_tasks: list[asyncio.Task[None]] = []

if __name__ == "__main__":
    serve(service)
