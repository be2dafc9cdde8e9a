"""The pure planner, driven step by step: plans are applied to an in-test cluster and health is fed back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shipyard.errors import Conflict
from shipyard.scheduler import Allocation, Deployment, Job, Node, Plan, Snapshot, check_conflict, plan
from shipyard.scheduler.reconcile import compact_retired, instance_slots
from shipyard.spec import Resources, TaskSpec, UpdatePolicy


def task(instances: int = 3, cpu: int = 100, memory: int = 128, cmd: str = "serve v1", **update: object) -> TaskSpec:
    return TaskSpec(name="web", kind="service", cmd=cmd, instances=instances, resources=Resources(cpu, memory),
                    update=UpdatePolicy(**update))


class Cluster:
    """Applies plans the way the scheduler loop and agents will: stops vanish, placements start pending."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.jobs: dict[str, Job] = {}
        self.history: dict[tuple[str, int], TaskSpec] = {}
        self.allocs: dict[str, Allocation] = {}
        self.deployments: dict[str, Deployment] = {}
        self.now = 0.0
        self.revision = 0

    def submit(self, spec: TaskSpec, job_id: str = "web", **changes: object) -> Job:
        old = self.jobs.get(job_id)
        job = Job(job_id, (old.version + 1) if old else 1, spec, stable_version=old.stable_version if old else None)
        job = replace(job, **changes)
        self.jobs[job_id] = job
        self.history[(job_id, job.version)] = spec
        return job

    def snapshot(self) -> Snapshot:
        return Snapshot(self.nodes, list(self.jobs.values()), list(self.allocs.values()),
                        list(self.deployments.values()), now=self.now, revision=self.revision)

    def step(self) -> Plan:
        result = plan(self.snapshot())
        self.revision += 1
        for stop in result.stop:
            del self.allocs[stop.alloc]
        for update in result.update:
            self.allocs[update.alloc] = replace(self.allocs[update.alloc], version=update.version)
        for alloc in result.place:
            self.allocs[alloc.id] = alloc
        for d in result.deployments:
            self.deployments[d.job] = d
            if d.status == "successful":
                self.jobs[d.job] = replace(self.jobs[d.job], stable_version=d.version)
        for revert in result.reverts:
            self.submit(self.history[(revert.job, revert.to_version)], revert.job)
        return result

    def report(self, client: str, pending_only: bool = True) -> None:
        """The agent's view comes back: started instances turn healthy (or not) now."""
        for alloc_id, a in list(self.allocs.items()):
            if not pending_only or a.client == "pending":
                since = self.now if client == "healthy" else None
                self.allocs[alloc_id] = replace(a, client=client, healthy_since=since)

    def live(self, job: str = "web") -> list[Allocation]:
        return sorted((a for a in self.allocs.values() if a.job == job), key=lambda a: (a.index, a.version))

    def deployment(self, job: str = "web") -> Deployment:
        return self.deployments[job]


def nodes(count: int, cpu: int = 1000, memory: int = 1024) -> list[Node]:
    return [Node(f"node-{i + 1}", cpu, memory) for i in range(count)]


def converge(cluster: Cluster, steps: int = 30) -> None:
    for _ in range(steps):
        cluster.step()
        cluster.report("healthy")
        cluster.now += 1
        if cluster.deployment().status == "successful":
            return
    raise AssertionError(f"no convergence: {cluster.deployment()}")


def test_placement_respects_node_capacity() -> None:
    cluster = Cluster(nodes(2, cpu=1000, memory=1024))
    cluster.submit(task(instances=7, cpu=300, memory=256))
    result = cluster.step()
    assert len(result.place) == 6  # 3 per node: cpu is the limit
    for node in cluster.nodes:
        on_node = [a for a in result.place if a.node == node.id]
        assert sum(a.cpu for a in on_node) <= node.cpu and sum(a.memory for a in on_node) <= node.memory
    assert [u.indexes for u in result.unplaceable] == [(6,)]
    assert "no node has 300 MHz free cpu (best: node-" in result.unplaceable[0].reason


