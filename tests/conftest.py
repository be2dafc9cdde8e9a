"""Shared fixtures: a real server per test module, and a py-consul client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("server") / "data"
    proc = ServerProcess(data_dir).start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=server.http_port)
