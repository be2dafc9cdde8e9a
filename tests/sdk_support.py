"""Helpers for the SDK tests: instances of tests/apps/sdk_service.py run as real processes outside the scheduler,
and waits on the catalog through blocking queries (the server tells us when something changed; no sleeps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from support import ServerProcess, free_port, log_tail, wait_until_answering

APP = Path(__file__).parent / "apps" / "sdk_service.py"
SCHEDULER_VARIABLES = ("SHIPYARD_ALLOC_ID", "SHIPYARD_SERVICE", "SHIPYARD_INSTANCE", "PORT", "SHIPYARD_HTTP_ADDR",
                       "CONSUL_HTTP_ADDR", "SHIPYARD_ADDR", "SHIPYARD_CHECK_TTL", "SHIPYARD_DEREGISTER_AFTER")


class ServiceInstance:
    """One `python tests/apps/sdk_service.py` process, as a developer would start it on a laptop."""

    def __init__(self, server: ServerProcess, name: str, log_dir: Path, **env: str) -> None:
        self.server = server
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARIABLES}
        self.env.update(SHIPYARD_ADDR=server.addr, SHIPYARD_SERVICE=name, PORT=str(self.port), **env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service_id(self) -> str:
        return f"{self.name}-127.0.0.1-{self.port}"

    def start(self, timeout: float = 20.0) -> ServiceInstance:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> ServiceInstance:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(APP)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 20.0) -> ServiceInstance:
        assert self.proc is not None
        wait_until_answering(self.proc, self.url + "/health", (200, 503), self.name, self.log_path, timeout)
        return self

    def log_tail(self, n: int = 3000) -> str:
        return log_tail(self.log_path, n)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        stop_all([self])


def stop_all(instances: list[ServiceInstance]) -> None:
    """SIGTERM them all at once, then wait (kill -9 the ones that do not stop)."""
    running = [i for i in instances if i.proc is not None and i.proc.poll() is None]
    for instance in running:
        assert instance.proc is not None
        instance.proc.send_signal(signal.SIGTERM)
    for instance in running:
        assert instance.proc is not None
        try:
            instance.proc.wait(10)
        except subprocess.TimeoutExpired:
            instance.kill9()


def health_entries(server: ServerProcess, name: str, index: int = 0, wait: str = "5s") -> tuple[list[Any], int]:
    params = {"index": str(index), "wait": wait} if index else {}
    r = requests.get(f"{server.url}/v1/health/service/{name}", params=params, timeout=30)
    r.raise_for_status()
    return r.json(), int(r.headers["X-Consul-Index"])


def wait_catalog(server: ServerProcess, name: str, predicate: Callable[[list[Any]], bool],
                 timeout: float = 30.0) -> list[Any]:
    """Blocks (with Consul blocking queries) until the health entries of `name` satisfy `predicate`."""
    deadline = time.monotonic() + timeout
    entries, index = health_entries(server, name)
    while not predicate(entries):
        if time.monotonic() > deadline:
            raise AssertionError(f"catalog of {name} never matched; last: {entries}")
        entries, index = health_entries(server, name, index)
    return entries


def service_check(entry: dict[str, Any]) -> dict[str, Any]:
    """The service's own check in a health entry (not the node's serfHealth)."""
    return next(c for c in entry["Checks"] if c["ServiceID"] == entry["Service"]["ID"])


def statuses(entries: list[Any]) -> dict[str, str]:
    return {e["Service"]["ID"]: service_check(e)["Status"] for e in entries}
