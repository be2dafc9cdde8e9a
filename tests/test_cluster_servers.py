"""Several `shipyard server` processes on one real etcd: one leader elected through a lease, failover after kill -9,
fencing of a deposed leader, followers serving reads, writes and blocking queries; members and peers list them.

Each server binds its own loopback address (127.0.0.2-4) as it would its own machine's; RabbitMQ is the bus.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from shipyard.registry.servers import LEADER_KEY, ServerCluster, ServerInfo
from shipyard.scheduler.jobs import JobService
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.scheduler.model import Node
from shipyard.scheduler.records import ALLOCS, PLAN_GUARD, encode_node, node_key
from shipyard.spec import Resources, TaskSpec
from shipyard.store import Put
from shipyard.store.etcd import EtcdStore
from support import EtcdProcess, LoopbackServer, ServerProcess, free_port, need_peer, rabbit_up, wait_for

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
TTL = 2  # --leader-ttl of the servers under test
LOST_AFTER = 3  # --node-lost-after: a dead server's instances are replaced this long after its lease expired
NAMESPACE = "cluster-test"


def loopback_aliases_work() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


class ClusterServer(LoopbackServer):
    """A server on its own loopback address, as if on its own machine."""

    def __init__(self, data_dir: Path, address: str, name: str, etcd: EtcdProcess) -> None:
        super().__init__(data_dir, address, name, "--store", f"etcd://127.0.0.1:{etcd.client_port}/{NAMESPACE}",
                         "--bus", RABBIT_URL, "--leader-ttl", str(TTL), "--node-lost-after", str(LOST_AFTER),
                         "--no-gateway")

    def leader(self) -> str:
        return str(requests.get(self.url + "/v1/status/leader", timeout=2).json())

    def launch(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class Cluster:
    def __init__(self, base: Path, etcd: EtcdProcess, count: int = 3) -> None:
        self.etcd = etcd
        self.servers = [ClusterServer(base / f"server-{i}", f"127.0.0.{i + 2}", f"server-{i}", etcd)
                        for i in range(count)]

    def start(self) -> Cluster:
        for server in self.servers:  # started together, as a fleet comes up
            server.launch()
        for server in self.servers:
            assert server.proc is not None
            wait_until_ready(server)
        return self

    def stop(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGCONT)
            server.stop()

    def alive(self) -> list[ClusterServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def agreed_leader(self, among: list[ClusterServer] | None = None) -> ClusterServer | None:
        """The server every one of `among` names as leader, once they all agree on one of them."""
        among = among or self.alive()
        answers = {s.leader() for s in among}
        if len(answers) != 1:
            return None
        (addr,) = answers
        return next((s for s in among if s.addr == addr), None)

    def etcd_get(self, key: str) -> dict[str, Any] | None:
        raw = f"{NAMESPACE}/{key}".encode()
        body = requests.post(self.etcd.url + "/v3/kv/range", json={"key": base64.b64encode(raw).decode()},
                             timeout=5).json()
        kvs = body.get("kvs") or []
        return kvs[0] if kvs else None

    def etcd_put(self, key: str, value: bytes) -> None:
        raw = f"{NAMESPACE}/{key}".encode()
        requests.post(self.etcd.url + "/v3/kv/put", json={"key": base64.b64encode(raw).decode(),
                                                         "value": base64.b64encode(value).decode()},
                      timeout=5).raise_for_status()

    def set_eligible(self, node: str, eligible: bool) -> None:
        current = self.etcd_get(node_key(node))
        assert current is not None
        record = json.loads(base64.b64decode(current["value"]))
        self.etcd_put(node_key(node), json.dumps({**record, "eligible": eligible}).encode())

    def history(self, key: str) -> list[tuple[int, bytes]]:
        """Every version the key ever had (etcd keeps them until compaction): (mod_revision, value)."""
        raw = f"{NAMESPACE}/{key}".encode()
        head = requests.post(self.etcd.url + "/v3/kv/range", json={"key": base64.b64encode(raw).decode()},
                             timeout=5).json()
        last = int(head["kvs"][0]["mod_revision"]) if head.get("kvs") else 0
        out: list[tuple[int, bytes]] = []
        request = {"create_request": {"key": base64.b64encode(raw).decode(), "start_revision": "1"}}
        with requests.post(self.etcd.url + "/v3/watch", json=request, stream=True, timeout=10) as stream:
            for line in stream.iter_lines():
                for event in json.loads(line).get("result", {}).get("events", []):
                    kv = event["kv"]
                    out.append((int(kv["mod_revision"]), base64.b64decode(kv.get("value", ""))))
                if not last or (out and out[-1][0] >= last):
                    break
        return out


def wait_until_ready(server: ClusterServer, timeout: float = 30.0) -> None:
    assert server.proc is not None

    def ready() -> bool:
        if server.proc is not None and server.proc.poll() is not None:
            raise AssertionError(f"{server.name} exited: {server.log_tail()}")
        # It answers before it says ready (its node agent registers its node meanwhile).
        return requests.get(server.url + "/v1/status/leader", timeout=1).status_code == 200 and (
            "shipyard server ready" in server.log_tail(1_000_000))

    wait_for(f"{server.name} to answer", ready, timeout)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path / "etcd").start()
    yield proc
    proc.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdProcess) -> Iterator[Cluster]:
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    need_peer("loopback aliases", loopback_aliases_work(), "cannot bind 127.0.0.2")
    c = Cluster(tmp_path, etcd)
    try:
        yield c.start()
    finally:
        c.stop()


def deploy(server: ClusterServer, app: str, instances: int) -> None:
    r = requests.post(server.url + "/v2/apps", json={"id": f"/{app}", "cmd": "sleep 600", "instances": instances,
                                                     "cpus": 0.01, "mem": 16}, timeout=10)
    assert r.status_code in (200, 201), r.text


def hosts(server: ClusterServer, app: str) -> set[str]:
    r = requests.get(server.url + f"/v2/apps/{app}", timeout=5)
    return {t["host"] for t in r.json()["app"]["tasks"] if t.get("state") == "TASK_RUNNING"}


def running(server: ClusterServer, app: str) -> int:
    r = requests.get(server.url + f"/v2/apps/{app}", timeout=5)
    return int(r.json()["app"]["tasksRunning"]) if r.status_code == 200 else -1


# ---- one leader, and what the Consul API says of the servers ----------------------------------------------------


def test_three_servers_elect_exactly_one_leader_and_list_each_other(cluster: Cluster) -> None:
    leader = wait_for("one leader all agree on", cluster.agreed_leader)
    addrs = sorted(s.addr for s in cluster.servers)
    for server in cluster.servers:
        assert sorted(requests.get(server.url + "/v1/status/peers", timeout=5).json()) == addrs
    followers = [s for s in cluster.servers if s is not leader]
    members = requests.get(followers[0].url + "/v1/agent/members", timeout=5).json()
    assert {(m["Name"], m["Addr"], m["Status"]) for m in members} == {(s.name, s.address, 1) for s in cluster.servers}
    nodes = requests.get(followers[1].url + "/v1/catalog/nodes", timeout=5).json()
    assert {(n["Node"], n["Address"]) for n in nodes} >= {(s.name, s.address) for s in cluster.servers}
    listed = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", leader.addr, "members"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    for server in cluster.servers:
        assert server.name in listed.stdout and f"{server.address}:" in listed.stdout
    for server in cluster.servers:
        stats = requests.get(server.url + "/v1/agent/self", timeout=5).json()["Stats"]["consul"]
        assert stats["leader"] == ("true" if server is leader else "false")
        assert stats["leader_addr"] == leader.addr
    # The leader key in etcd names exactly the server all of them agree on.
    record = cluster.etcd_get(LEADER_KEY)
    assert record is not None and json.loads(base64.b64decode(record["value"]))["name"] == leader.name
    # A follower that stops says it left (3); the leader stays the leader.
    followers[0].stop()
    wait_for("the stopped follower listed as left", lambda: {
        m["Name"]: m["Status"] for m in requests.get(leader.url + "/v1/agent/members", timeout=5).json()
    }.get(followers[0].name) == 3)
    assert cluster.agreed_leader() is leader


# ---- failover -------------------------------------------------------------------------------------------------


def test_kill9_of_the_leader_elects_another_that_schedules(cluster: Cluster) -> None:
    old = wait_for("one leader", cluster.agreed_leader)
    followers = [s for s in cluster.servers if s is not old]
    # Every instance of the app on the leader's node: the followers' nodes ineligible while it is placed (what
    # `node eligibility off` will do; no such command yet, so the test writes the node records in etcd).
    for follower in followers:
        cluster.set_eligible(follower.name, False)
    deploy(followers[0], "before", 2)  # a write through a follower, planned by the leader
    wait_for("the app deployed before to run", lambda: running(followers[1], "before") == 2)
    assert hosts(followers[1], "before") == {old.address}
    for follower in followers:
        cluster.set_eligible(follower.name, True)
    killed_at = time.monotonic()
    old.kill9()
    new = wait_for("a new leader both survivors agree on", lambda: cluster.agreed_leader(followers), timeout=30)
    took = time.monotonic() - killed_at
    print(f"\nleader failover after kill -9: {took:.2f}s (lease TTL {TTL}s)")
    assert new is not old
    members = {m["Name"]: m["Status"] for m in requests.get(new.url + "/v1/agent/members", timeout=5).json()}
    assert members[old.name] == 4  # failed: its lease expired without it saying it left
    # The dead server's node turns critical, then leaves placement: what ran there runs on the others again.
    wait_for("the dead server's node critical", lambda: any(
        c["CheckID"] == "serfHealth" and c["Status"] == "critical"
        for c in requests.get(new.url + f"/v1/health/node/{old.name}", timeout=5).json()))
    wait_for("the app deployed before to run 2 instances again",
             lambda: running(new, "before") == 2 and old.address not in hosts(new, "before"), timeout=45)
    print(f"instances of the dead server replaced elsewhere after {time.monotonic() - killed_at:.2f}s "
          f"(--node-lost-after {LOST_AFTER}s)")
    other = next(s for s in followers if s is not new)
    deploy(other, "after", 2)
    wait_for("the app deployed after the failover to run", lambda: running(new, "after") == 2)
    assert all(s.proc is not None and s.proc.poll() is None for s in followers)


def test_a_paused_leader_is_fenced_and_steps_down(cluster: Cluster) -> None:
    old = wait_for("one leader", cluster.agreed_leader)
    assert old.proc is not None
    followers = [s for s in cluster.servers if s is not old]
    deploy(followers[0], "steady", 1)
    wait_for("the first app to run", lambda: running(followers[0], "steady") == 1)
    os.killpg(old.proc.pid, signal.SIGSTOP)  # cut off: no keepalive, its lease expires while it cannot notice
    try:
        new = wait_for("a new leader among the others", lambda: cluster.agreed_leader(followers), timeout=30)
        # Work for the scheduler while the old leader is frozen with a stale view of the store.
        deploy(followers[0], "during", 2)
        wait_for("the app deployed during the pause to run", lambda: running(new, "during") == 2)
    finally:
        os.killpg(old.proc.pid, signal.SIGCONT)
    # Resumed, it must follow the new leader (and commit nothing): give it a moment to act on its stale state.
    wait_for("the resumed server to name the new leader", lambda: old.leader() == new.addr, timeout=15)
    # It registered again: alive among the members, its node passing (it may have been marked lost meanwhile).
    wait_for("the resumed server alive with a passing node", lambda: {
        m["Name"]: m["Status"] for m in requests.get(new.url + "/v1/agent/members", timeout=5).json()
    }[old.name] == 1 and all(c["Status"] == "passing" for c in requests.get(
        new.url + f"/v1/health/node/{old.name}", timeout=5).json() if c["CheckID"] == "serfHealth"))
    deploy(old, "after-resume", 1)  # a write through it still works: it is a follower now
    wait_for("the app written through the old leader to run", lambda: running(new, "after-resume") == 1)
    record = cluster.etcd_get(LEADER_KEY)
    assert record is not None
    took_over = int(record["create_revision"])
    writers = [(rev, json.loads(value).get("by")) for rev, value in cluster.history(PLAN_GUARD) if value]
    assert any(by == new.name for rev, by in writers if rev > took_over)  # the new leader did commit plans
    late = [(rev, by) for rev, by in writers if rev > took_over and by != new.name]
    assert late == [], f"plans committed by another server after {new.name} took over: {late}"


# ---- followers serve blocking queries woken by writes through the leader --------------------------------------


def test_a_blocking_query_on_a_follower_wakes_on_a_write_through_the_leader(cluster: Cluster) -> None:
    leader = wait_for("one leader", cluster.agreed_leader)
    follower = next(s for s in cluster.servers if s is not leader)
    assert requests.put(leader.url + "/v1/kv/config/color", data=b"red", timeout=5).json() is True
    first = requests.get(follower.url + "/v1/kv/config/color", timeout=5)
    index = int(first.headers["X-Consul-Index"])
    answer: dict[str, Any] = {}

    def block() -> None:
        r = requests.get(follower.url + f"/v1/kv/config/color?index={index}&wait=30s", timeout=40)
        answer.update(index=int(r.headers["X-Consul-Index"]), value=base64.b64decode(r.json()[0]["Value"]))

    waiter = threading.Thread(target=block)
    waiter.start()
    time.sleep(0.5)  # let the query block (if it answered at once, the index check below catches it)
    assert not answer, "the blocking query answered before any write"
    assert requests.put(leader.url + "/v1/kv/config/color", data=b"blue", timeout=5).json() is True
    waiter.join(20)
    assert not waiter.is_alive(), "the blocking query on the follower did not wake on the leader's write"
    assert answer["value"] == b"blue" and answer["index"] > index


# ---- the fence, in the store itself -----------------------------------------------------------------------------


async def test_the_store_refuses_the_plan_of_a_deposed_leader(tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd").start()
    store = await EtcdStore.open(etcd.url, namespace="fence/")
    a = ServerCluster(store, ServerInfo("a", "a", "127.0.0.2", 1), ttl=TTL)
    b = ServerCluster(store, ServerInfo("b", "b", "127.0.0.3", 2), ttl=TTL)
    try:
        await a.start()
        await b.start()
        assert a.leading and not b.leading and b.leader == a.me
        stale = a.fence()  # what A puts on its commits while it believes it leads
        await store.put(node_key("n1"), encode_node(Node("n1", 4000, 4096)))
        await JobService(store).deploy(TaskSpec(name="web", kind="service", cmd="sleep 30", instances=2,
                                                resources=Resources(100, 64)))
        leader_kv = await store.get(LEADER_KEY)
        assert leader_kv is not None
        await store.revoke_lease(leader_kv.lease)  # what etcd does when A's lease expires (A cut off)
        for _ in range(100):
            if b.leading:
                break
            await _sleep(0.05)
        assert b.leading
        deposed = SchedulerLoop(store, fence=lambda: stale, owner="a")
        plan, _ = await deposed.run_once()
        assert plan.place == [] and (await store.range(ALLOCS, prefix=True)).kvs == []
        assert not (await store.txn(stale, [Put("probe", b"x")])).succeeded
        current = SchedulerLoop(store, fence=b.fence, owner="b")
        plan, _ = await current.run_once()
        assert len(plan.place) == 2 and len((await store.range(ALLOCS, prefix=True)).kvs) == 2
    finally:
        await b.stop()
        await a.stop()
        await store.close()
        etcd.stop()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# ---- what a server on etcd refuses, and what a single server says ---------------------------------------------


def test_a_server_on_etcd_with_the_embedded_bus_is_refused_with_the_reason(tmp_path: Path, etcd: EtcdProcess) -> None:
    server = ServerProcess(tmp_path / "data", "--store", f"etcd://127.0.0.1:{etcd.client_port}/{NAMESPACE}",
                           "--no-gateway", "--vault-port", "0")
    result = subprocess.run(server.command(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert "--bus amqp://" in lines[0] and "--single-server" in lines[0] and "embedded bus" in lines[0]
    # Told it is alone, the same server starts, elects itself and says who leads.
    alone = ServerProcess(tmp_path / "alone", "--store", f"etcd://127.0.0.1:{etcd.client_port}/{NAMESPACE}",
                          "--no-gateway", "--vault-port", "0", "--single-server").start()
    try:
        wait_for("it to lead", lambda: requests.get(alone.url + "/v1/status/leader", timeout=2).json()
                 == f"127.0.0.1:{alone.http_port}")
        assert requests.get(alone.url + "/v1/status/peers", timeout=2).json() == [f"127.0.0.1:{alone.http_port}"]
    finally:
        alone.stop()


def test_a_server_on_sqlite_is_one_server_leading_itself_and_says_so(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--no-gateway", "--vault-port", "0", dev=True).start()
    try:
        leader = requests.get(server.url + "/v1/status/leader", timeout=2).json()
        assert requests.get(server.url + "/v1/status/peers", timeout=2).json() == [leader]
        members = requests.get(server.url + "/v1/agent/members", timeout=2).json()
        assert len(members) == 1 and members[0]["Status"] == 1
        assert "single server (embedded SQLite store): it is the leader" in server.log_tail()
    finally:
        server.stop()


def test_a_server_cut_off_has_its_instances_replaced_and_stops_them_when_back(cluster: Cluster) -> None:
    leader = wait_for("one leader", cluster.agreed_leader)
    cut, other = [s for s in cluster.servers if s is not leader]
    assert cut.proc is not None
    # The app's instance on the server about to be cut off (the other nodes ineligible while it is placed).
    cluster.set_eligible(leader.name, False)
    cluster.set_eligible(other.name, False)
    deploy(leader, "moved", 1)
    wait_for("the app to run on the server to cut off", lambda: hosts(leader, "moved") == {cut.address})
    cluster.set_eligible(leader.name, True)
    cluster.set_eligible(other.name, True)
    shims = instance_pids(cut)
    assert shims, "no instance of the app found in the cut-off server's data dir"
    os.killpg(cut.proc.pid, signal.SIGSTOP)  # its instances (own sessions) keep running, as on a partitioned host
    try:
        cut_at = time.monotonic()
        wait_for("the instance to be replaced on another node",
                 lambda: hosts(leader, "moved") - {cut.address} != set(), timeout=45)
        print(f"\ninstance of a cut-off server replaced after {time.monotonic() - cut_at:.2f}s "
              f"(lease {TTL}s, --node-lost-after {LOST_AFTER}s)")
        # From now on (its lease long expired, its node critical) the superseded instance must never pass: when its
        # server resumes, it stops that instance before it marks its node passing again.
        passing_on: set[str] = set()
        watching = threading.Event()
        watcher = threading.Thread(target=watch_passing_nodes, args=(leader, "moved", passing_on, watching))
        watcher.start()
    finally:
        os.killpg(cut.proc.pid, signal.SIGCONT)
    try:
        wait_for("the superseded instance stopped once its server is back", lambda: not any(alive(p) for p in shims))
        wait_for("one instance, not on the server that was cut off",
                 lambda: running(leader, "moved") == 1 and cut.address not in hosts(leader, "moved"))
        node_health = leader.url + f"/v1/health/node/{cut.name}"
        wait_for("the resumed server's node passing again", lambda: all(
            c["Status"] == "passing" for c in requests.get(node_health, timeout=5).json()))
    finally:
        watching.set()
        watcher.join(10)
    assert cut.name not in passing_on, "the superseded instance was counted passing after its server resumed"


def watch_passing_nodes(server: ClusterServer, service: str, seen: set[str], stop: threading.Event) -> None:
    """Adds the node of every instance of `service` that ?passing names, until `stop`."""
    while not stop.is_set():
        try:
            entries = requests.get(server.url + f"/v1/health/service/{service}?passing", timeout=2).json()
        except (requests.RequestException, ValueError):
            continue
        seen.update(e["Node"]["Node"] for e in entries)
        stop.wait(0.05)


def instance_pids(server: ClusterServer) -> list[int]:
    pids = []
    for state_file in (server.data_dir / "agent" / "instances").glob("*/state.json"):
        state = json.loads(state_file.read_text())
        pids.append(int(state["shim_pid"]))
    return [p for p in pids if alive(p)]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


# ---- several etcd members in --store -------------------------------------------------------------------------


async def test_the_etcd_store_skips_a_member_that_cannot_be_reached(tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd").start()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a member that is down
    store = await EtcdStore.open(f"{dead},{etcd.url}", namespace="members/")
    try:
        watcher = await store.watch("k", prefix=True).start()
        revision = await store.put("k/1", b"v")
        assert (await store.get("k/1")) is not None and store.url == etcd.url
        batch = await watcher.__anext__()
        assert batch[0].kv.key == "k/1" and batch[0].revision == revision
        watcher.cancel()
    finally:
        await store.close()
        etcd.stop()


def test_a_server_given_several_etcd_members_serves_while_one_is_down(tmp_path: Path, etcd: EtcdProcess) -> None:
    members = f"127.0.0.1:{free_port()},127.0.0.1:{etcd.client_port}"
    server = ServerProcess(tmp_path / "data", "--store", f"etcd://{members}/{NAMESPACE}", "--single-server",
                           "--no-gateway", "--vault-port", "0").start()
    try:
        assert requests.put(server.url + "/v1/kv/greeting", data=b"hi", timeout=5).json() is True
        assert requests.get(server.url + "/v1/kv/greeting?raw", timeout=5).content == b"hi"
    finally:
        server.stop()


def test_a_lock_held_through_a_server_that_dies_is_released(cluster: Cluster) -> None:
    leader = wait_for("one leader", cluster.agreed_leader)
    holder, other = [s for s in cluster.servers if s is not leader]
    # A session made through a server belongs to that server's node and, as in Consul, to its serfHealth check.
    session = requests.put(holder.url + "/v1/session/create", json={"Name": "singleton"}, timeout=5).json()["ID"]
    assert requests.put(holder.url + f"/v1/kv/service/lock?acquire={session}", data=b"me", timeout=5).json() is True
    entry = requests.get(other.url + "/v1/kv/service/lock", timeout=5).json()[0]
    assert entry["Session"] == session
    holder.kill9()
    # The leader marks the dead server's node critical; session invalidation (the leader's) frees the lock.
    wait_for("the lock released", lambda: "Session" not in requests.get(
        other.url + "/v1/kv/service/lock", timeout=5).json()[0], timeout=30)
    assert requests.get(other.url + f"/v1/session/info/{session}", timeout=5).json() in (None, [])


async def test_a_server_back_under_a_new_id_is_one_member_alive(tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd").start()
    store = await EtcdStore.open(etcd.url, namespace="rejoin/")
    try:
        before = ServerCluster(store, ServerInfo("id-1", "node-a", "127.0.0.2", 1), ttl=TTL)
        await before.start()
        await before.stop()  # left
        assert [(m.server.name, m.status) for m in await before.members()] == [("node-a", 3)]
        after = ServerCluster(store, ServerInfo("id-2", "node-a", "127.0.0.2", 1), ttl=TTL)  # --dev: a new id
        await after.start()
        try:
            # One member, alive: the node liveness of the leader never takes it for the one that left.
            assert [(m.server.id, m.status) for m in await after.members()] == [("id-2", 1)]
        finally:
            await after.stop()
    finally:
        await store.close()
        etcd.stop()
