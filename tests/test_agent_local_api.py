"""`shipyard agent` on this machine's loopback (no namespaces) against a real server with --acl: its local HTTP API
(127.0.0.1:--http-port) forwards everything to a live server (the first --server it is given is dead), tokens and
blocking queries and streams included; and its instances get their service's own token, made through the guarded
PUT /api/v1/nodes/<node>/service-tokens/<service>, that lets them read the catalog through the agent and nothing
beyond their service's rules.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from support import ServerProcess, acl_token, free_port, wait_for

MANAGEMENT = str(uuid.uuid4())
AGENT_RULES = 'store = "write"\nnode "edge" { policy = "write" }'
APP = """\
import http.server, json, os, urllib.error, urllib.request
def call(path):
    request = urllib.request.Request("http://" + os.environ["SHIPYARD_HTTP_ADDR"] + path,
                                     headers={"X-Consul-Token": os.environ.get("CONSUL_HTTP_TOKEN", "")})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        nodes = call("/v1/catalog/nodes")
        seen = {"addr": os.environ["SHIPYARD_HTTP_ADDR"], "consul_addr": os.environ["CONSUL_HTTP_ADDR"],
                "same_token": os.environ.get("SHIPYARD_HTTP_TOKEN") == os.environ.get("CONSUL_HTTP_TOKEN"),
                "nodes": [nodes[0], sorted(n["Node"] for n in nodes[1] or [])],
                "own_kv": call("/v1/kv/tokapp/config")[0], "other_kv": call("/v1/kv/secret/x")[0]}
        body = json.dumps(seen).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
http.server.HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""


