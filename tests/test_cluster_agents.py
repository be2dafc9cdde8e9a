"""`shipyard agent` on machines without a server, in network namespaces: a server (SQLite, bound on a bridge address
of the host's namespace) and two agents, each in its own namespace with its own address on the bridge. One agent's
link is cut: its instance turns critical, is replaced on the other agent, and is stopped once the link is back; no
moment has more passing instances than count + max_parallel. The other agent is an entry point: a client in the
host's namespace loops through its gateway all along (no request may fail), and its DNS names the instances of
both agents.

It runs the configuration the docs give for production: the server locked down (ACLs on default deny, TLS with a CA
made by `shipyard tls`), each agent reaching it over HTTPS with its own token (its node's write, the store), and
the instances using the service tokens their agent hands them.

Needs root (ip netns); every name carries this process's id, and everything it creates is deleted at the end.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from shipyard.api.local_agent import node_agent_rules
from support import ServerProcess, acl_token, free_port, need_peer, wait_for, wait_until_answering, wait_until_ready

pytestmark = pytest.mark.xdist_group("netns")

MANAGEMENT = "6a1f3c1e-9f0d-4c55-8c59-2f4a2b7d1e01"
TTL = 2  # the agents' --heartbeat-ttl
LOST_AFTER = 3  # the server's --node-lost-after
COUNT, MAX_PARALLEL = 2, 1
APP = """\
import http.server, json, os, urllib.request
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["HOST"].encode()  # which agent answered, seen through the gateway
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
print("hello from", os.environ["SHIPYARD_ALLOC_ID"], "on", os.environ["HOST"], "control",
      os.environ["SHIPYARD_HTTP_ADDR"], flush=True)
# The platform through its agent's local API, with the service token the agent handed it (ACLs deny anonymous).
ask = urllib.request.Request("http://" + os.environ["SHIPYARD_HTTP_ADDR"] + "/v1/catalog/nodes",
                             headers={"X-Consul-Token": os.environ["SHIPYARD_HTTP_TOKEN"]})
print("nodes:", *sorted(n["Node"] for n in json.load(urllib.request.urlopen(ask, timeout=10))), flush=True)
http.server.HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""


def netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"sytest-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@dataclass
class Lab:
    """A bridge in its own namespace; the host's namespace on it at .254, each agent's namespace at .1, .2..."""

    tag: str
    net: str

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def ns(self, i: int) -> str:
        return f"{self.tag}-a{i}"

    def veth(self, i: int) -> str:
        return f"{self.tag}a{i}"  # <= 15 characters

    def addr(self, i: int) -> str:
        return f"{self.net}.{i}"

    def up(self, agents: int) -> None:
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        self._plug(self.veth(0), None, self.addr(254))
        for i in range(1, agents + 1):
            ip("netns", "add", self.ns(i))
            ip("-n", self.ns(i), "link", "set", "lo", "up")
            self._plug(self.veth(i), self.ns(i), self.addr(i))

    def _plug(self, name: str, netns: str | None, address: str) -> None:
        ip("link", "add", name, "type", "veth", "peer", "name", name + "b")
        ip("link", "set", name + "b", "netns", self.hub)
        ip("-n", self.hub, "link", "set", name + "b", "master", "br0", "up")
        where = ["-n", netns] if netns else []
        if netns:
            ip("link", "set", name, "netns", netns)
        ip(*where, "addr", "add", f"{address}/24", "dev", name)
        ip(*where, "link", "set", name, "up")

    def link(self, i: int, state: str) -> None:
        ip("-n", self.ns(i), "link", "set", self.veth(i), state)

    def down(self, agents: int) -> None:
        # Deleting a namespace deletes its veth ends, and with them their peers (the host's one too).
        for name in [self.hub, *(self.ns(i) for i in range(1, agents + 1))]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Pki:
    """A CA and the server's certificate for its bridge address, made by `shipyard tls` as an operator would."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, where: Path, address: str) -> Pki:
        where.mkdir()
        for args in (["ca", "create"], ["cert", "create", "--server", "--ip", address]):
            made = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "tls", *args, "--dir", str(where)],
                                  capture_output=True, text=True, timeout=60, cwd=where)
            assert made.returncode == 0, made.stderr
        return cls(where / "consul-agent-ca.pem", where / "dc1-server-consul-0.pem",
                   where / "dc1-server-consul-0-key.pem")

    def client_cert(self, address: str) -> tuple[Path, Path]:
        """An agent's certificate naming its address: it serves its --port over HTTPS with it."""
        where = self.ca.parent
        before = set(where.glob("dc1-client-consul-*.pem"))
        made = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "tls", "cert", "create", "--client",
                               "--ip", address, "--dir", str(where)], capture_output=True, text=True, timeout=60,
                              cwd=where)
        assert made.returncode == 0, made.stderr
        [cert] = [p for p in set(where.glob("dc1-client-consul-*.pem")) - before if not p.name.endswith("-key.pem")]
        return cert, cert.with_name(cert.name.removesuffix(".pem") + "-key.pem")


