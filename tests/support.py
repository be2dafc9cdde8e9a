"""Helpers for integration tests: free ports and a real `shipyard server` process.

Tests use these to talk to the server the way any client would; nothing here reaches inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

REQUIRE_PEERS = os.environ.get("SHIPYARD_REQUIRE_PEERS") == "1"


# Under pytest-xdist each worker takes ports from its own slice of 10000-19999: below the kernel's ephemeral range
# (32768+, where outgoing connections take theirs) and the agents' instance range (20000-32000), so two workers
# never hand out the same port, and a port handed out is not taken by some client's connection before its server
# binds it. Without xdist the kernel picks, as before.
_WORKER_PORTS = 2500
_port_cursor: list[int] = []


def _port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):  # DNS listens on both
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    low = 10000 + (int(worker[2:]) % 4) * _WORKER_PORTS
    if not _port_cursor:
        _port_cursor.append(low + os.getpid() % _WORKER_PORTS)
    for _ in range(_WORKER_PORTS):
        port = _port_cursor[0]
        _port_cursor[0] = low + (port + 1 - low) % _WORKER_PORTS
        if _port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {low}-{low + _WORKER_PORTS - 1}")


def log_tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_until_answering(proc: subprocess.Popen[bytes], url: str, statuses: tuple[int, ...], what: str,
                         log_path: Path, timeout: float) -> None:
    """Waits until `url` answers with one of `statuses`; fails at once, with the log's tail, if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log_tail(log_path, 4000)}")
        try:
            if requests.get(url, timeout=1).status_code in statuses:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready: {log_tail(log_path, 4000)}")


def need_peer(name: str, available: bool, why: str) -> None:
    """Skip when a peer is absent, except under SHIPYARD_REQUIRE_PEERS=1 (CI), where it fails."""
    if available:
        return
    if REQUIRE_PEERS:
        pytest.fail(f"required peer {name} is missing: {why}")
    pytest.skip(f"peer {name} is missing: {why}")


def need_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    need_peer(name, path is not None, f"{name} not on PATH (apt-get install it)")
    assert path is not None
    return path


def acl_token(url: str, management: str, name: str, rules: str, *, verify: bool | str = True) -> str:
    """The SecretID of a new token of one new policy `name` with `rules`, made with the management token as an
    operator makes one (PUT /v1/acl/policy, then /v1/acl/token)."""
    headers = {"X-Consul-Token": management}
    policy = requests.put(url + "/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=headers, timeout=10,
                          verify=verify)
    assert policy.status_code == 200, policy.text
    token = requests.put(url + "/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]}, headers=headers,
                         timeout=10, verify=verify)
    assert token.status_code == 200, token.text
    return str(token.json()["SecretID"])


def rabbit_up() -> bool:
    """Whether this machine's RabbitMQ answers on its standard port (the bus tests need it)."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Polls `check` until it is truthy (a failed HTTP call counts as not yet); the timeout bounds, not measures."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except requests.RequestException as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_until_ready(proc: subprocess.Popen[bytes], log_path: Path, offset: int, timeout: float) -> None:
    """Waits for "shipyard server ready" in the log after `offset` (this start's part): the API answers before
    that, while its node agent registers the node and the gateway workers come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            f.seek(offset)
            if b"shipyard server ready" in f.read():
                return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_tail(log_path, 4000)}")
        time.sleep(0.05)
    raise RuntimeError(f"server did not say ready: {log_tail(log_path, 4000)}")


class ServerProcess:
    """A real `shipyard server` on free ports in its own data dir."""

    def __init__(self, data_dir: Path, *extra: str, dev: bool = False) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.dev = dev
        self.http_port = free_port()
        self.dns_port = free_port()
        self.gateway_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--http-port", str(self.http_port)]
        cmd += ["--dns-port", str(self.dns_port)]
        if "--no-gateway" not in self.extra and "--gateway-port" not in self.extra:
            cmd += ["--gateway-port", str(self.gateway_port), "--gateway-workers", "1"]
        cmd += ["--dev"] if self.dev else ["--data-dir", str(self.data_dir)]
        return cmd + self.extra

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_answering(self.proc, self.url + "/v1/status/leader", (200,), "server", self.log_path, timeout)
        wait_until_ready(self.proc, self.log_path, offset, timeout)
        return self

    def log_tail(self, n: int = 4000) -> str:
        return log_tail(self.log_path, n)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, *, keep_instances: bool = False) -> None:
        """SIGTERM the server. Its instances outlive it under their shims (as in production, for adoption by the
        next server); unless keep_instances, they are then stopped too, so that a test leaves nothing running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)  # a loaded CI machine (two test workers) can take a while to drain
            except subprocess.TimeoutExpired:
                self.kill9()
        if not keep_instances:
            self.stop_instances()

    def stop_instances(self) -> None:
        """SIGTERM every instance shim still running from this server's data dir (each stops its instance)."""
        for state_file in (self.data_dir / "agent" / "instances").glob("*/state.json"):
            try:
                state = json.loads(state_file.read_text())
                stat = Path(f"/proc/{state['shim_pid']}/stat").read_bytes()
            except (OSError, ValueError, KeyError):
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] not in (b"Z", b"X") and int(fields[19]) == state.get("shim_start_time"):
                try:
                    os.kill(state["shim_pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def restart(self) -> ServerProcess:
        self.stop(keep_instances=True)
        return self.start()



class LoopbackServer(ServerProcess):
    """A server on its own loopback address (127.0.0.2, ...), as if on its own machine: cluster tests' hosts."""

    def __init__(self, data_dir: Path, address: str, name: str, *args: str) -> None:
        super().__init__(data_dir, *args, "--bind", address, "--node", name, "--vault-port", "0")
        self.address = address
        self.name = name

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def addr(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address}:{self.gateway_port}"


class EtcdProcess:
    """A private etcd (Debian's etcd-server) on free ports in a temporary data dir."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.binary = need_binary("etcd")
        self.data_dir = data_dir
        self.args = args  # more etcd flags (--max-txn-ops 8, ...)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        log = open(self.data_dir.parent / f"{self.data_dir.name}-etcd.log", "ab")
        self.proc = subprocess.Popen(
            [
                self.binary, "--name", "test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}", *self.args,
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.post(self.url + "/v3/maintenance/status", json={}, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