def test_bin_packing_prefers_the_node_left_fullest() -> None:
    cluster = Cluster(nodes(3, cpu=1000, memory=1024))
    busy = Allocation("other.0", "other", 1, 0, "node-2", 700, 700, "t", client="healthy", healthy_since=0.0)
    cluster.allocs[busy.id] = busy
    cluster.submit(task(instances=1, cpu=200, memory=200))
    result = cluster.step()
    assert [a.node for a in result.place] == ["node-2"]


def test_identical_instances_fill_one_node_before_the_next() -> None:
    cluster = Cluster(nodes(3, cpu=1000, memory=1024))
    cluster.submit(task(instances=4, cpu=250, memory=100))
    placed = {a.node for a in cluster.step().place}
    assert len(placed) == 1


def test_spread_puts_instances_of_one_job_on_different_nodes() -> None:
    cluster = Cluster(nodes(3, cpu=1000, memory=1024))
    cluster.submit(task(instances=3, cpu=100, memory=100))
    result = plan(cluster.snapshot(), spread=True, candidates=3)
    assert len({a.node for a in result.place}) == 3


def test_unplaceable_instance_is_reported_with_reason() -> None:
    cluster = Cluster(nodes(2, cpu=4000, memory=1024))
    cluster.allocs["x"] = Allocation("x", "other", 1, 0, "node-1", 10, 724, "t", client="healthy")
    cluster.allocs["y"] = Allocation("y", "other", 1, 1, "node-2", 10, 824, "t", client="healthy")
    cluster.submit(task(instances=2, memory=512))
    result = cluster.step()
    assert result.place == []
    assert result.unplaceable[0].indexes == (0, 1)
    assert result.unplaceable[0].reason == "no node has 512 MB free memory (best: node-1 with 300 MB)"
    assert "unplaceable" in cluster.deployment().description and cluster.deployment().placed == 0


def test_larger_than_any_node_and_no_nodes() -> None:
    cluster = Cluster(nodes(1, memory=256))
    cluster.submit(task(instances=1, memory=512))
    assert "more than any node has (largest: node-1 with 256 MB)" in cluster.step().unplaceable[0].reason
    empty = Cluster([Node("node-1", 1000, 1000, eligible=False)])
    empty.submit(task(instances=1))
    assert empty.step().unplaceable[0].reason == "no eligible nodes"


def test_scale_up_then_down_stops_highest_index_first() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=3))
    converge(cluster)
    first = {a.id for a in cluster.live()}
    cluster.submit(task(instances=5))
    result = cluster.step()
    assert sorted(a.index for a in result.place) == [3, 4]
    assert result.stop == [] and {u.alloc for u in result.update} == first  # the running three stay, relabelled
    cluster.report("healthy")
    cluster.now += 10
    cluster.step()
    assert cluster.deployment().status == "successful"
    cluster.submit(task(instances=2))
    result = cluster.step()
    assert [s.reason for s in result.stop] == ["scaled down"] * 3
    assert [cluster_index for cluster_index in (int(s.alloc.split(".")[1]) for s in result.stop)] == [4, 3, 2]
    assert [a.index for a in cluster.live()] == [0, 1]


def test_stop_and_delete_stop_every_instance() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=3))
    converge(cluster)
    cluster.submit(task(instances=0))
    assert len(cluster.step().stop) == 3 and cluster.live() == []
    cluster.submit(task(instances=2))
    converge(cluster)
    cluster.submit(task(instances=2), status="stopped")
    assert {s.reason for s in cluster.step().stop} == {"job stopped"}
    cluster.submit(task(instances=2))
    converge(cluster)
    del cluster.jobs["web"]
    assert {s.reason for s in cluster.step().stop} == {"job deleted"} and cluster.live() == []