class LabServer(ServerProcess):
    """Locked down (ACLs on default deny and TLS), so it may bind its bridge address without --insecure-bind."""

    def __init__(self, data_dir: Path, address: str, pki: Pki) -> None:
        self.https_port = free_port()
        super().__init__(data_dir, "--bind", address, "--no-gateway", "--vault-port", "0", "--node", "srv",
                         "--node-lost-after", str(LOST_AFTER), "--acl", "--acl-initial-management", MANAGEMENT,
                         "--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca),
                         "--https-port", str(self.https_port), dev=True)
        self.address, self.pki = address, pki
        self.http = self.session()

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.https_port}"

    @property
    def addr(self) -> str:
        return f"{self.address}:{self.https_port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # With TLS, plain HTTP stays on loopback (this namespace's): readiness is asked there.
        wait_until_answering(self.proc, f"http://127.0.0.1:{self.http_port}/v1/status/leader", (200,),
                             "server", self.log_path, timeout)
        wait_until_ready(self.proc, self.log_path, offset, timeout)
        return self

    def session(self) -> requests.Session:
        """The operator's: the management token, the server's certificate checked against the CA."""
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace `verify`
        session.headers["X-Consul-Token"] = MANAGEMENT
        session.verify = str(self.pki.ca)
        return session

    def agent_token(self, node: str) -> str:
        """What an agent needs: write its own node (and its instances' service tokens), the store."""
        return acl_token(self.url, MANAGEMENT, f"agent-{node}", node_agent_rules(node), verify=str(self.pki.ca))

    def dns_token(self) -> str:
        """Consul's way to let DNS answer under default deny: a token of the builtin/dns templated policy."""
        made = self.http.put(self.url + "/v1/acl/token", json={
            "Description": "agents' DNS", "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]}, timeout=10)
        assert made.status_code == 200, made.text
        return str(made.json()["SecretID"])


class AgentProcess:
    def __init__(self, lab: Lab, i: int, server: LabServer, base: Path) -> None:
        self.name, self.netns, self.address = f"agent-{i}", lab.ns(i), lab.addr(i)
        self.port = free_port()
        self.data_dir = base / self.name
        self.log_path = base / f"{self.name}.log"
        # Agent 2 is given a server that is down first: it must go on to the next one (its gateway workers too).
        dead = ["--server", f"https://{server.address}:{free_port()}"] if i == 2 else []
        self.dns_port, self.gateway_port = free_port(), free_port()
        # Agent 2 is an entry point: its gateway on its bridge address (allowed: HTTPS servers, ACLs, a token).
        # Both agents' DNS answer on their bridge address for the same reason.
        entry = ["--gateway", "--gateway-port", str(self.gateway_port)] if i == 2 else []
        cert, key = server.pki.client_cert(self.address)  # its --port (logs, usage, metrics) is HTTPS
        self.command = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "shipyard.cli.main", "agent",
                        *dead, "--server", server.url, "--ca-file", str(server.pki.ca), "--node", self.name,
                        "--advertise", self.address, "--port", str(self.port), "--meta", f"rack=r{i}",
                        "--data-dir", str(self.data_dir), "--heartbeat-ttl", str(TTL), "--drain-delay", "0.2",
                        "--dns-port", str(self.dns_port), "--client-cert", str(cert), "--client-key", str(key),
                        *entry]
        self.token, self.dns_token = server.agent_token(self.name), server.dns_token()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["SHIPYARD_HTTP_TOKEN"] = self.token  # from the environment, never on a command line
        env["SHIPYARD_DNS_TOKEN"] = self.dns_token
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)

    def shim_pids(self) -> list[int]:
        pids = []
        for state_file in (self.data_dir / "agent" / "instances").glob("*/state.json"):
            with_state = json.loads(state_file.read_text())
            pids.append(int(with_state["shim_pid"]))
        return [p for p in pids if alive(p)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.shim_pids():  # instances outlive their agent by design; a test leaves none behind
            os.kill(pid, signal.SIGTERM)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


class PassingWatch:
    """Polls /v1/health/service/web?passing in the background: the most passing instances ever seen at once."""

    def __init__(self, server: LabServer) -> None:
        self.url = server.url
        self.http = server.session()
        self.most = 0
        self.seen: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PassingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entries = self.http.get(self.url + "/v1/health/service/web?passing", timeout=2).json()
            except (requests.RequestException, ValueError):
                continue
            where = sorted(f"{e['Service']['ID']}@{e['Node']['Node']}" for e in entries)
            if len(where) > self.most:
                self.most = len(where)
            if not self.seen or self.seen[-1][1] != where:
                self.seen.append((time.monotonic(), where))
            self._stop.wait(0.1)


class GatewayLoad:
    """One client in the host's namespace looping GETs through an agent's gateway (keep-alive, 5 s timeout): every
    non-200 or transport error is a failure; answers are counted by the agent address the instance gave."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.by_answer: dict[str, int] = {}
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GatewayLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = session.get(self.url, timeout=5)
                except requests.RequestException as exc:
                    self.failures.append(f"{started:.2f} {exc}")
                    continue
                self.slowest = max(self.slowest, time.monotonic() - started)
                if r.status_code != 200:
                    self.failures.append(f"{started:.2f} {r.status_code} {r.text[:100]}")
                    continue
                self.ok += 1
                self.by_answer[r.text] = self.by_answer.get(r.text, 0) + 1
                self._stop.wait(0.01)


def dig(agent: AgentProcess, name: str, *, inside: bool = False) -> set[str]:
    """The A records the agent's DNS gives for name, over UDP: asked from the host's namespace at its address, or
    from inside its own namespace at 127.0.0.1."""
    where = ["ip", "netns", "exec", agent.netns] if inside else []
    out = subprocess.run([*where, "dig", f"@{'127.0.0.1' if inside else agent.address}", "-p", str(agent.dns_port),
                          "+short", "+time=2", "+tries=1", name], capture_output=True, text=True, timeout=10)
    return set(out.stdout.split()) if out.returncode == 0 else set()


def answered_by(url: str) -> set[str]:
    return {requests.get(url, timeout=5).text for _ in range(6)}


def remove_stale_labs() -> None:
    """Namespaces a run killed before its teardown left behind (its pid gone, nothing running inside)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        head, _, rest = name.partition("-")
        if not (head.startswith("sy") and head[2:].isdigit() and rest in ("hub", "a1", "a2")):
            continue
        pid = int(head[2:])
        inside = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.strip()
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists() and not inside:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, LabServer, list[AgentProcess]]]:
    need_peer("network namespaces", netns_usable(), "needs root and iproute2 (ip netns)")
    need_peer("dig", shutil.which("dig") is not None, "asks the agent's DNS (apt-get install dnsutils)")
    remove_stale_labs()
    tag = f"sy{os.getpid()}"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    lab = Lab(tag, net)
    agents: list[AgentProcess] = []
    server: LabServer | None = None
    try:
        lab.up(2)
        server = LabServer(tmp_path / "server", lab.addr(254), Pki.make(tmp_path / "pki", lab.addr(254)))
        server.start()
        agents = [AgentProcess(lab, i, server, tmp_path) for i in (1, 2)]
        for agent in agents:
            agent.start()
        yield lab, server, agents
    finally:
        for agent in agents:
            agent.stop()
        if server is not None:
            server.stop()
        lab.down(2)


