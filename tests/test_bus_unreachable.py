"""`--bus amqp://...` with nothing there: the server says so at start and keeps retrying; `shipyard queues` and
GET /api/v1/health show the bus state; once the broker answers (here: a forwarder to the real RabbitMQ opened on
the port the server was given), both show it up without a restart."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import ServerProcess, free_port, need_peer, rabbit_up


class Forwarder:
    """A TCP forwarder from `port` to RabbitMQ on 5672: the broker "comes back" on the port the server was given."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5672))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def queues(addr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "queues", "--http-addr", addr],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def broker_port() -> int:
    return free_port()  # nothing listens there (yet)


@pytest.fixture
def rabbit_server(tmp_path: Path, broker_port: int) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", "--no-gateway", "--bus",
                         f"amqp://guest:guest@127.0.0.1:{broker_port}/").start()
    yield proc
    proc.stop()


def wait_for_health(server: ServerProcess, status: int) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while True:
        answer = requests.get(server.url + "/api/v1/health", timeout=5)
        if answer.status_code == status or time.monotonic() > deadline:
            assert answer.status_code == status, answer.text
            return dict(answer.json())
        time.sleep(0.2)


def test_unreachable_bus_is_said_at_start_shown_and_retried(rabbit_server: ServerProcess, broker_port: int) -> None:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    address = f"127.0.0.1:{broker_port}/"
    # At start, before "ready": one warning line naming the broker, not a traceback.
    log = rabbit_server.log_tail(20000)
    assert f"bus: RabbitMQ at {address} is unreachable (" in log, log
    assert f"bus rabbitmq at {address}: unreachable (retrying)" in log
    assert "guest:guest" not in log  # credentials stay out of the log

    health = wait_for_health(rabbit_server, 503)
    bus = health["checks"]["bus"]  # type: ignore[index]
    assert health["status"] == "critical" and bus["state"] == "unreachable" and bus["address"] == address
    assert "Connect call failed" in bus["error"] or "refused" in bus["error"].lower(), bus

    done = queues(rabbit_server.addr)
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: bus: rabbitmq at {address}: unreachable"), done.stderr
    assert "the server keeps retrying" in done.stderr
    assert "no queues yet" not in done.stdout

    # The broker appears on that port: the server's own retrying finds it (no restart).
    forwarder = Forwarder(broker_port)
    try:
        health = wait_for_health(rabbit_server, 200)
        assert health["checks"]["bus"]["state"] == "up"  # type: ignore[index]
        done = queues(rabbit_server.addr)
        assert done.returncode == 0, done.stderr
        assert done.stdout.endswith(f"bus: rabbitmq at {address}: up\n"), done.stdout
        assert "bus: connected to RabbitMQ at " + address in rabbit_server.log_tail(20000)
    finally:
        rabbit_server.stop()
        forwarder.close()


def test_embedded_bus_health_is_passing(server: ServerProcess) -> None:
    answer = requests.get(server.url + "/api/v1/health", timeout=5)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "passing"
    assert body["checks"]["bus"] == {"status": "passing", "backend": "embedded", "address": "", "state": "up",
                                     "error": "", "since": 0.0}
    assert body["checks"]["gateway"]["status"] == "passing" and body["checks"]["gateway"]["workers"] >= 1
