"""A taken port (control, DNS, gateway) is one clear line and exit 1 at start, from `shipyard server` and from
`shipyard up`; a CLI pointed at something that is not a Shipyard server says so in one line; `up` takes the ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import free_port, wait_until_answering

SHIPYARD = [sys.executable, "-m", "shipyard.cli.main"]


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHIPYARD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def taken_tcp() -> Iterator[int]:
    """A port held by another program (this test process), listening."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def holder() -> str:
    """How the server names this test process when it holds a port: pid and command name."""
    return f"pid {os.getpid()} {Path('/proc/self/comm').read_text().strip()}"


def assert_one_line(done: subprocess.CompletedProcess[str], port: int, option: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: port {port} is in use (by {holder()}); use {option} to choose another"
    ], done.stderr


@pytest.mark.parametrize("option", ["--gateway-port", "--http-port"])
def test_server_with_a_taken_tcp_port_is_one_line(tmp_path: Path, taken_tcp: int, option: str) -> None:
    ports = {"--http-port": str(free_port()), "--dns-port": str(free_port()), "--gateway-port": str(free_port())}
    ports[option] = str(taken_tcp)
    done = run("server", "--data-dir", str(tmp_path / "data"), *[x for kv in ports.items() for x in kv])
    assert_one_line(done, taken_tcp, option)
    # Nothing ran: not even the data dir was made.
    assert not (tmp_path / "data").exists()


def test_server_with_a_taken_dns_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        done = run("server", "--dev", "--http-port", str(free_port()), "--dns-port", str(port), "--no-gateway")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: port {port}/udp is in use (by {holder()}); use --dns-port to choose another"
    ], done.stderr


def test_cli_against_another_program_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "index.html").write_text("<html><body>not shipyard</body></html>")
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(other, f"http://127.0.0.1:{port}/", (200,), "http.server", tmp_path / "none", 30)
        project = _project(tmp_path)
        for args in (["ps"], ["kv", "get", "a"], ["queues"], ["services"], ["up", str(project)]):
            done = run(*args, "--http-addr", f"127.0.0.1:{port}")
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            assert "<html" not in done.stdout + done.stderr
            assert done.stderr.count("\n") == 1
            assert done.stderr.startswith(f"error: http://127.0.0.1:{port} is not a Shipyard server"), done.stderr
        assert not (project / ".shipyard").exists()  # up started no server of its own on top
    finally:
        other.terminate()
        other.wait(10)


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "shipyard.yaml").write_text(
        "services:\n  sleeper:\n    cmd: python -c 'import time; time.sleep(600)'\n    instances: 1\n"
    )
    return project


def test_up_with_a_taken_gateway_port_is_one_line(tmp_path: Path, taken_tcp: int) -> None:
    project = _project(tmp_path)
    http_port = free_port()
    done = run("up", "--http-port", str(http_port), "--dns-port", str(free_port()), "--gateway-port", str(taken_tcp),
               cwd=project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"port {taken_tcp} is in use (by pid {os.getpid()}" in done.stderr
    assert "use --gateway-port" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{http_port}/v1/status/leader", timeout=2)


def test_up_starts_its_server_on_the_ports_given(tmp_path: Path) -> None:
    project = _project(tmp_path)
    http_port, gateway_port, dns_port = free_port(), free_port(), free_port()
    done = run("up", "--http-port", str(http_port), "--gateway-port", str(gateway_port), "--dns-port", str(dns_port),
               cwd=project)
    pid_file = project / ".shipyard" / "server.pid"
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "all services healthy" in done.stdout
        # The gateway answers on the port given (no route: Kong's 404 body), DNS on its port.
        answer = requests.get(f"http://127.0.0.1:{gateway_port}/nothing-here", timeout=5)
        assert answer.status_code == 404 and "no Route matched" in answer.text
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
            udp.bind(("127.0.0.1", dns_port))
        listed = run("ps", "--http-addr", f"127.0.0.1:{http_port}")
        assert listed.returncode == 0 and "sleeper" in listed.stdout
    finally:
        run("down", "--http-addr", f"127.0.0.1:{http_port}", cwd=project)
        if pid_file.exists():  # down did not get to it: leave nothing running
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_server_is_not_ready_while_its_gateway_workers_crash_at_start(tmp_path: Path) -> None:
    # The port is free, but every worker exits at start: here its shared counters file is a directory.
    data = tmp_path / "data"
    (data / "gateway-counters").mkdir(parents=True)
    done = run("server", "--data-dir", str(data), "--http-port", str(free_port()), "--dns-port", str(free_port()),
               "--gateway-port", str(free_port()), "--gateway-workers", "1")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "shipyard server ready" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the gateway workers exit at start (exit code 1); the lines above say why "
        "(use --gateway-port to choose another port, or --no-gateway)")


def test_server_with_one_port_for_two_listeners_is_one_line() -> None:
    port = free_port()
    done = run("server", "--dev", "--http-port", str(port), "--dns-port", "0", "--gateway-port", str(port))
    assert done.returncode == 1
    assert done.stderr == f"error: --gateway-port {port} is also --http-port: give each listener its own port\n"
