"""Stand-in for py-consul's top-level conftest.py: its fixtures start a real `shipyard server --dev` per test.

Copied as conftest.py next to the vendored suite by tests/test_pyconsul_upstream.py; never imported by our own run.
Upstream starts a fresh Consul container for every test; this starts a fresh server for every test too, and keeps
one more starting in the background so that a test does not wait for a whole start-up.

Upstream's HTTP checks probe http://localhost:8500 and expect it to pass: inside the container that is the Consul
agent's own port. Here each server is on a free port, so while the suite runs something must answer 200 on
127.0.0.1:8500: a small responder is started there when the port is free (when it is taken, what listens there is
what the checks probe).
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from support import ServerProcess, wait_until_answering

ConsulInstance = collections.namedtuple("ConsulInstance", ["container", "port", "version"])

DATA_ROOT = Path(os.environ.get("PYCONSUL_SERVERS_DIR", "/tmp"))


class ServerPool:
    """Hands out fresh dev servers; the next one is already starting while a test runs."""

    def __init__(self) -> None:
        self.spare: ServerProcess | None = None

    def launch(self, *extra: str) -> ServerProcess:
        # --node-agent embedded: py-consul counts the tokens of a fresh cluster (an agent process holds one), never
        # runs a scheduled instance, and starts a server per test.
        proc = ServerProcess(DATA_ROOT / f"srv-{uuid.uuid4().hex[:8]}", "--no-gateway", "--enable-script-checks",
                             "--node-agent", "embedded",
                             *extra, dev=True)
        log = open(proc.log_path, "ab")
        proc.proc = subprocess.Popen(proc.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc

    def take(self, *extra: str) -> ServerProcess:
        """A started server; with `extra` arguments one of its own (the spare is a plain one)."""
        if extra:
            proc = self.launch(*extra)
        else:
            proc = self.spare or self.launch()
            self.spare = self.launch()
        assert proc.proc is not None
        wait_until_answering(proc.proc, proc.url + "/v1/status/leader", (200,), "server", proc.log_path, 60)
        return proc

    def close(self) -> None:
        if self.spare is not None:
            self.spare.stop()


POOL = ServerPool()


class AgentPortAnswer(BaseHTTPRequestHandler):
    """What the checks probing localhost:8500 get from a Consul agent there: 200 and a small body."""

    def do_GET(self) -> None:
        body = b'"127.0.0.1:8300"'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def agent_port_responder() -> ThreadingHTTPServer | None:
    with contextlib.suppress(OSError):
        responder = ThreadingHTTPServer(("127.0.0.1", 8500), AgentPortAnswer)
        threading.Thread(target=responder.serve_forever, daemon=True).start()
        return responder
    return None


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> Iterator[None]:
    os.environ.pop("CONSUL_HTTP_TOKEN", None)
    responder = agent_port_responder()
    yield
    POOL.close()
    if responder is not None:
        responder.shutdown()


def consul_version(port: int, token: str = "") -> str:
    response = requests.get(f"http://127.0.0.1:{port}/v1/agent/self", headers={"X-Consul-Token": token}, timeout=10)
    return str(response.json()["Config"]["Version"]).strip()


def started_instance(*extra: str, token: str = "") -> Iterator[ConsulInstance]:
    proc = POOL.take(*extra)
    try:
        yield ConsulInstance(proc, proc.http_port, consul_version(proc.http_port, token))
    finally:
        proc.stop()


@pytest.fixture
def consul_instance() -> Iterator[ConsulInstance]:
    yield from started_instance()


@pytest.fixture
def acl_consul_instance() -> Iterator[tuple[ConsulInstance, str]]:
    # Upstream: Consul with ACLs enabled (default policy deny) and this initial management token.
    token = str(uuid.uuid4())
    for instance in started_instance("--acl", "--acl-initial-management", token, token=token):
        yield instance, token


@pytest.fixture
def consul_port(consul_instance: ConsulInstance) -> tuple[int, str]:
    return consul_instance.port, consul_instance.version
