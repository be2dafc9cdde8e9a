"""PortAllocator: free, distinct, range-bound ports; static ports honoured; no port handed out twice."""

from __future__ import annotations

import socket

import pytest

from shipyard.agent.ports import PortAllocator, PortsExhausted, port_is_free
from shipyard.errors import Conflict


def test_dynamic_ports_are_free_distinct_and_in_range() -> None:
    allocator = PortAllocator((20000, 32000))
    seen: set[int] = set()
    for _ in range(20):
        ports = allocator.allocate(["http", "admin", "metrics"])
        assert list(ports) == ["http", "admin", "metrics"]
        for port in ports.values():
            assert 20000 <= port <= 32000
            assert port not in seen
            seen.add(port)
            assert port_is_free(port)
    assert allocator.allocated == seen


def test_port_in_use_is_skipped() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        allocator = PortAllocator((port, port + 1))
        if not port_is_free(port + 1):
            pytest.skip(f"port {port + 1} happens to be busy")
        assert allocator.allocate(["http"]) == {"http": port + 1}
        with pytest.raises(PortsExhausted):
            allocator.allocate(["again"])
    finally:
        busy.close()


def test_static_ports_honoured_and_conflicts_refused() -> None:
    allocator = PortAllocator((21000, 21100))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    static = probe.getsockname()[1]
    probe.close()
    ports = allocator.allocate(["http", "admin"], static={"admin": static})
    assert ports["admin"] == static
    assert 21000 <= ports["http"] <= 21100
    with pytest.raises(Conflict, match=str(static)):
        allocator.allocate(["web"], static={"web": static})  # handed out already
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(Conflict):
            allocator.allocate([], static={"db": busy.getsockname()[1]})  # bound by someone else
    finally:
        busy.close()
    allocated_before = allocator.allocated
    with pytest.raises(Conflict):
        allocator.allocate(["a", "b"], static={"b": static})
    assert allocator.allocated == allocated_before  # all or nothing


def test_release_and_reserve() -> None:
    allocator = PortAllocator((22000, 22002))
    ports = allocator.allocate(["a", "b", "c"])
    with pytest.raises(PortsExhausted):
        allocator.allocate(["d"])
    allocator.release([ports["b"]])
    assert allocator.allocate(["d"]) == {"d": ports["b"]}
    allocator.release(allocator.allocated)
    allocator.reserve([22001])  # an adopted instance holds it
    assert 22001 not in allocator.allocate(["x", "y"]).values()
