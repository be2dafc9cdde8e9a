"""Shared fixtures: a real server per test module, and a py-consul client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from support import ServerProcess

# pytest-xdist (`make test` runs two workers with --dist loadgroup): a module's tests stay on one worker, so its
# module-scoped server starts once; modules that share one machine-wide peer by name (RabbitMQ's exchanges and
# queues; network namespaces and their bridge) run one after another on the same worker.
SHARED_PEER_MODULES = {
    "rabbitmq": {"test_bus.py", "test_cluster_servers.py", "test_node_drain.py", "test_queues_cli.py",
                 "test_worker.py"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue  # a test that names its group (e.g. "netns") keeps it
        module = item.path.name
        group = next((name for name, modules in SHARED_PEER_MODULES.items() if module in modules), module)
        item.add_marker(pytest.mark.xdist_group(group))


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
