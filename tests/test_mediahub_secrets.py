"""mediahub's auth service keeps its JWT signing key and password pepper in the secrets engine, not on disk: `shipyard
up` makes them once from the project's vault/ folder (with the read-only policy auth's token carries), auth gets them
at each start (a tmpfs file, an env variable), the gateway verifies with the engine's key, passwords are stored
peppered, no file under the project holds either, and a new key version rolls auth over to it (change_mode).

Only the auth service and the gateway run (one instance): the rest of the example is not needed to show this.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import hvac
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support import free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ENV = ("SHIPYARD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN", "VAULT_ADDR", "VAULT_TOKEN", "SHIPYARD_HTTP_ADDR",
              "CONSUL_HTTP_ADDR")


class AuthOnly:
    def __init__(self, project: Path) -> None:
        self.project = project
        self.http_port, self.gateway_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
        self.env |= {"SHIPYARD_DNS_PORT": str(free_port()), "SHIPYARD_GATEWAY_PORT": str(self.gateway_port)}

    def shipyard(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", f"127.0.0.1:{self.http_port}",
                               *args], capture_output=True, text=True, timeout=240, env=self.env, cwd=ROOT)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def engine(self) -> hvac.Client:
        state = self.project / ".shipyard"
        root = json.loads((state / "data" / "vault-dev.json").read_text())["root_token"]
        addr = re.findall(r"VAULT_ADDR=(\S+) root token", (state / "server.log").read_text(errors="replace"))[-1]
        return hvac.Client(url=addr, token=root)

    def credential_key(self) -> str:
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}/api/gateway/consumers/mediahub-users/jwt/mediahub",
                           timeout=10)
        return str(answer.raise_for_status().json()["rsa_public_key"])


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthOnly]:
    project = tmp_path_factory.mktemp("mediahub-secrets") / "mediahub"
    shutil.copytree(ROOT / "examples" / "mediahub", project,
                    ignore=shutil.ignore_patterns(".data", ".shipyard", "__pycache__"))
    spec = yaml.safe_load((project / "shipyard.yaml").read_text())
    auth = {**spec["services"]["auth"], "instances": 1}
    (project / "shipyard.yaml").write_text(yaml.safe_dump({"project": spec["project"], "services": {"auth": auth}}))
    run = AuthOnly(project)
    up = run.shipyard("up", "--vault-port", str(free_port()), str(project))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "secrets engine policy mediahub-auth: created from" in up.stdout
        assert "created secret/data/mediahub/auth (jwt_private_key, password_pepper, generated)" in up.stdout
        yield run
    finally:
        down = run.shipyard("down", str(project))
        assert down.returncode == 0, down.stdout + down.stderr


def public_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def log_in(gateway: str, private_pem: str, email: str = "") -> bool:
    """Signs up and logs in a user through the gateway: True when its token is signed with `private_pem`'s key
    and the gateway accepts it."""
    email = email or f"pepper-{uuid.uuid4().hex[:8]}@example.com"
    with httpx.Client(base_url=gateway, timeout=30) as http:
        http.post("/auth/signup", json={"email": email, "password": "salt and pepper"}).raise_for_status()
        answer = http.post("/auth/login", json={"email": email, "password": "salt and pepper"}).raise_for_status()
        token = str(answer.json()["access_token"])
        try:
            assert jwt.decode(token, public_pem(private_pem), algorithms=["RS256"])["iss"] == "mediahub"
        except jwt.InvalidTokenError:
            return False
        return http.get("/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_key_and_pepper_come_from_the_engine_and_never_touch_the_disk(platform: AuthOnly) -> None:
    secret = platform.engine().secrets.kv.v2.read_secret_version("mediahub/auth", raise_on_deleted_version=True)
    values = secret["data"]["data"]
    assert platform.credential_key() == public_pem(values["jwt_private_key"])  # what the gateway verifies with
    email = f"pepper-{uuid.uuid4().hex[:8]}@example.com"
    assert log_in(platform.gateway, values["jwt_private_key"], email)
    with sqlite3.connect(platform.project / ".data" / "auth" / "users.db") as db:
        stored = db.execute("SELECT password_hash FROM users WHERE email = ?", (email,)).fetchone()[0]
    assert stored.startswith("pepper1$argon2")  # argon2 of HMAC(pepper, password)
    key_lines = [line.encode() for line in values["jwt_private_key"].splitlines()[1:-1]]
    for path in platform.project.rglob("*"):  # server data dir and logs, the services' data and logs
        if path.is_file():
            blob = path.read_bytes()
            assert values["password_pepper"].encode() not in blob, path
            assert not any(line in blob for line in key_lines[2:-2]), path


def test_a_new_key_version_rolls_auth_over_and_the_gateway_follows(platform: AuthOnly) -> None:
    engine = platform.engine()
    values = engine.secrets.kv.v2.read_secret_version("mediahub/auth", raise_on_deleted_version=True)["data"]["data"]
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    engine.secrets.kv.v2.create_or_update_secret("mediahub/auth", secret={**values, "jwt_private_key": new_key})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and platform.credential_key() != public_pem(new_key):
        time.sleep(0.5)
    assert platform.credential_key() == public_pem(new_key)
    deadline = time.monotonic() + 60
    accepted = False
    while time.monotonic() < deadline and not accepted:  # the gateway's workers see the new credential shortly
        try:
            accepted = log_in(platform.gateway, new_key)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert accepted, "no token signed with the new key was accepted by the gateway"
