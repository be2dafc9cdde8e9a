"""Secrets of instances placed on a `shipyard agent` node (a real server with --acl and its engine, and a real agent
on loopback): the instance gets its secret as env and as a file on the agent's tmpfs, under its own engine token
minted by the server for that node and allocation; nothing in either data dir holds a value; a changed secret reaches
a new instance (change_mode restart) or the running one (signal); another node's agent token, and an allocation not
placed on the caller's node, are refused; a stopped instance's token is revoked and its files removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from hvac import exceptions as hvac_errors

from shipyard.api.local_agent import node_agent_rules
from shipyard.api.vault.delivery import files_root_for
from support import EtcdProcess, acl_token, free_port, need_peer, rabbit_up, wait_for
from vault_support import VaultServer, init_and_unseal

MANAGEMENT = str(uuid.uuid4())
ROOT = "agent-secrets-root"
APP = Path(__file__).parent / "apps" / "vault_reader.py"
PASSWORD = "edge-db-password-4e1f"


@dataclass
class Setup:
    server: VaultServer
    agent_token: str
    agent_log: Path
    agent_dir: Path
    base: Path


def call(base: str, method: str, path: str, token: str = MANAGEMENT, **kw: Any) -> requests.Response:
    return requests.request(method, base + path, headers={"X-Consul-Token": token} if token else {},
                            timeout=kw.pop("timeout", 10), **kw)


def node_token(server: VaultServer, node: str) -> str:
    """A token as an agent of `node` is given: its node and the store."""
    return acl_token(server.url, MANAGEMENT, f"agent-{node}", node_agent_rules(node))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("agent-secrets")
    server = VaultServer(base / "server", "--acl", "--acl-initial-management", MANAGEMENT, "--node", "srv",
                         "--vault-dev", "--vault-dev-root-token-id", ROOT)
    agent: subprocess.Popen[bytes] | None = None
    log_path = base / "agent.log"
    try:
        server.start()
        admin = server.client(ROOT)
        admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": PASSWORD})
        admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
        token = node_token(server, "edge")
        env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_ADDR")}
        env["SHIPYARD_HTTP_TOKEN"] = token
        with open(log_path, "ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", server.addr, "--node", "edge",
                 "--port", str(free_port()), "--dns-port", "0", "--http-port", "0",
                 "--data-dir", str(base / "agent"), "--drain-delay", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_for("the agent's node", lambda: any(
            n["Node"] == "edge" for n in call(server.url, "GET", "/v1/catalog/nodes").json()), timeout=30)
        # Everything goes to the agent's node.
        make_ineligible(server.url, "srv", MANAGEMENT)
        yield Setup(server, token, log_path, base / "agent", base)
    finally:
        stop_all(agent, server, base / "agent")


def make_ineligible(url: str, node: str, token: str = "") -> None:
    """Nothing is placed on `node` (a server's): everything goes to the agent's (once the node is known)."""
    wait_for(f"node {node} ineligible", lambda: call(url, "POST", f"/api/v1/nodes/{node}/eligibility", token=token,
                                                      json={"eligible": False}).status_code == 200, timeout=30)


def stop_all(agent: subprocess.Popen[bytes] | None, server: VaultServer, agent_dir: Path) -> None:
    """The agent, the server, the instances (they outlive their agent by design) and the agent's tmpfs folder."""
    if agent is not None and agent.poll() is None:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(15)
    server.stop()
    for state in (agent_dir / "agent" / "instances").glob("*/state.json"):
        try:
            os.kill(int(json.loads(state.read_text())["shim_pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
    shutil.rmtree(files_root_for(str(agent_dir)), ignore_errors=True)


def deploy(setup: Setup, name: str, out: Path, change_mode: str) -> None:
    spec = {"name": name, "args": [sys.executable, str(APP)], "instances": 1, "stop_grace": "1s",
            "resources": {"cpu": 10, "memory": 128},  # the SDK, on SIGHUP, takes ~50 MB
            "env": {"OUT": str(out), "OWN": "secret/data/mediahub/db", "OTHER": "secret/data/billing/db"},
            "secrets": {"DB_PASSWORD": "secret/data/mediahub/db#password"},
            "vault": {"policies": ["mediahub-db"], "change_mode": change_mode,
                      "files": {"db.password": "secret/data/mediahub/db#password"}},
            "update": {"max_parallel": 1, "min_healthy_time": "0s"}}
    deployed = call(setup.server.url, "POST", "/api/v1/jobs", json=spec)
    assert deployed.status_code in (200, 201), deployed.text


def report_of(out: Path, until: Callable[[dict[str, Any]], bool] = bool, timeout: float = 60) -> dict[str, Any]:
    def read() -> dict[str, Any] | None:
        try:
            report = dict(json.loads(out.read_text()))
        except (OSError, ValueError):
            return None
        return report if until(report) else None

    found = wait_for(f"the instance's report in {out.name}", read, timeout=timeout)
    assert isinstance(found, dict)
    return found


def every_alloc_of(setup: Setup, job: str) -> list[dict[str, Any]]:
    listed = call(setup.server.url, "GET", "/api/v1/allocs").json()
    items = listed.get("allocations", listed) if isinstance(listed, dict) else listed
    return [a for a in items if a.get("job") == job]


def allocs_of(setup: Setup, job: str) -> list[dict[str, Any]]:
    return [a for a in every_alloc_of(setup, job) if a.get("desired") == "run"]


def the_alloc_of(setup: Setup, job: str) -> dict[str, Any]:
    """The job's one allocation to run, once a rolling update has stopped the previous one (the whole listing is
    in the message when it does not come)."""
    try:
        found = wait_for(f"one allocation of {job} to run", lambda: len(allocs_of(setup, job)) == 1, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; every allocation of {job}: {every_alloc_of(setup, job)}") from None
    assert found
    [alloc] = allocs_of(setup, job)
    return alloc


def holding(folder: Path, values: list[str]) -> list[str]:
    """Files under `folder` holding any of `values`, read as bytes (logs, launch and state files included)."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            found += [f"{path}: {value[:6]}…" for value in values if value.encode() in blob]
    return found


def test_an_instance_on_an_agent_reads_its_secrets_and_nothing_is_on_disk(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    deploy(setup, "mediahub", out, "restart")
    report = report_of(out)
    assert report["DB_PASSWORD"] == PASSWORD and report["token_prefix"] == "hvs.", report
    assert (report["own"], report["other"]) == (200, 403)  # its token reads its secret, not another job's
    files = report["secret_files"]
    assert files["files"] == {"db.password": PASSWORD}
    assert files["dir_mode"] == "0o700" and files["modes"] == {"db.password": "0o600"}
    assert files["dir"].startswith("/dev/shm/") or not Path("/dev/shm").is_dir()
    assert not files["dir"].startswith(str(setup.base))
    alloc = the_alloc_of(setup, "mediahub")
    assert alloc["node"] == "edge", alloc
    # The token was minted for that node and allocation.
    looked_up = setup.server.client(ROOT).auth.token.lookup_accessor(report["accessor"])["data"]
    assert looked_up["meta"] == {"job": "mediahub", "node": "edge", "alloc": alloc["id"]}, looked_up
    # The values travelled in memory only: nowhere in either data dir, nor in the agent's or the server's log.
    values = [PASSWORD, report["token"]]
    assert holding(setup.agent_dir, values) == [] and holding(setup.server.data_dir, values) == []
    logs = setup.agent_log.read_bytes() + setup.server.log_path.read_bytes()
    assert not [v for v in values if v.encode() in logs]


def test_the_route_is_for_the_callers_own_node_and_its_allocations(setup: Setup, tmp_path: Path) -> None:
    # Its own deployment, so that it holds also when run alone or on another worker than the test before.
    out = tmp_path / "report.json"
    deploy(setup, "mediahub", out, "restart")
    report_of(out)
    alloc = the_alloc_of(setup, "mediahub")
    url = setup.server.url

    def ask(node: str, token: str, alloc_id: str) -> requests.Response:
        return call(url, "POST", f"/api/v1/nodes/{node}/secrets", token=token, json={"Alloc": alloc_id})

    # Another node's agent token: refused, for this node and for its own (nothing of it is placed there).
    other = node_token(setup.server, "other")
    assert ask("edge", other, alloc["id"]).status_code == 403
    assert ask("other", other, alloc["id"]).status_code == 403
    # The edge agent's token: not for another node, not for an allocation not placed on its node.
    assert ask("srv", setup.agent_token, alloc["id"]).status_code == 403
    assert ask("edge", setup.agent_token, str(uuid.uuid4())).status_code == 403
    assert ask("edge", "", alloc["id"]).status_code == 403  # anonymous
    # Another instance's token is not taken to read values again.
    refresh = call(url, "POST", "/api/v1/nodes/edge/secrets", token=setup.agent_token,
                   json={"Alloc": alloc["id"], "Token": ROOT})
    assert refresh.status_code == 403, refresh.text
    # Its own: answered, never cached; the token minted here is bound to the node and allocation.
    answer = ask("edge", setup.agent_token, alloc["id"])
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert body["Env"] == {"DB_PASSWORD": PASSWORD} and body["Files"] == {"db.password": PASSWORD}
    assert setup.server.client(ROOT).auth.token.lookup_accessor(body["Accessor"])["data"]["meta"]["node"] == "edge"


def test_a_changed_secret_restarts_the_instance_with_the_new_value(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    deploy(setup, "mediahub", out, "restart")  # a new version (its OUT): a new instance, reporting here
    first = report_of(out)
    admin = setup.server.client(ROOT)
    admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": "rotated-on-edge"})
    second = report_of(out, until=lambda r: r["DB_PASSWORD"] == "rotated-on-edge")
    assert second["pid"] != first["pid"] and second["signals"] == 0
    assert second["secret_files"]["files"] == {"db.password": "rotated-on-edge"}
    assert second["token"] != first["token"]


def test_a_stopped_instance_loses_its_token_and_files(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    deploy(setup, "mediahub", out, "restart")
    report = report_of(out)
    admin = setup.server.client(ROOT)
    assert admin.auth.token.lookup_accessor(report["accessor"])["data"]["meta"]["node"] == "edge"
    stopped = call(setup.server.url, "POST", "/api/v1/jobs/mediahub/stop", json={})
    assert stopped.status_code == 200, stopped.text

    def revoked() -> bool:
        try:
            admin.auth.token.lookup_accessor(report["accessor"])
        except hvac_errors.InvalidRequest:
            return True
        return False

    wait_for("the stopped instance's token revoked", revoked, timeout=60)
    wait_for("its secret files removed", lambda: not Path(report["secret_files"]["dir"]).exists(), timeout=60)


def test_a_signal_job_on_an_agent_gets_its_files_rewritten_then_its_signal(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    admin = setup.server.client(ROOT)
    admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": PASSWORD})
    deploy(setup, "sighub", out, "signal")
    first = report_of(out)
    assert first["DB_PASSWORD"] == PASSWORD
    admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": "signalled-on-edge"})
    second = report_of(out, until=lambda r: r["signals"] >= 1)
    assert second["pid"] == first["pid"] and second["DB_PASSWORD"] == "signalled-on-edge"
    assert second["secret_files"]["files"] == {"db.password": "signalled-on-edge"}
    assert second["secret_files"]["dir"] == first["secret_files"]["dir"]
    assert call(setup.server.url, "DELETE", "/api/v1/jobs/sighub").status_code == 200


class LoneCluster:
    """A server without ACLs whose engine is initialised (not dev: it can be sealed), and an agent of node edge that
    can be stopped and started again on its data dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.server = VaultServer(base / "server", "--node", "srv")
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_port = free_port()
        self.root = ""
        self.keys: list[str] = []

    def start(self) -> None:
        self.server.start()
        self.root, self.keys = init_and_unseal(self.server)
        admin = self.server.client(self.root)
        admin.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": PASSWORD})
        admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
        self.start_agent()
        make_ineligible(self.server.url, "srv")

    def start_agent(self) -> None:
        with open(self.base / "agent.log", "ab") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", self.server.addr, "--node", "edge",
                 "--port", str(self.agent_port), "--dns-port", "0", "--http-port", "0",
                 "--data-dir", str(self.base / "agent"), "--drain-delay", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the agent live", lambda: any(m["Name"] == "edge" and m["Status"] == 1 for m in call(
            self.server.url, "GET", "/v1/agent/members", token="").json()), timeout=30)

    def stop_agent(self) -> None:
        assert self.agent is not None
        os.killpg(self.agent.pid, signal.SIGTERM)
        self.agent.wait(15)

    def deploy(self, out: Path) -> None:
        spec = {"name": "mediahub", "args": [sys.executable, str(APP)], "instances": 1, "stop_grace": "1s",
                "resources": {"cpu": 10, "memory": 128},
                "env": {"OUT": str(out), "OWN": "secret/data/mediahub/db", "OTHER": "secret/data/billing/db"},
                "secrets": {"DB_PASSWORD": "secret/data/mediahub/db#password"},
                "vault": {"policies": ["mediahub-db"], "files": {"db.password": "secret/data/mediahub/db#password"}}}
        assert call(self.server.url, "POST", "/api/v1/jobs", token="", json=spec).status_code in (200, 201)


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[LoneCluster]:
    cluster = LoneCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        stop_all(cluster.agent, cluster.server, tmp_path / "agent")


def test_without_acls_a_start_on_an_agent_waits_while_the_engine_is_sealed(lone: LoneCluster, tmp_path: Path,
                                                                           ) -> None:
    server = lone.server
    server.client(lone.root).sys.seal()
    out = tmp_path / "report.json"
    lone.deploy(out)

    def waiting() -> str:
        listed = call(server.url, "GET", "/api/v1/allocs?job=mediahub", token="").json()["allocations"]
        messages = [str((a.get("status") or {}).get("message", "")) for a in listed if a["node"] == "edge"]
        return next((m for m in messages if "sealed" in m), "")

    assert "sealed" in wait_for("the start waiting for an unseal", waiting, timeout=30)
    assert not out.exists()
    server.client().sys.submit_unseal_keys(lone.keys[:2])
    report = report_of(out)  # retried by the agent once a server answers unsealed
    assert report["DB_PASSWORD"] == PASSWORD and report["own"] == 200
    # Without ACLs the route still answers only for an allocation placed on the node asked for.
    [alloc] = [a for a in call(server.url, "GET", "/api/v1/allocs?job=mediahub", token="").json()["allocations"]
               if a["desired"] == "run"]
    for node, alloc_id in (("srv", alloc["id"]), ("edge", str(uuid.uuid4()))):
        refused = call(server.url, "POST", f"/api/v1/nodes/{node}/secrets", token="", json={"Alloc": alloc_id})
        assert refused.status_code == 403, refused.text


def test_crash_restarts_keep_the_token_and_an_adopted_instance_gets_a_new_one_at_its_next_start(
        lone: LoneCluster, tmp_path: Path) -> None:
    """A crash restart by the agent reuses what it holds; after an agent restart the instance runs on (adopted),
    and its next start fetches its secrets again under a new token; the old token is revoked (its allocation is
    still placed there, so only once it goes), and no value is ever in the agent's data dir."""
    out = tmp_path / "report.json"
    lone.deploy(out)
    first = report_of(out)
    os.kill(first["pid"], signal.SIGKILL)
    second = report_of(out, until=lambda r: r["pid"] != first["pid"])
    assert second["DB_PASSWORD"] == PASSWORD and second["token"] == first["token"]
    assert second["secret_files"]["files"] == {"db.password": PASSWORD}
    lone.stop_agent()
    lone.start_agent()  # the instance runs on under its shim; the new agent adopts it
    wait_for("the instance adopted", lambda: "adopted instance" in (tmp_path / "agent.log").read_text(), timeout=30)
    assert json.loads(out.read_text())["pid"] == second["pid"]
    os.kill(second["pid"], signal.SIGKILL)
    third = report_of(out, until=lambda r: r["pid"] != second["pid"])
    assert third["DB_PASSWORD"] == PASSWORD and third["own"] == 200 and third["token"] != second["token"]
    assert third["secret_files"]["files"] == {"db.password": PASSWORD}
    assert holding(tmp_path / "agent", [PASSWORD, first["token"], third["token"]]) == []
    assert call(lone.server.url, "POST", "/api/v1/jobs/mediahub/stop", token="", json={}).status_code == 200
    admin = lone.server.client(lone.root)

    def revoked(accessor: str) -> bool:
        try:
            admin.auth.token.lookup_accessor(accessor)
        except hvac_errors.InvalidRequest:
            return True
        return False

    wait_for("both tokens revoked", lambda: revoked(first["accessor"]) and revoked(third["accessor"]), timeout=60)


def test_over_https_the_agent_gets_the_secrets_and_its_instance_the_engines_ca(tmp_path: Path) -> None:
    """A cluster with TLS: the agent reaches the server over HTTPS only (--ca-file), and its instance is told the
    engine's https address and the CA to check it with (VAULT_CACERT)."""
    from tls_support import make_pki

    pki = make_pki(tmp_path / "pki")
    https_port = free_port()
    server = VaultServer(tmp_path / "server", "--node", "srv", "--vault-dev", "--vault-dev-root-token-id", ROOT,
                         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca",
                         str(pki.ca), "--https-port", str(https_port))
    agent: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        admin = hvac_client(server, pki.ca)
        admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": PASSWORD})
        admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
        with open(tmp_path / "agent.log", "ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", f"https://127.0.0.1:{https_port}",
                 "--ca-file", str(pki.ca), "--node", "edge", "--port", str(free_port()), "--dns-port", "0",
                 "--http-port", "0", "--data-dir", str(tmp_path / "agent"), "--drain-delay", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the agent's node", lambda: any(
            n["Node"] == "edge" for n in call(server.url, "GET", "/v1/catalog/nodes", token="").json()), timeout=30)
        make_ineligible(server.url, "srv")
        out = tmp_path / "report.json"
        spec = {"name": "mediahub", "args": [sys.executable, str(APP)], "instances": 1, "stop_grace": "1s",
                "resources": {"cpu": 10, "memory": 128},
                "env": {"OUT": str(out), "OWN": "secret/data/mediahub/db", "OTHER": "secret/data/billing/db"},
                "secrets": {"DB_PASSWORD": "secret/data/mediahub/db#password"},
                "vault": {"policies": ["mediahub-db"]}}
        assert call(server.url, "POST", "/api/v1/jobs", token="", json=spec).status_code in (200, 201)
        report = report_of(out)
        assert report["DB_PASSWORD"] == PASSWORD and (report["own"], report["other"]) == (200, 403), report
        assert report["vault_addr"] == f"https://127.0.0.1:{server.vault_port}"
        assert holding(tmp_path / "agent", [PASSWORD, report["token"]]) == []
    finally:
        stop_all(agent, server, tmp_path / "agent")


def hvac_client(server: VaultServer, ca: Path) -> Any:
    import hvac

    return hvac.Client(url=f"https://127.0.0.1:{server.vault_port}", token=ROOT, verify=str(ca))


def test_in_a_cluster_an_agent_passes_over_a_sealed_server_for_an_unsealed_one(tmp_path: Path) -> None:
    """Two servers on etcd share the engine, each unsealed on its own: the agent's first --server is sealed, so its
    instance's start is answered by the next one at once, rather than waiting for an unseal there."""
    need_peer("rabbitmq", rabbit_up(), "nothing listens on 127.0.0.1:5672 (rabbitmq-server -detached)")
    etcd = EtcdProcess(tmp_path / "etcd").start()
    store = f"etcd://127.0.0.1:{etcd.client_port}/agent-secrets"
    a, b = (VaultServer(tmp_path / name, "--store", store, "--bus", "amqp://guest:guest@127.0.0.1:5672/",
                        "--leader-ttl", "2", "--node", name) for name in ("a", "b"))
    agent: subprocess.Popen[bytes] | None = None
    try:
        a.start()
        b.start()
        init = a.client().sys.initialize(secret_shares=1, secret_threshold=1)
        a.client().sys.submit_unseal_keys(init["keys"])
        assert b.client().sys.is_sealed()
        admin = a.client(init["root_token"])
        admin.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        admin.secrets.kv.v2.create_or_update_secret("mediahub/db", secret={"password": PASSWORD})
        admin.sys.create_or_update_policy("mediahub-db", 'path "secret/data/mediahub/*" { capabilities = ["read"] }')
        with open(tmp_path / "agent.log", "ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", b.addr, "--server", a.addr,
                 "--node", "edge", "--port", str(free_port()), "--dns-port", "0", "--http-port", "0",
                 "--data-dir", str(tmp_path / "agent"), "--drain-delay", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the agent's node", lambda: any(
            n["Node"] == "edge" for n in call(a.url, "GET", "/v1/catalog/nodes", token="").json()), timeout=30)
        for name in ("a", "b"):
            make_ineligible(a.url, name)
        out = tmp_path / "report.json"
        spec = {"name": "mediahub", "args": [sys.executable, str(APP)], "instances": 1, "stop_grace": "1s",
                "resources": {"cpu": 10, "memory": 128},
                "env": {"OUT": str(out), "OWN": "secret/data/mediahub/db", "OTHER": "secret/data/billing/db"},
                "secrets": {"DB_PASSWORD": "secret/data/mediahub/db#password"}, "vault": {"policies": ["mediahub-db"]}}
        assert call(a.url, "POST", "/api/v1/jobs", token="", json=spec).status_code in (200, 201)
        report = report_of(out)
        assert report["DB_PASSWORD"] == PASSWORD and report["own"] == 200
        assert report["vault_addr"] == a.vault_url  # the engine of the server that answered
    finally:
        b.stop()
        stop_all(agent, a, tmp_path / "agent")
        etcd.stop()