def passing_nodes(server: LabServer) -> dict[str, str]:
    """alloc id -> node of every passing instance of web."""
    entries = server.http.get(server.url + "/v1/health/service/web?passing", timeout=5).json()
    return {e["Service"]["ID"]: e["Node"]["Node"] for e in entries}


def members(server: LabServer) -> dict[str, tuple[str, int]]:
    listed = server.http.get(server.url + "/v1/agent/members", timeout=5).json()
    return {m["Name"]: (m["Addr"], m["Status"]) for m in listed}


def check_agents_listed(server: LabServer, cut: AgentProcess, other: AgentProcess) -> None:
    """Members (API and CLI) and catalog nodes list the agents at their advertised addresses, with their meta."""
    wait_for("both agents alive among the members", lambda: all(
        members(server).get(a.name) == (a.address, 1) for a in (cut, other)), timeout=30)

    def both_nodes() -> dict[str, Any] | None:
        nodes = {n["Node"]: n for n in server.http.get(server.url + "/v1/catalog/nodes", timeout=5).json()}
        return nodes if {cut.name, other.name} <= nodes.keys() else None

    # An agent is a member (its heartbeat lease) a moment before it has registered its node in the catalog.
    nodes = wait_for("both agents' nodes in the catalog", both_nodes, timeout=30)
    assert nodes[cut.name]["Address"] == cut.address and nodes[cut.name]["Meta"]["rack"] == "r1"
    env = {**os.environ, "CONSUL_HTTP_TOKEN": MANAGEMENT, "CONSUL_CACERT": str(server.pki.ca)}
    listed = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", server.url, "members"],
                            capture_output=True, text=True, timeout=30, env=env)
    assert listed.returncode == 0 and f"{cut.address}:{cut.port}" in listed.stdout, listed.stdout + listed.stderr


