"""Placement rules (constraints, distinct hosts/property, spread), why an instance fits nowhere, and node drain and
eligibility, through the pure planner driven step by step as in test_planner."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from shipyard.scheduler import Node
from shipyard.scheduler.feasibility import version_matches
from shipyard.spec import Constraint, Resources, Spread, TaskSpec, UpdatePolicy
from test_planner import Cluster, converge


def rack_nodes() -> list[Node]:
    """Four nodes in two racks and two classes, with the attributes an agent writes."""
    def node(name: str, rack: str, cls: str, kernel: str, arch: str = "amd64") -> Node:
        return Node(name, 1000, 1024, {"kernel.name": "linux", "kernel.version": kernel, "cpu.arch": arch},
                    node_class=cls, meta={"rack": rack})
    return [node("n1", "r1", "web", "6.1.0-18-amd64"), node("n2", "r1", "web", "4.19.0"),
            node("n3", "r2", "db", "7.0.1", "arm64"), node("n4", "r2", "db", "6.8.0")]


def job(instances: int = 2, *constraints: Constraint, spread: tuple[Spread, ...] = (), distinct_hosts: bool = False,
        memory: int = 128, **update: object) -> TaskSpec:
    return TaskSpec(name="web", kind="service", cmd="serve", instances=instances, resources=Resources(100, memory),
                    constraints=constraints, spread=spread, distinct_hosts=distinct_hosts,
                    update=UpdatePolicy(**update))


def placed_on(cluster: Cluster) -> Counter[str]:
    return Counter(a.node for a in cluster.allocs.values())


@pytest.mark.parametrize(("constraint", "allowed"), [
    (Constraint("${meta.rack}", "=", "r1"), {"n1", "n2"}),
    (Constraint("${node.class}", "!=", "web"), {"n3", "n4"}),
    (Constraint("${node.unique.name}", "=", "n4"), {"n4"}),
    (Constraint("${attr.cpu.arch}", "regexp", "^arm"), {"n3"}),
    (Constraint("${attr.kernel.version}", "version", ">= 5.4, < 7"), {"n1", "n4"}),
    (Constraint("${attr.kernel.version}", "version", "~> 6.1"), {"n1", "n4"}),
    (Constraint("${meta.rack}", "not_regexp", "^r1$"), {"n3", "n4"}),
    (Constraint("${meta.gpu}", "is_not_set"), {"n1", "n2", "n3", "n4"}),
])
def test_each_constraint_operator_keeps_instances_on_matching_nodes(constraint: Constraint, allowed: set[str]) -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(6, constraint))
    result = cluster.step()
    assert len(result.place) == 6 and not result.unplaceable
    assert set(placed_on(cluster)) <= allowed


def test_a_missing_attribute_fails_equality_and_is_set() -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(1, Constraint("${meta.gpu}", "is_set")))
    result = cluster.step()
    assert not result.place
    assert result.unplaceable[0].reason == ("no node fits (4 nodes): constraint ${meta.gpu} is_set filtered "
                                            "4 nodes (class db: 2, web: 2)")


def test_version_ranges() -> None:
    assert version_matches("6.1.0-18-amd64", ">= 6, < 6.2")
    assert version_matches("v1.2.3", "= 1.2.3") and not version_matches("1.2.3", "!= 1.2.3")
    assert version_matches("5.10.7", "~> 5.10") and not version_matches("6.0", "~> 5.10")
    assert version_matches("5.10.7", "~> 5.10.1") and not version_matches("5.11.0", "~> 5.10.1")
    assert not version_matches("unknown", ">= 1")


def test_distinct_hosts_places_one_instance_per_node_and_says_why_the_rest_waits() -> None:
    cluster = Cluster(rack_nodes()[:2])
    cluster.submit(job(3, distinct_hosts=True))
    result = cluster.step()
    assert sorted(placed_on(cluster).values()) == [1, 1]
    assert result.unplaceable[0].indexes == (2,)
    assert result.unplaceable[0].reason == "no node fits (2 nodes): distinct_hosts filtered 2 nodes (class web: 2)"
    # The operator form (Nomad's constraint { operator = "distinct_hosts" }) is the same rule.
    other = Cluster(rack_nodes()[:2])
    other.submit(job(3, Constraint("", "distinct_hosts")))
    assert len(other.step().place) == 2


def test_distinct_property_limits_instances_per_value() -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(5, Constraint("${meta.rack}", "distinct_property", "2")))
    result = cluster.step()
    racks = Counter({"n1": "r1", "n2": "r1", "n3": "r2", "n4": "r2"}[a.node] for a in result.place)
    assert racks == {"r1": 2, "r2": 2}
    assert "distinct_property ${meta.rack} (at most 2 per value) filtered 4 nodes" in result.unplaceable[0].reason


def test_spread_evens_instances_over_an_attribute_against_bin_packing() -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(4))
    cluster.step()
    assert len(placed_on(cluster)) == 1  # without spread, bin packing fills one node
    spread = Cluster(rack_nodes())
    spread.submit(job(4, spread=(Spread("${meta.rack}"),)))
    spread.step()
    racks = Counter({"n1": "r1", "n2": "r1", "n3": "r2", "n4": "r2"}[n] for n in placed_on(spread).elements())
    assert racks == {"r1": 2, "r2": 2}


def test_spread_targets_split_by_percent_and_scale_up_keeps_them() -> None:
    cluster = Cluster(rack_nodes())
    rule = (Spread("${node.class}", 100, {"web": 70, "db": 30}),)
    cluster.submit(job(10, spread=rule))
    converge(cluster)
    classes = Counter({"n1": "web", "n2": "web", "n3": "db", "n4": "db"}[n] for n in placed_on(cluster).elements())
    assert classes == {"web": 7, "db": 3}
    cluster.submit(job(20, spread=rule))  # the instances already placed count toward the shares
    cluster.step()
    classes = Counter({"n1": "web", "n2": "web", "n3": "db", "n4": "db"}[n] for n in placed_on(cluster).elements())
    assert classes == {"web": 14, "db": 6}


def test_why_nothing_fits_counts_per_rule_and_node_class() -> None:
    nodes = rack_nodes()
    nodes[3] = replace(nodes[3], eligible=False)
    cluster = Cluster(nodes)
    cluster.submit(job(1, Constraint("${meta.rack}", "=", "r2"), memory=2048))
    result = cluster.step()
    assert result.unplaceable[0].reason == (
        "no node fits (4 nodes): 1 node ineligible or draining (class db: 1); constraint ${meta.rack} = r2 filtered "
        "2 nodes (class web: 2); memory exhausted on 1 node (class db: 1; needs 2048 MB, most free: n3 with 1024 MB)")
    assert "unplaceable" in cluster.deployment().description
    assert dict(result.unplaceable[0].counts) == {"nodes": 4, "ineligible": 1, "constraint": 2, "distinct": 0,
                                                  "memory": 1, "cpu": 0}


def test_marathon_queue_reports_the_counts_as_an_offer_funnel() -> None:
    from shipyard.api.marathon.cluster import offers_summary

    record = {"since": 0.0, "nodes": {"nodes": 4, "ineligible": 1, "constraint": 2, "distinct": 0, "memory": 1,
                                      "cpu": 0}}
    summary = offers_summary(record, 0.0)
    assert summary is not None and summary["processedOffersCount"] == 4
    assert summary["rejectSummaryLastOffers"] == [
        {"reason": "AgentMaintenance", "declined": 1, "processed": 4},
        {"reason": "UnfulfilledConstraint", "declined": 2, "processed": 3},
        {"reason": "InsufficientMemory", "declined": 1, "processed": 1},
        {"reason": "InsufficientCpus", "declined": 0, "processed": 0}]
    assert offers_summary(None, 0.0) is None


def test_a_job_without_rules_names_the_classes_that_fell_short() -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(1, memory=4096))
    reason = cluster.step().unplaceable[0].reason
    assert reason.startswith("needs 4096 MB memory, more than any node has")
    assert reason.endswith("; resources exhausted on 4 nodes (class db: 2, web: 2)")


def test_ineligible_node_keeps_its_instances_and_gets_no_new_ones() -> None:
    cluster = Cluster(rack_nodes()[:2])
    cluster.submit(job(2, distinct_hosts=True))
    converge(cluster)
    cluster.nodes[0] = replace(cluster.nodes[0], eligible=False)
    cluster.submit(job(3, distinct_hosts=True))  # scale up
    result = cluster.step()
    assert not result.stop and not result.place and result.unplaceable
    assert placed_on(cluster) == {"n1": 1, "n2": 1}


def drain(cluster: Cluster, node: str, deadline: float | None = None) -> None:
    cluster.nodes = [replace(n, draining=True, eligible=False, drain_deadline=deadline) if n.id == node else n
                     for n in cluster.nodes]


def test_drain_moves_instances_one_at_a_time_and_stops_each_once_its_replacement_is_stable() -> None:
    cluster = Cluster(rack_nodes())
    cluster.submit(job(3, Constraint("${meta.rack}", "=", "r1"), max_parallel=1, min_healthy_time=2.0))
    converge(cluster)
    assert set(placed_on(cluster)) == {"n1"}
    drain(cluster, "n1")
    serving = []
    for _ in range(40):
        result = cluster.step()
        assert all(a.node == "n2" for a in result.place)  # never the draining node, never another rack
        assert len(result.place) <= 1
        for stop in result.stop:
            assert stop.reason.startswith("node draining; replaced by ")
        serving.append(sum(1 for a in cluster.allocs.values() if a.client == "healthy"))
        cluster.report("healthy")
        cluster.now += 1
        if "n1" not in placed_on(cluster):
            break
    assert placed_on(cluster) == {"n2": 3}
    assert min(serving) == 3  # never fewer healthy instances than the job wants
    assert cluster.deployment().status == "successful"


def test_drain_deadline_stops_what_is_left_and_places_it_again() -> None:
    cluster = Cluster(rack_nodes()[:2])
    cluster.submit(job(2, distinct_hosts=True, max_parallel=1))
    converge(cluster)
    drain(cluster, "n1", deadline=cluster.now + 5)
    result = cluster.step()
    assert not result.place and result.unplaceable  # nowhere to go: n2 runs one already (distinct_hosts)
    cluster.now += 10
    result = cluster.step()
    assert [s.reason for s in result.stop] == ["node drain deadline reached"]
    assert "n1" not in placed_on(cluster)


def test_drain_moves_instances_even_after_a_failed_deployment() -> None:
    cluster = Cluster(rack_nodes()[:2])
    cluster.submit(job(1, healthy_deadline=5.0))
    converge(cluster)
    cluster.deployments["web"] = replace(cluster.deployment(), status="failed", description="test")
    node = next(iter(placed_on(cluster)))
    drain(cluster, node)
    result = cluster.step()
    assert len(result.place) == 1 and result.place[0].node != node
    cluster.report("healthy")
    cluster.now += 10
    result = cluster.step()
    assert len(result.stop) == 1 and node not in placed_on(cluster)


def test_marathon_constraints_map_to_placement_rules_and_back() -> None:
    from shipyard.api.marathon.apps import AppInvalid, app_from_spec, spec_from_app

    app = {"id": "/web", "cmd": "serve", "cpus": 0.1, "mem": 64, "constraints": [
        ["hostname", "UNIQUE"], ["rack", "CLUSTER", "r1"], ["${attr.kernel.name}", "LIKE", "lin.*"],
        ["zone", "UNLIKE", "z9"], ["rack", "GROUP_BY"], ["zone", "MAX_PER", "2"]]}
    spec = spec_from_app(app)
    assert spec.distinct_hosts and spec.spread == (Spread("${meta.rack}"),)
    assert spec.constraints == (Constraint("${meta.rack}", "=", "r1"),
                                Constraint("${attr.kernel.name}", "regexp", "^(?:lin.*)$"),
                                Constraint("${meta.zone}", "not_regexp", "^(?:z9)$"),
                                Constraint("${meta.zone}", "distinct_property", "2"))
    assert app_from_spec(spec)["constraints"] == [
        ["hostname", "UNIQUE"], ["rack", "CLUSTER", "r1"], ["${attr.kernel.name}", "LIKE", "lin.*"],
        ["zone", "UNLIKE", "z9"], ["zone", "MAX_PER", "2"], ["rack", "GROUP_BY"]]
    assert spec_from_app(app_from_spec(spec)) == spec  # a GET body PUT back changes nothing
    # Placed as Marathon would: one per host, rack r1 only.
    cluster = Cluster(rack_nodes())
    cluster.submit(replace(spec, instances=3, constraints=spec.constraints[:1]))
    result = cluster.step()
    assert sorted(a.node for a in result.place) == ["n1", "n2"] and result.unplaceable
    with pytest.raises(AppInvalid) as refused:
        spec_from_app({**app, "constraints": [["rack", "CLUSTER"], ["rack", "NEAR", "x"], "hostname:UNIQUE"]})
    errors = {d["path"]: " ".join(d["errors"]) for d in refused.value.details}
    assert "CLUSTER without one" in errors["/constraints(0)"]
    assert "unknown operator 'NEAR'" in errors["/constraints(1)"]
    assert "must be" in errors["/constraints(2)"]
