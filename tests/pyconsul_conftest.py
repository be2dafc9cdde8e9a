"""Stand-in for py-consul's top-level conftest.py: its fixtures start a real `shipyard server --dev` per test.

Copied as conftest.py next to the vendored suite by tests/test_pyconsul_upstream.py; never imported by our own run.
Upstream starts a fresh Consul container for every test; this starts a fresh server for every test too, and keeps
one more starting in the background so that a test does not wait for a whole start-up.
"""

from __future__ import annotations

import collections
import os
import subprocess
import uuid
from collections.abc import Iterator
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

    def launch(self) -> ServerProcess:
        proc = ServerProcess(DATA_ROOT / f"srv-{uuid.uuid4().hex[:8]}", "--no-gateway", "--enable-script-checks",
                             dev=True)
        log = open(proc.log_path, "ab")
        proc.proc = subprocess.Popen(proc.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc

    def take(self) -> ServerProcess:
        proc = self.spare or self.launch()
        self.spare = self.launch()
        assert proc.proc is not None
        wait_until_answering(proc.proc, proc.url + "/v1/status/leader", (200,), "server", proc.log_path, 60)
        return proc

    def close(self) -> None:
        if self.spare is not None:
            self.spare.stop()


POOL = ServerPool()


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> Iterator[None]:
    os.environ.pop("CONSUL_HTTP_TOKEN", None)
    yield
    POOL.close()


def consul_version(port: int) -> str:
    response = requests.get(f"http://127.0.0.1:{port}/v1/agent/self", timeout=10)
    return str(response.json()["Config"]["Version"]).strip()


def started_instance() -> Iterator[ConsulInstance]:
    proc = POOL.take()
    try:
        yield ConsulInstance(proc, proc.http_port, consul_version(proc.http_port))
    finally:
        proc.stop()


@pytest.fixture
def consul_instance() -> Iterator[ConsulInstance]:
    yield from started_instance()


@pytest.fixture
def acl_consul_instance() -> Iterator[tuple[ConsulInstance, str]]:
    # Upstream starts Consul with ACLs enabled and this initial management token; Shipyard's ACL system comes
    # with its own issue, so until then these tests meet a server without ACLs (listed as expected failures).
    for instance in started_instance():
        yield instance, uuid.uuid4().hex


@pytest.fixture
def consul_port(consul_instance: ConsulInstance) -> tuple[int, str]:
    return consul_instance.port, consul_instance.version
