"""The Consul KV, session, txn and catalog suites again, with the server's state in a real etcd.

Same test functions, different store: this is the proof that nothing above the store depends on
which backend runs (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import EtcdProcess, ServerProcess
from test_consul_catalog import *  # noqa: F403  (collected again here, against the etcd-backed server)
from test_consul_kv import *  # noqa: F403
from test_consul_sessions import *  # noqa: F403
from test_consul_txn import *  # noqa: F403


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("on-etcd")
    etcd = EtcdProcess(base / "etcd").start()
    proc = ServerProcess(base / "data", "--store", f"etcd://127.0.0.1:{etcd.client_port}/shipyard-test",
                         "--single-server")  # the only server on this etcd, with the embedded bus
    proc.start()
    yield proc
    proc.stop()
    etcd.stop()