class DroppingServer:
    """A server that dies with each request: it reads the request's head, notes its first line, and closes the
    connection unanswered (as a server killed once it received a request)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                self.seen.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Setup:
    server: ServerProcess
    local: str  # the agent's local API
    agent_token: str
    agent_log: Path
    data_dir: Path
    dropping: tuple[DroppingServer, DroppingServer]


def call(base: str, method: str, path: str, token: str = MANAGEMENT, **kw: Any) -> requests.Response:
    headers = {**({"X-Consul-Token": token} if token else {}), **kw.pop("headers", {})}
    return requests.request(method, base + path, headers=headers, timeout=kw.pop("timeout", 10), **kw)


def agent_token(server: ServerProcess) -> str:
    return acl_token(server.url, MANAGEMENT, "edge-agent", AGENT_RULES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("local-api")
    server = ServerProcess(base / "server", "--acl", "--acl-initial-management", MANAGEMENT, "--no-gateway",
                           "--vault-port", "0", "--node", "srv", dev=True)
    agent: subprocess.Popen[bytes] | None = None
    http_port = free_port()
    log_path = base / "agent.log"
    dropping = (DroppingServer(), DroppingServer())
    try:
        server.start()
        token = agent_token(server)
        env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_ADDR")}
        env["SHIPYARD_HTTP_TOKEN"] = token
        with open(log_path, "ab") as log:
            # Two servers that drop every request, then a dead one, then the real one: the local API and the
            # agent move on to the next.
            agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", f"127.0.0.1:{dropping[0].port}",
                 "--server", f"127.0.0.1:{dropping[1].port}", "--server", f"127.0.0.1:{free_port()}",
                 "--server", server.addr, "--node", "edge", "--port", str(free_port()), "--dns-port", "0",
                 "--http-port", str(http_port), "--data-dir", str(base / "agent"), "--drain-delay", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_for("the agent's node", lambda: any(
            n["Node"] == "edge" for n in call(server.url, "GET", "/v1/catalog/nodes").json()), timeout=30)
        yield Setup(server, f"http://127.0.0.1:{http_port}", token, log_path, base / "agent", dropping)
    finally:
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(15)
        server.stop()
        for each in dropping:
            each.close()
        for state in (base / "agent" / "agent" / "instances").glob("*/state.json"):
            pid = int(json.loads(state.read_text())["shim_pid"])  # instances outlive their agent by design
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_the_local_api_forwards_tokens_blocking_queries_writes_and_streams(setup: Setup) -> None:
    local, server = setup.local, setup.server.url
    # The local API starts at the first --server, which takes the request and dies: a write is not sent again...
    lost = call(local, "PUT", "/v1/kv/app/z", data=b"once")
    assert lost.status_code == 502 and "not sent again" in lost.text, lost.text
    assert setup.dropping[0].seen.count("PUT /v1/kv/app/z HTTP/1.1") == 1
    # ... and the next request goes to the next server; a read that server drops is tried on the next (dead: not
    # connected to) and the next: the real server answers (the write above never reached it).
    assert call(local, "GET", "/v1/kv/app/z").status_code == 404
    assert setup.dropping[1].seen.count("GET /v1/kv/app/z HTTP/1.1") == 1
    assert "PUT /v1/kv/app/z HTTP/1.1" not in setup.dropping[1].seen
    # A write through the agent is the server's.
    put = call(local, "PUT", "/v1/kv/app/x", data=b"one")
    assert put.status_code == 200 and put.json() is True, put.text
    first = call(server, "GET", "/v1/kv/app/x?raw")
    assert first.content == b"one"
    # A blocking query through the agent is held until a write made at the server wakes it.
    index = int(first.headers["X-Consul-Index"])
    woke: dict[str, Any] = {}

    def block() -> None:
        answer = call(local, "GET", f"/v1/kv/app/x?index={index}&wait=30s", timeout=40)
        woke.update(status=answer.status_code, index=int(answer.headers["X-Consul-Index"]),
                    value=answer.json()[0]["Value"])

    waiter = threading.Thread(target=block)
    waiter.start()
    # Meanwhile: the caller's token goes through as it came (header or bearer); without one the server answers
    # as anonymous.
    nodes = call(local, "GET", "/v1/catalog/nodes")
    assert nodes.status_code == 200 and {"srv", "edge"} <= {n["Node"] for n in nodes.json()}, nodes.text
    bearer = requests.get(local + "/v1/catalog/nodes", headers={"Authorization": f"Bearer {MANAGEMENT}"}, timeout=10)
    assert {n["Node"] for n in bearer.json()} == {n["Node"] for n in nodes.json()}
    assert call(local, "GET", "/v1/kv/app/x", token="").status_code == 403
    assert not woke, woke  # still held: nothing was written
    assert call(server, "PUT", "/v1/kv/app/x", data=b"two").status_code == 200
    waiter.join(40)
    assert woke["status"] == 200 and woke["index"] > index and woke["value"] == "dHdv", woke  # base64 of "two"
    # A stream (the store's NDJSON watch) comes through line by line, as the server sends it.
    with requests.get(local + "/api/v1/store/watch/kv/app/?prefix=1", headers={"X-Consul-Token": MANAGEMENT},
                      stream=True, timeout=30) as stream:
        assert stream.status_code == 200, stream.text
        lines = stream.iter_lines()
        next(lines)  # the opening line
        assert call(server, "PUT", "/v1/kv/app/y", data=b"three").status_code == 200
        event = next(line for line in lines if line.strip())
        assert b"app/y" in event, event
    # The server never sees the caller's Host, so the local API checks it, and Origin, as a server does: a page
    # whose name was rebound to 127.0.0.1, or another site's page, gets nothing; the page of this origin may write.
    port = local.rsplit(":", 1)[1]
    rebound = call(local, "GET", "/v1/kv/app/x", headers={"Host": f"evil.example:{port}"})
    foreign = call(local, "PUT", "/v1/kv/app/page", data=b"p", headers={"Origin": "http://evil.example"})
    assert rebound.status_code == 421 and foreign.status_code == 403, (rebound.text, foreign.text)
    own = call(local, "PUT", "/v1/kv/app/page", data=b"p", headers={"Origin": local})
    assert own.status_code == 200, own.text
    # A body beyond the bound is refused before anything is sent on.
    big = call(local, "PUT", "/v1/kv/app/big", data=b"x" * (33 << 20))
    assert big.status_code == 413, big.text
    assert call(server, "GET", "/v1/kv/app/big").status_code == 404
    # "This agent"'s services and checks are the agent's own, as with a Consul client agent: a service registered
    # at the local API is on the agent's node, its TTL check passed there, and the rules are the server's (no
    # token: refused, failing closed).
    definition = {"Name": "sdkapp", "ID": "sdkapp-1", "Port": 9999, "Check": {"TTL": "30s", "CheckID": "sdk-ttl"}}
    assert call(local, "PUT", "/v1/agent/service/register", token="", json=definition).status_code == 403
    assert call(local, "PUT", "/v1/agent/service/register", json=definition).status_code == 200
    assert [e["Node"] for e in call(server, "GET", "/v1/catalog/service/sdkapp").json()] == ["edge"]
    assert "sdkapp-1" in call(local, "GET", "/v1/agent/services").json()
    assert "sdkapp-1" not in call(server, "GET", "/v1/agent/services").json()
    assert call(local, "PUT", "/v1/agent/check/pass/sdk-ttl?note=fine").status_code == 200
    checks = {c["CheckID"]: c for c in call(server, "GET", "/v1/health/node/edge").json()}
    assert checks["sdk-ttl"]["Status"] == "passing" and checks["sdk-ttl"]["Output"] == "fine", checks
    assert call(local, "PUT", "/v1/agent/service/deregister/sdkapp-1").status_code == 200
    assert call(server, "GET", "/v1/catalog/service/sdkapp").json() == []
    # Setting an agent token there would set a server's: refused.
    assert call(local, "PUT", "/v1/agent/token/default", json={"Token": "x"}).status_code == 400
    # Nothing secret in the agent's log; it says where it forwards.
    logged = setup.agent_log.read_text()
    assert MANAGEMENT not in logged and setup.agent_token not in logged
    assert "local API on http://127.0.0.1" in logged, logged[-2000:]


def test_instances_on_an_agent_get_their_services_token_through_the_guarded_route(setup: Setup, tmp_path: Path,
                                                                                  ) -> None:
    server = setup.server.url
    assert call(server, "POST", "/api/v1/nodes/srv/eligibility", json={"eligible": False}).status_code == 200
    assert call(server, "PUT", "/v1/kv/tokapp/config", data=b"cfg").status_code == 200
    app = tmp_path / "app.py"
    app.write_text(APP)
    spec = {"name": "tokapp", "args": [sys.executable, str(app)], "instances": 1, "ports": {"http": {}},
            "resources": {"cpu": 10, "memory": 32}, "stop_grace": "2s"}
    deployed = call(server, "POST", "/api/v1/jobs", json=spec)
    assert deployed.status_code in (200, 201), deployed.text

    def instance() -> str:
        entries = call(server, "GET", "/v1/catalog/service/tokapp").json()
        return f"http://{entries[0]['ServiceAddress']}:{entries[0]['ServicePort']}/" if entries else ""

    url = wait_for("the instance registered", instance, timeout=45)
    seen = wait_for("the instance answering", lambda: requests.get(url, timeout=15).json(), timeout=30)
    local_addr = setup.local.removeprefix("http://")
    assert seen["addr"] == local_addr and seen["consul_addr"] == local_addr, seen
    # Its token (both variables) reads the catalog through the agent, its own KV prefix, and nothing else.
    assert seen["same_token"] and seen["nodes"] == [200, ["edge", "srv"]], seen
    assert seen["own_kv"] == 200 and seen["other_kv"] == 403, seen

    # The route is guarded: the agent's token makes tokens only for services placed on its own node, only for
    # its node, and never takes a SecretID another token holds.
    def mint(node: str, service: str, secret: str) -> requests.Response:
        return call(server, "PUT", f"/api/v1/nodes/{node}/service-tokens/{service}", token=setup.agent_token,
                    json={"SecretID": secret})

    assert mint("edge", "other", str(uuid.uuid4())).status_code == 403
    assert mint("srv", "tokapp", str(uuid.uuid4())).status_code == 403
    assert mint("edge", "tokapp", MANAGEMENT).status_code == 409
    assert mint("edge", "tokapp", "not-a-uuid").status_code == 400
    assert call(server, "GET", "/v1/acl/token/self").status_code == 200  # the management token still works
    # The secret travelled in memory only: nowhere in the agent's data dir or log.
    tokens = call(server, "GET", "/v1/acl/tokens").json()
    mine = [t for t in tokens if t.get("ServiceIdentities") == [{"ServiceName": "tokapp"}]]
    assert len(mine) == 1, tokens
    secret = call(server, "GET", f"/v1/acl/token/{mine[0]['AccessorID']}").json()["SecretID"]
    assert secret not in setup.agent_log.read_text()
    for path in setup.data_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # The job gone from the node, the agent deletes its token there.
    assert call(server, "DELETE", "/api/v1/jobs/tokapp").status_code == 200
    wait_for("the instance's token deleted", lambda: not any(t.get("ServiceIdentities") == [{"ServiceName": "tokapp"}]
                                                             for t in call(server, "GET", "/v1/acl/tokens").json()),
             timeout=30)
    assert call(server, "GET", "/v1/acl/token/self", token=secret).status_code == 403
    # Leave through the local API: the agent leaves (members: 3), not the server.
    assert call(setup.local, "PUT", "/v1/agent/leave").status_code == 200
    wait_for("the agent listed as left", lambda: {m["Name"]: m["Status"] for m in call(
        server, "GET", "/v1/agent/members").json()}.get("edge") == 3, timeout=20)
    assert call(server, "GET", "/v1/status/leader").status_code == 200