def test_rolling_update_step_by_step() -> None:
    cluster = Cluster(nodes(4))
    cluster.submit(task(instances=4, max_parallel=2, min_healthy_time=5))
    converge(cluster)
    assert cluster.jobs["web"].stable_version == 1
    cluster.submit(task(instances=4, cmd="serve v2", max_parallel=2, min_healthy_time=5))
    v2_template = cluster.jobs["web"].spec.template_hash()
    for _ in range(60):
        result = cluster.step()
        new = [a for a in cluster.live() if a.template == v2_template]
        old = [a for a in cluster.live() if a.template != v2_template]
        in_flight = [a for a in new if not (a.client == "healthy" and cluster.now - a.healthy_since >= 5)]
        assert len([a for a in result.place]) <= 2 and len(in_flight) <= 2
        healthy = [a for a in cluster.live() if a.client == "healthy"]
        assert len(healthy) >= 4 - 2
        for stop in result.stop:  # an old instance goes only when its replacement has been healthy 5 s
            assert stop.reason.startswith("replaced by ")
        assert len(new) + len(old) <= 4 + 2
        cluster.report("healthy")
        cluster.now += 1
        if cluster.deployment().status == "successful":
            break
    assert cluster.deployment().status == "successful" and cluster.deployment().version == 2
    assert [a.index for a in cluster.live()] == [0, 1, 2, 3]
    assert all(a.template == v2_template and a.version == 2 for a in cluster.live())
    assert cluster.jobs["web"].stable_version == 2


def test_failed_deployment_reverts_and_old_version_keeps_serving() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2, min_healthy_time=1, healthy_deadline=10, auto_revert=True))
    converge(cluster)
    old_ids = {a.id for a in cluster.live()}
    cluster.submit(task(instances=2, cmd="serve broken", min_healthy_time=1, healthy_deadline=10, auto_revert=True))
    reverted = None
    for _ in range(20):
        result = cluster.step()
        assert old_ids <= set(cluster.allocs)  # v1 serves throughout
        cluster.report("unhealthy")
        if result.reverts:
            reverted = result.reverts[0]
            break
        cluster.now += 1
    assert reverted is not None and reverted.to_version == 1
    assert cluster.deployments["web"].status == "failed"
    assert "not healthy within 10s" in cluster.deployments["web"].description
    assert cluster.jobs["web"].version == 3 and cluster.jobs["web"].spec.cmd == "serve v1"
    result = cluster.step()  # version 3 is version 1's spec: the broken instance goes, v1's stay
    assert [s.reason for s in result.stop] == [f"replaced by {a}" for a in sorted(old_ids)][:1]
    assert result.place == [] and {a.id for a in cluster.live()} == old_ids
    assert cluster.deployment().status == "successful" and cluster.deployment().version == 3


def test_failed_deployment_without_auto_revert_is_frozen() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2, healthy_deadline=5))
    converge(cluster)
    cluster.submit(task(instances=2, cmd="serve broken", healthy_deadline=5))
    cluster.step()
    cluster.report("failed")
    result = cluster.step()
    assert result.reverts == [] and cluster.deployment().status == "failed"
    assert "failed" in cluster.deployment().description and result.place == []
    assert cluster.step().place == []  # no new attempts until the job changes


def test_lost_and_failed_instances_are_replaced_after_a_failed_deployment() -> None:
    # Issue 11, item 10: a failed deployment (no auto_revert) freezes the rollout, not the instance count.
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=3, healthy_deadline=5))
    converge(cluster)
    cluster.submit(task(instances=3, cmd="serve broken", healthy_deadline=5))
    cluster.step()
    cluster.report("failed")
    cluster.step()
    assert cluster.deployment().status == "failed"
    assert cluster.step().place == []  # frozen: nothing more is rolled out
    old = {a.index: a for a in cluster.live()}
    assert sorted(old) == [0, 1, 2] and all(a.version == 1 for a in old.values())
    cluster.allocs[old[1].id] = replace(old[1], client="lost")
    cluster.allocs[old[2].id] = replace(old[2], client="failed")
    result = cluster.step()
    assert sorted(s.alloc for s in result.stop) == sorted([old[1].id, old[2].id])
    assert sorted(a.index for a in result.place) == [1, 2], "lost and failed instances are replaced"
    assert cluster.deployment().status == "failed"
    assert sorted(a.index for a in cluster.live()) == [0, 1, 2]
    assert cluster.step().place == []


