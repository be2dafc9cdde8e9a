"""Secrets at rest and on read, looked at as someone who can read the disk or call the admin API would.

The data dir is 0700 with 0600 files (an older one is narrowed), a key-auth key is shown once and stored only as a
keyed hash (and still admits requests at the gateway), JWT secrets and password hashes are not read back.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support import ServerProcess

PLAIN_KEY = "plaintext-api-key-6c1f0e"
JWT_SECRET = "jwt-hs256-secret-b7d2a9"


def wait_until(what: str, probe: Callable[[], Any], deadline: float = 60.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if value := probe():
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def gateway_status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.ConnectionError:
        return None  # the workers are not listening yet


@pytest.fixture
def upstream() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_data_dir_is_private_and_instances_keep_the_operators_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # as an older version left it
    made_by_instance, made_by_check = tmp_path / "made-by-instance", tmp_path / "made-by-check"
    server = ServerProcess(data_dir, "--no-gateway", "--enable-script-checks").start()
    try:
        spec = {"name": "writer", "cmd": f"echo to-the-log; touch {made_by_instance}; sleep 600",
                "health": {"command": f"touch {made_by_check}"}, "resources": {"cpu": 10, "memory": 16}}
        assert requests.post(f"{server.url}/api/v1/jobs", json=spec, timeout=10).status_code == 201
        assert requests.put(f"{server.url}/v1/kv/some/key", data=b"value", timeout=10).status_code == 200
        wait_until("the instance's and its health command's files", lambda: made_by_instance.exists()
                   and made_by_check.exists())
        logs = wait_until("the instance's stdout log", lambda: [p for p in data_dir.rglob("stdout*")
                                                                 if p.stat().st_size > 0])
        paths = [data_dir, *data_dir.rglob("*")]
        names = {p.name for p in paths}
        assert {"store.db", "store.db-wal", "node-id", "LOCK"} <= names and logs
        too_open = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in paths
                    if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077}
        assert too_open == {}
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(made_by_instance.stat().st_mode) == 0o666 & ~umask
        assert stat.S_IMODE(made_by_check.stat().st_mode) == 0o666 & ~umask
    finally:
        server.stop()


def test_key_auth_key_is_shown_once_stored_as_a_keyed_hash_and_still_admits(tmp_path: Path, upstream: str) -> None:
    server = ServerProcess(tmp_path / "data").start()
    admin = f"{server.url}/api/gateway"
    try:
        assert requests.post(f"{admin}/consumers", json={"username": "ada"}, timeout=10).status_code == 201
        created = requests.post(f"{admin}/consumers/ada/key-auth", json={"key": PLAIN_KEY}, timeout=10)
        assert created.status_code == 201 and created.json()["key"] == PLAIN_KEY  # shown once
        generated = requests.post(f"{admin}/consumers/ada/key-auth", json={}, timeout=10).json()["key"]
        jwt = requests.post(f"{admin}/consumers/ada/jwt", json={"key": "ada-iss", "secret": JWT_SECRET}, timeout=10)
        assert jwt.status_code == 201 and jwt.json()["secret"] == JWT_SECRET  # shown once
        requests.post(f"{admin}/consumers/ada/basic-auth", json={"username": "ada", "password": "pw-9f3"}, timeout=10)

        for kind in ("key-auth", "jwt", "basic-auth"):
            listed = requests.get(f"{admin}/consumers/ada/{kind}", timeout=10)
            text = listed.text
            assert listed.status_code == 200 and listed.json()["data"]
            assert PLAIN_KEY not in text and generated not in text and JWT_SECRET not in text
            assert "key_hash" not in text and "scrypt" not in text
        one = requests.get(f"{admin}/consumers/ada/key-auth/{PLAIN_KEY}", timeout=10)
        assert one.status_code == 200 and "key" not in one.json()  # found by its key, as Kong allows
        assert requests.post(f"{admin}/consumers/ada/key-auth", json={"key": PLAIN_KEY},
                             timeout=10).status_code == 409

        kvs = requests.get(f"{server.url}/api/v1/store/kv/gateway/?prefix=1", timeout=10).json()["kvs"]
        store_dump = " ".join(kv["key"] + base64.b64decode(kv["value"]).decode() for kv in kvs)
        assert PLAIN_KEY not in store_dump and generated not in store_dump and "hmac-sha256:" in store_dump
        on_disk = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("store.db*"))
        assert PLAIN_KEY.encode() not in on_disk and generated.encode() not in on_disk

        requests.post(f"{admin}/services", json={"name": "up", "url": upstream}, timeout=10)
        requests.post(f"{admin}/services/up/routes", json={"paths": ["/ka"]}, timeout=10)
        requests.post(f"{admin}/services/up/plugins", json={"name": "key-auth"}, timeout=10)
        wait_until("key-auth on the route", lambda: gateway_status(server.gateway_url + "/ka") == 401)
        for key in (PLAIN_KEY, generated):
            assert requests.get(f"{server.gateway_url}/ka", headers={"apikey": key}, timeout=10).text == "ok"
        assert requests.get(f"{server.gateway_url}/ka", headers={"apikey": "wrong"}, timeout=10).status_code == 401
    finally:
        server.stop()


def test_a_key_stored_in_clear_by_an_older_version_is_hashed_at_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old = ServerProcess(data_dir, "--no-gateway").start()
    try:
        consumer = {"id": "c-old", "username": "old", "custom_id": None, "tags": [], "created_at": 1, "updated_at": 1}
        cred = {"id": "k-old", "kind": "key-auth", "consumer": "c-old", "key": PLAIN_KEY, "tags": [],
                "created_at": 1, "updated_at": 1}
        for key, record in (("gateway/consumers/c-old", consumer), ("gateway/credentials/key-auth/k-old", cred)):
            r = requests.put(f"{old.url}/api/v1/store/kv/{key}", data=json.dumps(record), timeout=10)
            assert r.status_code == 200, r.text
    finally:
        old.stop()
    new = ServerProcess(data_dir, "--no-gateway").start()
    try:
        kvs = requests.get(f"{new.url}/api/v1/store/kv/gateway/credentials/?prefix=1", timeout=10).json()["kvs"]
        (stored,) = [json.loads(base64.b64decode(kv["value"])) for kv in kvs]
        assert "key" not in stored and stored["key_hash"].startswith("hmac-sha256:")
        admin = f"{new.url}/api/gateway/consumers/old/key-auth"
        assert requests.get(f"{admin}/{PLAIN_KEY}", timeout=10).json()["id"] == "k-old"
        assert requests.post(admin, json={"key": PLAIN_KEY}, timeout=10).status_code == 409
    finally:
        new.stop()
