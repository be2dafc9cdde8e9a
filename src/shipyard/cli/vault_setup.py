"""`shipyard up`'s provisioning of the secrets engine from a project's vault/ folder: its policies (vault/*.hcl, one
engine policy per file, named by the file) and the secrets it needs to exist (vault/secrets.yaml), generated here
and created only when absent, so a rotated value is never replaced.

It speaks the engine's Vault HTTP API with an operator's token (the dev root token of the server `up` started here,
else VAULT_TOKEN); it never prints or logs a secret value, and never writes one to disk.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from shipyard.errors import ShipyardError

SECRETS_FILE = "secrets.yaml"
_RANDOM = re.compile(r"^random-(\d{1,4})$")  # random-32: 32 random bytes, URL-safe base64 without padding
_RSA = re.compile(r"^rsa-(2048|3072|4096)$")  # an RSA private key, PKCS#8 PEM


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def generator(kind: Any, where: str) -> Callable[[], str]:
    """What makes one value: `random-N` (1 to 4096 bytes), `rsa-2048|3072|4096`, `ed25519`. Anything else, a literal
    value included (a secret in a file of the repository is no secret), is an error naming where it is."""
    text = str(kind) if isinstance(kind, str) else ""
    if match := _RANDOM.match(text):
        size = int(match.group(1))
        if 1 <= size <= 4096:
            return lambda: base64.urlsafe_b64encode(secrets.token_bytes(size)).rstrip(b"=").decode()
    if match := _RSA.match(text):
        bits = int(match.group(1))
        return lambda: _pem(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    if text == "ed25519":
        return lambda: _pem(ed25519.Ed25519PrivateKey.generate())
    raise ShipyardError(f"{where}: expected {{generate: random-N | rsa-2048 | rsa-3072 | rsa-4096 | ed25519}}, "
                        f"got {kind!r}", status=2)


def read_seeds(path: Path) -> dict[str, dict[str, Callable[[], str]]]:
    """vault/secrets.yaml: {"<kv v2 data path>": {"<field>": {"generate": "<kind>"}}}, checked whole before any
    write."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ShipyardError(f"{path}: {exc}", status=2) from None
    if not isinstance(doc, dict):
        raise ShipyardError(f"{path}: expected a map of secret paths", status=2)
    seeds: dict[str, dict[str, Callable[[], str]]] = {}
    for secret_path, fields in doc.items():
        if not isinstance(secret_path, str) or "/data/" not in secret_path or not isinstance(fields, dict):
            raise ShipyardError(f"{path}: {secret_path!r}: expected a KV v2 path (mount/data/...) with a map of "
                                "fields", status=2)
        seeds[secret_path] = {
            str(name): generator(spec.get("generate") if isinstance(spec, dict) else spec,
                                 f"{path}: {secret_path}#{name}")
            for name, spec in fields.items()}
    return seeds


def logged_address(state_dir: Path) -> str:
    """The engine's address as the server `up` started printed it in its log (it takes another port than the
    default 8200 when that one is taken); empty when it printed none."""
    try:
        found = re.findall(r"VAULT_ADDR=(\S+) root token", (state_dir / "server.log").read_text(errors="replace"))
    except OSError:
        found = []
    return found[-1] if found else ""


def engine_address(state_dir: Path) -> str:
    """The address the server `up` started here printed, else VAULT_ADDR, else the default. The project's own
    server comes first: a shell may still export the address of another one (an earlier run's)."""
    return logged_address(state_dir) or os.environ.get("VAULT_ADDR", "").rstrip("/") or "http://127.0.0.1:8200"


def engine_token(state_dir: Path) -> str:
    """The root token of the dev-mode engine of the server `up` started here (its data dir), else VAULT_TOKEN."""
    try:
        saved = str(json.loads((state_dir / "data" / "vault-dev.json").read_text()).get("root_token") or "")
    except (OSError, ValueError):
        saved = ""
    return saved or os.environ.get("VAULT_TOKEN", "")


class EngineSetup:
    """Applies a project's vault/ folder to the engine at `addr` with `token`; returns what it did, one line each."""

    def __init__(self, addr: str, token: str) -> None:
        verify: str | bool = os.environ.get("VAULT_CACERT") or os.environ.get("SHIPYARD_TLS_CA") or True
        self.http = httpx.Client(base_url=f"{addr}/v1/", timeout=30.0, verify=verify,
                                 headers={"X-Vault-Token": token, "X-Vault-Request": "true"})

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ShipyardError(f"secrets engine at {self.http.base_url}: {exc}", status=503) from None

    @staticmethod
    def _fail(what: str, response: httpx.Response) -> ShipyardError:
        try:
            errors = "; ".join(response.json().get("errors") or [])
        except ValueError:
            errors = response.text[:200]
        return ShipyardError(f"secrets engine: {what}: {response.status_code} {errors}", status=1)

    def apply_policy(self, path: Path) -> str:
        rules = path.read_text()
        current = self._call("GET", f"sys/policies/acl/{path.stem}")
        if current.status_code == 200 and (current.json().get("data") or {}).get("policy") == rules:
            return ""
        answer = self._call("PUT", f"sys/policies/acl/{path.stem}", json={"policy": rules})
        if answer.status_code not in (200, 204):
            raise self._fail(f"policy {path.stem} from {path}", answer)
        verb = "updated" if current.status_code == 200 else "created"
        return f"secrets engine policy {path.stem}: {verb} from {path}"

    def seed(self, secret_path: str, fields: dict[str, Callable[[], str]]) -> str:
        """Creates the secret when it has no version yet (cas=0: whoever is first wins, nothing is overwritten)."""
        current = self._call("GET", secret_path)
        if current.status_code == 200:
            return ""
        if current.status_code != 404:
            raise self._fail(f"reading {secret_path}", current)
        body = {"data": {name: make() for name, make in fields.items()}, "options": {"cas": 0}}
        answer = self._call("POST", secret_path, json=body)
        if answer.status_code == 400 and "check-and-set" in answer.text:
            return ""  # created meanwhile by someone else: theirs stays
        if answer.status_code not in (200, 204):
            raise self._fail(f"creating {secret_path}", answer)
        return f"secrets engine: created {secret_path} ({', '.join(sorted(fields))}, generated)"


def apply_vault_folder(project_dir: Path, state_dir: Path) -> list[str]:
    """DIRECTORY/vault/: policies first (the services' tokens carry them), then the secrets to create. Nothing to do
    without the folder; an error when there is one but no token to apply it with."""
    folder = project_dir / "vault"
    policies = sorted(folder.glob("*.hcl"))
    seeds_file = folder / SECRETS_FILE
    if not policies and not seeds_file.exists():
        return []
    seeds = read_seeds(seeds_file) if seeds_file.exists() else {}
    token = engine_token(state_dir)
    if not token:
        raise ShipyardError(f"{folder}: no token for the secrets engine (set VAULT_TOKEN to apply it)", status=1)
    setup = EngineSetup(engine_address(state_dir), token)
    done = [setup.apply_policy(path) for path in policies]
    done += [setup.seed(path, fields) for path, fields in seeds.items()]
    return [line for line in done if line]
