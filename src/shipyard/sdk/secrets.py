"""shipyard.sdk.secrets: a service reads its secrets from the secrets engine with the token its instance was given
(VAULT_ADDR, VAULT_TOKEN), as one field or as a typed settings class (like config.load, for secrets).

It talks to the engine over HTTP only and never logs a value or the token; a secret that cannot be read raises
SecretsError (a service must not start on a default password).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

import httpx

from shipyard.sdk.config import parse_value

T = TypeVar("T")


class SecretsError(Exception):
    """The secret could not be read: no token, permission denied, missing, sealed engine, bad value."""


class Secrets:
    def __init__(self, addr: str | None = None, token: str | None = None, *, timeout: float = 5.0,
                 verify: str | bool = True) -> None:
        self.addr = (addr or os.environ.get("VAULT_ADDR") or "http://127.0.0.1:8200").rstrip("/")
        self.token = token if token is not None else os.environ.get("VAULT_TOKEN", "")
        self.timeout = timeout
        self.verify = os.environ.get("VAULT_CACERT") or verify

    def read(self, path: str) -> dict[str, Any]:
        """The fields of a KV secret: `secret/data/app/db` (KV v2) or `kv/app/db` (KV v1)."""
        if not self.token:
            raise SecretsError("no token: VAULT_TOKEN is not set (is the job's `vault:` section missing?)")
        try:
            answer = httpx.get(f"{self.addr}/v1/{path.lstrip('/')}", timeout=self.timeout, verify=self.verify,
                               headers={"X-Vault-Token": self.token, "X-Vault-Request": "true"})
        except httpx.HTTPError as exc:
            raise SecretsError(f"secret {path}: the engine at {self.addr} is unreachable ({exc})") from None
        if answer.status_code != 200:
            errors = answer.json().get("errors") if answer.headers.get("content-type", "").startswith(
                "application/json") else None
            raise SecretsError(f"secret {path}: {answer.status_code} {'; '.join(errors or []) or 'not found'}")
        data = answer.json().get("data") or {}
        if isinstance(data.get("data"), dict) and isinstance(data.get("metadata"), dict):
            data = data["data"]
        return dict(data)

    def get(self, ref: str) -> str:
        """One field: "secret/data/app/db#password"."""
        path, sep, field = ref.partition("#")
        if not sep or not field:
            raise SecretsError(f"{ref!r}: expected path#field")
        data = self.read(path)
        if field not in data:
            raise SecretsError(f"secret {path}: no field {field!r}")
        value = data[field]
        return value if isinstance(value, str) else str(value)

    def load(self, cls: type[T], path: str) -> T:
        """A config.Settings class filled from one secret's fields, each parsed to its annotated type; fields the
        secret lacks keep their defaults."""
        data = self.read(path)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            if item.name in data:
                raw = data[item.name]
                try:
                    values[item.name] = parse_value(raw if isinstance(raw, bytes) else str(raw).encode(),
                                                    hints[item.name])
                except ValueError as exc:
                    raise SecretsError(f"secret {path}: field {item.name}: {exc}") from None
        return cls(**values)


def get(ref: str) -> str:
    """One field of a secret with this instance's token: `secrets.get("secret/data/app/db#password")`."""
    return Secrets().get(ref)


def load(cls: type[T], path: str) -> T:
    """Typed secrets: `secrets.load(DbSecrets, "secret/data/app/db")`."""
    return Secrets().load(cls, path)