def deploy_web(server: LabServer, tmp_path: Path, cut: AgentProcess, other: AgentProcess) -> tuple[str, str]:
    """The job, spread over the agents' racks: (its instance on `cut`, its instance on `other`) once passing."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    spec: dict[str, Any] = {"name": "web", "args": [sys.executable, str(app)], "instances": COUNT,
                            "ports": {"http": {}},
                            "health": {"http": "/", "interval": "1s", "timeout": "1s", "grace": "2s"},
                            "resources": {"cpu": 10, "memory": 32}, "stop_grace": "2s",
                            "spread": [{"attribute": "${meta.rack}"}],
                            "update": {"max_parallel": MAX_PARALLEL, "min_healthy_time": "1s"},
                            "routes": [{"paths": ["/web"], "strip_path": True}]}
    r = server.http.post(server.url + "/api/v1/jobs", json=spec, timeout=10)
    assert r.status_code in (200, 201), r.text

    def one_on_each() -> dict[str, str] | None:
        placed = passing_nodes(server)
        return placed if sorted(placed.values()) == [cut.name, other.name] else None

    placed = wait_for("one passing instance on each agent", one_on_each, timeout=45)
    by_node = {node: alloc for alloc, node in placed.items()}
    return by_node[cut.name], by_node[other.name]


def check_relayed(server: LabServer, on: dict[str, AgentProcess]) -> None:
    """Logs and usage asked of the server come from the agent that runs the instance; an agent's own port serves
    no one without its secret. Instances reach the platform through their agent's local API (127.0.0.1:8500 in
    its namespace) with the service token it handed them; it answers from a server (agent 2 was given a dead one
    first)."""
    for alloc, agent in on.items():
        logs = server.http.get(server.url + f"/api/v1/allocs/{alloc}/logs", timeout=10)
        assert logs.status_code == 200, logs.text
        assert f"hello from {alloc} on {agent.address} control 127.0.0.1:8500" in logs.text, logs.text
        assert "nodes: agent-1 agent-2 srv" in logs.text, logs.text
    allocs = server.http.get(server.url + "/api/v1/allocs?job=web&usage=1", timeout=10).json()["allocations"]
    usage = {a["id"]: a["usage"] for a in allocs}
    assert all(usage[alloc]["rss_bytes"] > 0 for alloc in on), allocs
    for alloc, agent in on.items():
        # The agents' ports are HTTPS (their certificates name their addresses, checked by the server that
        # relayed the above), and serve no one without the secret.
        base = f"https://{agent.address}:{agent.port}/api/v1"
        assert requests.get(f"{base}/allocs/{alloc}/logs", timeout=5, verify=str(server.pki.ca)).status_code == 403
        assert requests.get(f"{base}/node-usage", timeout=5, verify=str(server.pki.ca)).status_code == 403
        with pytest.raises(requests.ConnectionError):
            requests.get(base.replace("https://", "http://") + "/node-usage", timeout=5)
    # The server's own node agent, on the server's bridge address, serves HTTPS with the server's certificate: its
    # record (what a server reads to call it) says so, and its secret gets an answer there, checked against the CA.
    kvs = server.http.get(server.url + "/api/v1/store/kv/cluster/agent-members/srv", timeout=5).json()["kvs"]
    record = json.loads(base64.b64decode(kvs[0]["value"]))
    assert record["tls"] is True and record["address"] == server.address, record
    own = f"https://{server.address}:{record['logs_port']}/api/v1/node-usage"
    answer = requests.get(own, headers={"X-Shipyard-Agent-Secret": record["logs_secret"]}, timeout=5,
                          verify=str(server.pki.ca))
    assert answer.status_code == 200, answer.text


def instance_critical(server: LabServer, node: str) -> bool:
    entries = server.http.get(server.url + "/v1/health/service/web", timeout=5).json()
    mine = [e for e in entries if e["Node"]["Node"] == node]
    return bool(mine) and all(any(c["Status"] == "critical" and c["ServiceID"] for c in e["Checks"]) for e in mine)


def back_and_clean(server: LabServer, node: str) -> bool:
    """The agent alive again, its node passing, and nothing of web left registered on it."""
    node_checks = server.http.get(server.url + f"/v1/health/node/{node}", timeout=5).json()
    web_nodes = {e["Node"]["Node"] for e in server.http.get(server.url + "/v1/health/service/web", timeout=5).json()}
    return members(server)[node][1] == 1 and all(c["Status"] == "passing" for c in node_checks) \
        and node not in web_nodes


def test_an_agent_cut_off_has_its_instance_replaced_and_stops_it_when_back(
        lab: tuple[Lab, LabServer, list[AgentProcess]], tmp_path: Path) -> None:
    net, server, (cut, other) = lab
    # Only the agents run instances: the server's own node is not eligible.
    r = server.http.post(server.url + "/api/v1/nodes/srv/eligibility", json={"eligible": False}, timeout=5)
    assert r.status_code == 200, r.text
    check_agents_listed(server, cut, other)
    on_cut, on_other = deploy_web(server, tmp_path, cut, other)
    check_relayed(server, {on_cut: cut, on_other: other})
    # Agent 2 as an entry point: its gateway (reached from the host's namespace) and its DNS see both agents.
    gateway = f"http://{other.address}:{other.gateway_port}/web/"
    both = {cut.address, other.address}
    wait_for("agent 2's gateway answering from both agents", lambda: answered_by(gateway) == both, timeout=15)
    wait_for("agent 2's DNS naming the instances of both agents", lambda: dig(other, "web.service.consul") == both,
             timeout=10)
    # Agent 1 (HTTPS servers, ACLs, a token: no --insecure-bind needed) answers on its address, not loopback.
    assert dig(cut, "web.service.consul") == both
    assert dig(cut, "web.service.consul", inside=True) == set()

    shims = cut.shim_pids()
    assert shims, f"no instance found in {cut.data_dir}: {cut.log_tail()}"
    with PassingWatch(server) as watch, GatewayLoad(gateway) as load:
        wait_for("the load answered by both agents", lambda: len(load.by_answer) == 2, timeout=10)
        net.link(1, "down")
        cut_at = time.monotonic()
        wait_for("the cut-off agent's instance critical", lambda: instance_critical(server, cut.name),
                 timeout=TTL + 10)
        critical_after = time.monotonic() - cut_at
        assert members(server)[cut.name][1] == 4
        wait_for("two passing instances, both on the other agent", lambda: list(
            passing_nodes(server).values()) == [other.name] * COUNT, timeout=20)
        replaced_after = time.monotonic() - cut_at
        assert all(alive(p) for p in shims), "an agent that cannot reach a server keeps its instances running"
        wait_for("agent 2's DNS naming only its own instances", lambda: dig(other, "web.service.consul") == {
            other.address}, timeout=10)

        net.link(1, "up")
        back_at = time.monotonic()
        wait_for("the superseded instance stopped once the agent is back",
                 lambda: not any(alive(p) for p in shims), timeout=30)
        stopped_after = time.monotonic() - back_at
        wait_for("the agent alive again, its node passing and without web", lambda: back_and_clean(server, cut.name),
                 timeout=30)
        assert sorted(passing_nodes(server).values()) == [other.name] * COUNT
    print(f"\nagent cut off (lease {TTL}s, --node-lost-after {LOST_AFTER}s): its instance critical after "
          f"{critical_after:.2f}s, replaced on the other agent after {replaced_after:.2f}s; link back: the "
          f"superseded instance stopped after {stopped_after:.2f}s; most passing at once: {watch.most}; through "
          f"agent 2's gateway: {load.ok} answered {load.by_answer}, {len(load.failures)} failed, slowest "
          f"{load.slowest:.2f}s")
    assert watch.most <= COUNT + MAX_PARALLEL, f"more than count + max_parallel passing at once: {watch.seen}"
    assert not load.failures, f"requests through the gateway failed: {load.failures[:5]}\n{other.log_tail()}"
    other.stop()  # SIGTERM: it says it left
    wait_for("the stopped agent listed as left", lambda: members(server)[other.name] == (other.address, 3), timeout=15)


# ---- without namespaces: the agent's flags --------------------------------------------------------------------


def test_bad_agent_flags_are_one_clear_line(tmp_path: Path) -> None:
    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir", str(tmp_path / "d"),
                               *args], capture_output=True, text=True, timeout=30)

    wrong_scheme = agent("--server", "ftp://10.0.0.1:8500")
    assert wrong_scheme.returncode != 0 and "ftp://10.0.0.1:8500" in wrong_scheme.stderr
    assert len(wrong_scheme.stderr.strip().splitlines()) == 1, wrong_scheme.stderr
    no_value = agent("--server", "127.0.0.1:8500", "--meta", "rack")
    assert no_value.returncode == 2 and "key=value" in no_value.stderr, no_value.stderr
    wildcard = agent("--server", "127.0.0.1:8500", "--advertise", "0.0.0.0")
    assert wildcard.returncode != 0 and "--advertise" in wildcard.stderr, wildcard.stderr
    # A gateway facing the network needs HTTPS servers with ACLs and a token, as a server's non-loopback bind does.
    exposed = agent("--server", "10.0.0.1:8500", "--advertise", "10.0.0.7", "--gateway")
    assert exposed.returncode != 0 and "--insecure-bind" in exposed.stderr, exposed.stderr
    assert len(exposed.stderr.strip().splitlines()) == 1, exposed.stderr
    # The local API's port taken (a server on this machine holds 8500): one line naming --http-port.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = agent("--server", "127.0.0.1:8500", "--http-port", str(taken.getsockname()[1]), "--dns-port", "0")
    assert busy.returncode != 0 and "--http-port" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert not (tmp_path / "d").exists()  # refused before it touched anything


def test_an_agents_gateway_and_the_servers_share_rate_limits(tmp_path: Path) -> None:
    """An agent on this machine's loopback with --gateway, and a lone server (SQLite) with its own gateway: a
    `day: 10` limit holds across both, either way; the agent's DNS answers too."""
    need_peer("dig", shutil.which("dig") is not None, "asks the agent's DNS (apt-get install dnsutils)")
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "http.server", str(upstream_port), "--bind", "127.0.0.1",
                                 "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerProcess(tmp_path / "server", "--vault-port", "0", "--node", "srv", dev=True)
    dns_port, gateway_port = free_port(), free_port()
    log_path = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        admin = server.url + "/api/gateway"
        configuration: list[tuple[str, dict[str, Any]]] = [
            ("/upstreams", {"name": "files"}), ("/upstreams/files/targets", {"target": f"127.0.0.1:{upstream_port}"}),
            ("/services", {"name": "files", "host": "files"}),
            ("/services/files/routes", {"name": "limited", "paths": ["/limited"]}),
            ("/routes/limited/plugins", {"name": "rate-limiting", "config": {"day": 10}})]
        for path, body in configuration:
            r = requests.post(admin + path, json=body, timeout=10)
            assert r.status_code == 201, r.text
        with open(log_path, "ab") as log:
            agent = subprocess.Popen([sys.executable, "-m", "shipyard.cli.main", "agent", "--server", server.addr,
                                      "--node", "edge", "--port", str(free_port()), "--data-dir", str(tmp_path / "a"),
                                      "--dns-port", str(dns_port), "--gateway", "--gateway-port", str(gateway_port),
                                      "--http-port", "0"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        edge = f"http://127.0.0.1:{gateway_port}/limited/"
        wait_for("the agent's gateway", lambda: requests.get(edge, timeout=5).status_code == 200, timeout=30)
        assert "127.0.0.1" in subprocess.run(["dig", "@127.0.0.1", "-p", str(dns_port), "+short", "edge.node.consul"],
                                             capture_output=True, text=True, timeout=10).stdout

        def counts_published(expected: list[int]) -> bool:
            """The gateways' keys hold what each admitted (each key: b"SRL1" and entries of key hash, window start,
            window length, count; gateway/cluster_counters.py)."""
            kvs = requests.get(server.url + "/api/v1/store/kv/gateway-counters/?prefix=1", timeout=5).json()["kvs"]
            raw = [base64.b64decode(kv["value"])[4:] for kv in kvs]
            return sorted(sum(entry[3] for entry in struct.iter_unpack("<Qqqq", r)) for r in raw) == expected

        through_server = [requests.get(server.gateway_url + "/limited/", timeout=5).status_code for _ in range(8)]
        assert through_server == [200] * 8
        wait_for("both gateways' counts in the store", lambda: counts_published([1, 8]), timeout=10)
        through_agent = [requests.get(edge, timeout=5).status_code for _ in range(5)]
        # And the other way: the server's gateway counts what the agent's admitted.
        wait_for("the agent's second request in the store", lambda: counts_published([2, 8]), timeout=10)
        server_after = requests.get(server.gateway_url + "/limited/", timeout=5).status_code
    finally:
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(15)
        server.stop()
        upstream.terminate()
        upstream.wait(10)
    # 1 through the agent while waiting for it, 8 through the server (seen in the store, hence on its way to the
    # agent's counters file through its watch): 1 left of 10.
    admitted = through_agent.count(200)
    print(f"\n`day: 10` over a server's and an agent's gateways: 1 + 8 admitted, then {admitted} of 5 via the agent")
    assert through_agent == [200] + [429] * 4, (through_agent, log_path.read_text()[-2000:])
    assert server_after == 429