def test_an_instance_on_a_vanished_node_is_replaced_after_a_failed_deployment() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2, healthy_deadline=5))
    converge(cluster)
    cluster.submit(task(instances=2, cmd="serve broken", healthy_deadline=5))
    cluster.step()
    cluster.report("failed")
    cluster.step()
    assert cluster.deployment().status == "failed"
    gone = cluster.live()[0].node
    cluster.nodes = [n for n in cluster.nodes if n.id != gone]
    result = cluster.step()
    assert result.place and all(a.node != gone for a in result.place)
    assert len({a.index for a in cluster.live() if a.node != gone}) == 2


def test_canaries_wait_for_promotion() -> None:
    cluster = Cluster(nodes(4))
    cluster.submit(task(instances=3, canary=1, min_healthy_time=2))
    converge(cluster)
    cluster.submit(task(instances=3, cmd="serve v2", canary=1, min_healthy_time=2))
    result = cluster.step()
    assert [(a.index, a.canary) for a in result.place] == [(0, True)]
    for _ in range(5):
        cluster.report("healthy")
        cluster.now += 1
        result = cluster.step()
        assert result.place == [] and result.stop == []
    assert cluster.deployment().status == "paused-for-promotion"
    assert len(cluster.live()) == 4
    cluster.deployments["web"] = replace(cluster.deployment(), promoted=True)
    result = cluster.step()
    assert [s.reason.startswith("replaced by web.0.") for s in result.stop] == [True]
    assert [a.index for a in result.place] == [1]
    converge(cluster)
    assert all(a.version == 2 for a in cluster.live()) and len(cluster.live()) == 3


def test_restart_is_a_rolling_deployment_of_the_same_version() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2, min_healthy_time=1))
    converge(cluster)
    before = {a.id for a in cluster.live()}
    job = cluster.jobs["web"]
    cluster.jobs["web"] = replace(job, generation=1)
    result = cluster.step()
    assert len(result.place) == 1 and result.stop == []
    assert cluster.deployment().id.endswith(".g1") and cluster.deployment().version == job.version
    converge(cluster)
    after = {a.id for a in cluster.live()}
    assert len(after) == 2 and not (after & before)


def test_lost_node_instances_are_replaced() -> None:
    cluster = Cluster(nodes(2, cpu=1000))
    cluster.submit(task(instances=2, cpu=600))
    converge(cluster)
    gone = cluster.live()[0].node
    cluster.nodes = [n for n in cluster.nodes if n.id != gone]
    cluster.nodes.append(Node("node-3", 1000, 1024))
    result = cluster.step()
    assert [s.reason for s in result.stop] == ["node lost"]
    assert [a.node for a in result.place] == ["node-3"]


def test_planning_is_deterministic() -> None:
    cluster = Cluster(nodes(5))
    cluster.submit(task(instances=10))
    assert plan(cluster.snapshot()) == plan(cluster.snapshot())


def test_conflicting_change_is_refused_unless_forced() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2))
    cluster.step()
    active = cluster.deployment()
    change = replace(cluster.jobs["web"], version=2)
    with pytest.raises(Conflict) as caught:
        check_conflict(change, active)
    assert caught.value.status == 409 and caught.value.detail["deployment"] == active.id
    check_conflict(change, active, force=True)
    check_conflict(change, replace(active, status="successful"))
    cluster.submit(task(instances=2, cmd="serve v2"))  # forced: the next plan cancels the running deployment
    result = cluster.step()
    assert [(d.version, d.status) for d in result.deployments][:1] == [(1, "cancelled")]
    assert cluster.deployment().version == 2


# ---- depends_on: ordering at start only ---------------------------------------------------------------------


def dependent(condition: str = "healthy", instances: int = 2, cmd: str = "api v1", dep: str = "db") -> TaskSpec:
    return TaskSpec(name="api", kind="service", cmd=cmd, instances=instances, resources=Resources(100, 128),
                    depends_on={dep: condition})


def set_client(cluster: Cluster, job: str, client: str) -> None:
    for a in cluster.live(job):
        cluster.allocs[a.id] = replace(a, client=client, healthy_since=cluster.now if client == "healthy" else None)


