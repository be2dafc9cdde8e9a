"""The route table as a pure function of store contents, and the balancers (in-process: both are pure values)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any

import orjson

from shipyard.gateway.balancer import ConsistentHash, HealthBoard, LeastConnections, RoundRobin
from shipyard.gateway.routes import BalancingSpec, Target
from shipyard.gateway.table import build_route_table


def contents(**entries: Any) -> dict[str, bytes]:
    return {key.replace("__", "/"): orjson.dumps(value) for key, value in entries.items()}


def svc(name: str, port: int, tags: list[str], sid: str | None = None, node: str = "n1",
        weights: dict[str, int] | None = None) -> tuple[str, bytes]:
    sid = sid or f"{name}-{port}"
    record = {"ID": sid, "Service": name, "Tags": tags, "Address": "127.0.0.1", "Port": port}
    if weights:
        record["Weights"] = weights
    return f"catalog/services/{node}/{sid}", orjson.dumps(record)


def check(sid: str, status: str, node: str = "n1") -> tuple[str, bytes]:
    return f"catalog/checks/{node}/service:{sid}", orjson.dumps(
        {"CheckID": f"service:{sid}", "ServiceID": sid, "Status": status, "Node": node})


def test_urlprefix_tags_route_by_host_and_longest_prefix() -> None:
    store = dict([
        svc("api", 9001, ["urlprefix-/api"]),
        svc("users", 9002, ["urlprefix-/api/users strip=/api"]),
        svc("shop", 9003, ["urlprefix-shop.example.com/", "not-a-route"]),
    ])
    table = build_route_table(store)
    m = table.match(b"GET", b"localhost", b"/api/users/7")
    assert m is not None and m.backend.name == "users" and m.upstream_path == b"/users/7"
    m = table.match(b"GET", b"localhost", b"/api/orders")
    assert m is not None and m.backend.name == "api" and m.upstream_path == b"/api/orders"
    m = table.match(b"GET", b"shop.example.com", b"/api/x")
    assert m is not None and m.backend.name == "shop"  # a host route wins over host-less ones
    assert table.match(b"GET", b"localhost", b"/nothing") is None


def test_only_passing_and_warning_instances_are_targets_with_their_weights() -> None:
    store = dict([
        svc("web", 9001, ["urlprefix-/"], sid="a", weights={"Passing": 3, "Warning": 1}),
        svc("web", 9002, ["urlprefix-/"], sid="b", weights={"Passing": 3, "Warning": 1}),
        svc("web", 9003, ["urlprefix-/"], sid="c"),
        check("a", "passing"), check("b", "warning"), check("c", "critical"),
    ])
    m = build_route_table(store).match(b"GET", b"h", b"/")
    assert m is not None
    assert {(t.port, t.weight) for t in m.backend.spec.targets} == {(9001, 3), (9002, 1)}


def test_admin_entities_regex_methods_headers_and_strip_path() -> None:
    store = contents(**{
        "gateway__services__orders": {"name": "orders", "host": "orders-up", "path": "/v2",
                                      "connect_timeout": 1500},
        "gateway__upstreams__orders-up": {"name": "orders-up", "algorithm": "least-connections"},
        "gateway__targets__orders-up__t1": {"target": "10.0.0.1:80", "weight": 100},
        "gateway__routes__r1": {"id": "r1", "service": "orders", "paths": ["/orders"], "methods": ["GET"]},
        "gateway__routes__r2": {"id": "r2", "service": "orders", "regex_paths": [{"pattern": r"/o/\d+$",
                                                                                   "priority": 5}]},
        "gateway__routes__r3": {"id": "r3", "service": "orders", "paths": ["/beta"],
                                "headers": {"x-version": ["2"]}, "strip_path": False},
    })
    table = build_route_table(store)
    m = table.match(b"GET", b"h", b"/orders/1")
    assert m is not None and m.route.spec.id == "r1" and m.upstream_path == b"/v2/1"
    assert m.backend.spec.connect_timeout == 1.5 and type(m.backend.balancer) is LeastConnections
    assert m.backend.spec.targets == (Target("10.0.0.1", 80, 100),)
    assert table.match(b"POST", b"h", b"/orders/1") is None
    m = table.match(b"DELETE", b"h", b"/o/42")
    assert m is not None and m.route.spec.id == "r2"
    assert table.match(b"GET", b"h", b"/beta", lambda: {"x-version": "1"}) is None
    m = table.match(b"GET", b"h", b"/beta/x", lambda: {"x-version": "2"})
    assert m is not None and m.upstream_path == b"/v2/beta/x"


def test_job_spec_routes_are_routes_of_the_registered_service() -> None:
    job = {"id": "billing", "version": 1, "status": "running", "spec": {
        "name": "billing", "kind": "service",
        "routes": [{"paths": ["/billing"], "strip_path": True, "methods": ["GET", "POST"]}],
    }}
    store = {**contents(jobs__billing=job), **dict([svc("billing", 9100, [])])}
    m = build_route_table(store).match(b"POST", b"h", b"/billing/invoices")
    assert m is not None and m.backend.name == "billing" and m.upstream_path == b"/invoices"
    assert m.backend.spec.targets[0].port == 9100
    stopped = {**store, **contents(jobs__billing={**job, "status": "stopped"})}
    assert build_route_table(stopped).match(b"GET", b"h", b"/billing") is None


def test_bad_records_are_skipped_not_fatal() -> None:
    store = {"gateway/routes/bad": b"{not json", "gateway/routes/no-service": orjson.dumps({"paths": ["/x"]}),
             **dict([svc("ok", 9200, ["urlprefix-/ok"])]),
             **contents(**{"gateway__routes__re": {"service": "ok", "regex_paths": ["(unclosed"]}})}
    table = build_route_table(store)
    assert table.match(b"GET", b"h", b"/ok") is not None


def test_smooth_weighted_round_robin_spreads_a_canary_evenly() -> None:
    rr = RoundRobin((Target("a", 1, 9), Target("b", 1, 1)), BalancingSpec())
    board = HealthBoard()
    picks = [rr.pick(board).host for _ in range(100)]  # type: ignore[union-attr]
    assert Counter(picks) == {"a": 90, "b": 10}
    positions = [i for i, p in enumerate(picks) if p == "b"]
    assert all(b - a == 10 for a, b in pairwise(positions))


def test_passive_health_ejects_after_consecutive_failures() -> None:
    spec = BalancingSpec(failures=2, eject_seconds=30)
    rr = RoundRobin((Target("a", 1), Target("b", 1)), spec)
    board = HealthBoard()
    assert not board.report_failure("a:1", spec)
    board.report_success("a:1")  # resets the streak
    assert not board.report_failure("a:1", spec)
    assert board.report_failure("a:1", spec)
    assert {rr.pick(board).host for _ in range(10)} == {"b"}  # type: ignore[union-attr]
    # With every instance out, the one whose ejection ends first is tried rather than failing outright.
    assert rr.pick(board, exclude={"b:1"}).host == "a"  # type: ignore[union-attr]


def test_consistent_hash_keeps_keys_and_moves_only_a_leaving_instances_keys() -> None:
    spec = BalancingSpec(algorithm="consistent-hashing", hash_on="header")
    three = ConsistentHash((Target("a", 1), Target("b", 1), Target("c", 1)), spec)
    two = ConsistentHash((Target("a", 1), Target("b", 1)), spec)
    board = HealthBoard()
    keys = [f"user-{i}".encode() for i in range(300)]
    before = {k: three.pick(board, k).host for k in keys}  # type: ignore[union-attr]
    assert before == {k: three.pick(board, k).host for k in keys}  # type: ignore[union-attr]
    assert set(Counter(before.values())) == {"a", "b", "c"}
    after = {k: two.pick(board, k).host for k in keys}  # type: ignore[union-attr]
    assert all(after[k] == before[k] for k in keys if before[k] != "c")


def test_least_connections_prefers_the_idle_instance() -> None:
    lc = LeastConnections((Target("a", 1), Target("b", 1)), BalancingSpec(algorithm="least-connections"))
    board = HealthBoard()
    board.state("a:1").active = 3
    assert {lc.pick(board).host for _ in range(5)} == {"b"}  # type: ignore[union-attr]
