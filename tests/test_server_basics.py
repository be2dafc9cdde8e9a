"""The server process itself: startup, data-dir lock, bind policy, unknown endpoints."""

from __future__ import annotations

import subprocess
import sys

import requests

from support import ServerProcess, free_port


def test_status_leader_and_peers(client) -> None:
    assert client.status.leader().endswith(":8300")
    assert len(client.status.peers()) == 1


def test_unknown_endpoint_is_consul_404(server: ServerProcess) -> None:
    r = requests.get(server.url + "/v1/does/not/exist")
    assert r.status_code == 404
    assert "404 page not found" in r.text


def test_second_server_on_same_data_dir_refuses(server: ServerProcess) -> None:
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(server.data_dir)]
    cmd += ["--http-port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "in use by another shipyard server" in done.stderr
    assert "Traceback" not in done.stderr
    # the first one keeps serving
    assert requests.get(server.url + "/v1/status/leader").status_code == 200


def test_non_loopback_bind_refused_without_flag(tmp_path) -> None:
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--bind", "0.0.0.0"]
    cmd += ["--http-port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "non-loopback" in done.stderr
    assert "Traceback" not in done.stderr