def test_dependent_waits_until_its_dependency_is_healthy() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=1), "db")
    cluster.submit(dependent("healthy"), "api")
    result = cluster.step()
    assert [a.job for a in result.place] == ["db"]
    assert [(w.job, w.indexes, w.reason) for w in result.waiting] == [("api", (0, 1), "waiting for db to be healthy")]
    assert cluster.deployment("api").description == "waiting for db to be healthy"
    assert cluster.deployment("api").status == "running" and cluster.deployment("api").placed == 0

    set_client(cluster, "db", "running")  # started is not enough for `healthy`
    cluster.now += 100  # however long it takes: waiting is no deployment failure
    result = cluster.step()
    assert result.place == [] and [w.job for w in result.waiting] == ["api"]
    assert cluster.deployment("api").status == "running"

    set_client(cluster, "db", "healthy")
    result = cluster.step()
    assert sorted(a.index for a in result.place if a.job == "api") == [0, 1] and result.waiting == []
    assert cluster.deployment("api").description == "deploying"


def test_started_dependency_needs_one_running_instance() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=2), "db")
    cluster.submit(dependent("started"), "api")
    cluster.step()
    assert cluster.live("api") == []
    cluster.allocs[cluster.live("db")[0].id] = replace(cluster.live("db")[0], client="running")
    assert len([a for a in cluster.step().place if a.job == "api"]) == 2


def test_dependency_going_down_never_stops_or_blocks_a_running_dependent() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=1), "db")
    cluster.submit(dependent("healthy"), "api")
    cluster.step()
    set_client(cluster, "db", "healthy")
    cluster.step()
    set_client(cluster, "api", "healthy")
    cluster.now += 10
    cluster.step()
    assert cluster.deployment("api").status == "successful"

    cluster.submit(task(instances=1), "db", status="stopped")
    result = cluster.step()
    assert {s.job for s in result.stop} == {"db"} and len(cluster.live("api")) == 2 and result.waiting == []

    # A rolling update of the running dependent goes on without its dependency: no deadlock.
    cluster.submit(dependent("healthy", cmd="api v2"), "api")
    for _ in range(10):
        cluster.step()
        cluster.report("healthy")
        cluster.now += 10
    assert cluster.deployment("api").status == "successful" and cluster.deployment("api").version == 2
    assert {a.version for a in cluster.live("api")} == {2} and cluster.live("db") == []


def test_unmet_dependency_reasons_and_a_dependency_of_zero_instances() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(dependent("started", dep="ghost"), "api")
    assert cluster.step().waiting[0].reason == "waiting for ghost to be started (no job named ghost)"
    cluster.submit(task(instances=1), "ghost", status="stopped")
    assert cluster.step().waiting[0].reason == "waiting for ghost to be started (ghost is stopped)"
    cluster.submit(task(instances=0), "ghost")  # nothing will ever run: waiting would be forever
    result = cluster.step()
    assert result.waiting == [] and len(result.place) == 2


# ---- retired indexes: Marathon's kill of named tasks with ?scale ------------------------------------------


def test_retired_indexes_stop_the_named_instances_and_keep_the_others() -> None:
    cluster = Cluster(nodes(2))
    cluster.submit(task(instances=3))
    converge(cluster)
    kept = {a.id for a in cluster.live() if a.index != 0}
    cluster.submit(task(instances=2), retired=(0,))
    result = cluster.step()
    assert [(s.alloc.split(".")[1], s.reason) for s in result.stop] == [("0", "scaled down")]
    assert result.place == [] and {a.id for a in cluster.live()} == kept
    cluster.submit(task(instances=3), retired=(0,))  # scaling up again takes the next free index
    assert [a.index for a in cluster.step().place] == [3]


def test_instance_slots_skip_retired_indexes_and_retired_sets_stay_small() -> None:
    assert instance_slots(3) == [0, 1, 2] and instance_slots(3, (0, 2)) == [1, 3, 4] and instance_slots(0, (1,)) == []
    assert compact_retired(2, {0, 2}) == (0, 2)  # slots 1, 3: both still below the top one
    assert compact_retired(2, {0, 5}) == (0,)  # slots 1, 2: index 5 no longer matters
    assert compact_retired(0, {0, 1}) == ()
