"""An agent's gateway is a full entry point, as a server's: a real server with --acl (127.0.0.1) and a real
`shipyard agent --gateway --gateway-tls-port` on its own loopback address (127.0.0.2, as if on its own machine).

- HTTPS: a certificate added through the servers' gateway admin API after the agent started reaches the agent's
  gateway workers (they follow the store), which pick it by SNI; the client verifies it with the CA.
- Metrics: requests that went through the agent's gateway are counted on the agent's own
  /api/gateway/metrics (its --port, HTTPS with the agent's certificate), behind the servers' ACLs
  (`gateway = "read"`, a bearer token as Prometheus sends it), and a real Prometheus scrapes them over HTTPS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from shipyard.tls.authority import CertRequest, build_ca, build_cert
from support import ServerProcess, acl_token, free_port, need_binary, wait_for
from test_tls_gateway import _key_pem, _pem

MANAGEMENT = str(uuid.uuid4())
AGENT_RULES = 'store = "write"\nnode "edge-gw" { policy = "write" }'
ADDRESS = "127.0.0.2"
UPSTREAM = str(Path(__file__).with_name("gateway_upstream.py"))
SNI = "shop.agent.test"


@dataclass
class Setup:
    server: ServerProcess
    gateway: str  # the agent's plain HTTP gateway
    tls_port: int
    metrics: str  # the agent's metrics URL (https: the agent has a certificate)
    cluster_ca: Path  # the CA of the agent's own certificate
    agent_token: str
    ca_file: Path
    ca: tuple[Any, Any]
    base: Path


def call(base: str, method: str, path: str, token: str = MANAGEMENT, **kw: Any) -> requests.Response:
    return requests.request(method, base + path, headers={"X-Consul-Token": token} if token else {},
                            timeout=kw.pop("timeout", 10), **kw)


def make_token(server: ServerProcess, name: str, rules: str) -> str:
    return acl_token(server.url, MANAGEMENT, name, rules)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("agent-gw")
    server = ServerProcess(base / "server", "--acl", "--acl-initial-management", MANAGEMENT, "--no-gateway",
                           "--vault-port", "0", "--node", "srv")
    upstream_port, gateway_port, tls_port, logs_port = free_port(), free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, UPSTREAM, str(upstream_port), "agent-up"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent: subprocess.Popen[bytes] | None = None
    cluster_ca, agent_cert, agent_key = agent_pki(base)
    try:
        server.start()
        token = make_token(server, "edge-gw-agent", AGENT_RULES)
        admin = server.url + "/api/gateway"
        assert call(admin, "POST", "/services", json={"name": "shop", "url": f"http://127.0.0.1:{upstream_port}"}
                    ).status_code == 201
        assert call(admin, "POST", "/services/shop/routes", json={"name": "shop", "paths": ["/shop"]}
                    ).status_code == 201
        assert call(admin, "POST", "/plugins", json={"name": "prometheus"}).status_code == 201
        env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_ADDR")}
        env["SHIPYARD_HTTP_TOKEN"] = token
        with open(base / "agent.log", "ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", server.addr, "--node", "edge-gw",
                 "--advertise", ADDRESS, "--port", str(logs_port), "--dns-port", "0", "--http-port", "0",
                 "--gateway", "--gateway-port", str(gateway_port), "--gateway-tls-port", str(tls_port),
                 "--data-dir", str(base / "agent"), "--client-cert", str(agent_cert), "--client-key", str(agent_key)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        gateway = f"http://{ADDRESS}:{gateway_port}"
        wait_for("the route through the agent's gateway",
                 lambda: requests.get(gateway + "/shop/ping", timeout=5).status_code == 200, timeout=45)
        ca_cert, ca_key = build_ca()
        ca_file = base / "gateway-ca.pem"
        ca_file.write_text(_pem(ca_cert))
        yield Setup(server, gateway, tls_port, f"https://{ADDRESS}:{logs_port}/api/gateway/metrics", cluster_ca,
                    token, ca_file, (ca_cert, ca_key), base)
    finally:
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(20)
        server.stop()
        upstream.terminate()
        upstream.wait(10)


def agent_pki(base: Path) -> tuple[Path, Path, Path]:
    """The cluster's CA and the agent's certificate naming its address (`shipyard tls cert create --client --ip`)."""
    ca_cert, ca_key = build_ca()
    cert, key = build_cert(CertRequest(kind="client", ip_addresses=[ADDRESS]), ca_cert, ca_key)
    paths = base / "cluster-ca.pem", base / "agent.pem", base / "agent-key.pem"
    for path, text in zip(paths, (_pem(ca_cert), _pem(cert), _key_pem(key)), strict=True):
        path.write_text(text)
    return paths


def scrape(setup: Setup, token: str = "", path: str = "") -> requests.Response:
    """GET on the agent's HTTPS port as Prometheus does: its certificate checked against the cluster's CA."""
    url = setup.metrics.replace("/api/gateway/metrics", path) if path else setup.metrics
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url, headers=headers, timeout=10, verify=str(setup.cluster_ca))


def https_get(setup: Setup, path: str) -> tuple[int, dict[str, Any]]:
    """GET over TLS to the agent's gateway with SNI, the certificate verified against the CA (and the name)."""
    context = ssl.create_default_context(cafile=str(setup.ca_file))
    with socket.create_connection((ADDRESS, setup.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SNI) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_https_through_the_agent_with_a_certificate_added_after_it_started(setup: Setup) -> None:
    # Before: the agent's TLS port serves its default (self-signed) certificate, which the CA does not vouch for.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(setup, "/shop/before")
    cert, key = build_cert(CertRequest(kind="server", dns_names=[SNI]), *setup.ca)
    added = call(setup.server.url, "POST", "/api/gateway/certificates",
                 json={"cert": _pem(cert), "key": _key_pem(key), "snis": [SNI]})
    assert added.status_code == 201, added.text

    def verified() -> tuple[int, dict[str, Any]] | None:
        try:
            return https_get(setup, "/shop/secure")
        except ssl.SSLCertVerificationError:
            return None

    status, seen = wait_for("the agent's gateway to serve the new certificate", verified, timeout=30)
    assert status == 200 and seen["name"] == "agent-up" and seen["path"] == "/secure", seen  # strip_path
    assert seen["headers"].get("X-Forwarded-Proto") == "https", seen["headers"]


def shop_requests(text: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "shipyard_gateway_requests_total" and sample.labels.get("service") == "shop")


def test_the_agents_gateway_metrics_on_the_agent_behind_acls(setup: Setup) -> None:
    # Without a token, or with the agent's own (no gateway rule): refused, as at a server's /api/gateway/metrics.
    assert scrape(setup).status_code == 403
    assert scrape(setup, setup.agent_token).status_code == 403
    reader = make_token(setup.server, "gateway-metrics", 'gateway = "read"')

    def text() -> str:
        answer = scrape(setup, reader)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.text

    # Until the worker has the plugin, requests go uncounted: wait for a count that follows a request.
    wait_for("the prometheus plugin at the agent's gateway", lambda: (
        requests.get(setup.gateway + "/shop/warm", timeout=5).status_code == 200 and shop_requests(text()) > 0))
    before = shop_requests(text())
    for i in range(20):
        assert requests.get(f"{setup.gateway}/shop/{i}", timeout=10).status_code == 200
    assert shop_requests(text()) - before == 20
    assert "shipyard_gateway_workers 1" in text()
    # The listener's other routes still need the servers' secret; plain HTTP gets no answer at all.
    assert scrape(setup, reader, "/api/v1/node-usage").status_code == 403
    with pytest.raises(requests.ConnectionError):
        requests.get(setup.metrics.replace("https://", "http://"), timeout=10)


def test_a_real_prometheus_scrapes_the_agents_gateway(setup: Setup) -> None:
    binary = need_binary("prometheus")
    reader = make_token(setup.server, "prometheus-scraper", 'gateway = "read"')
    port = free_port()
    folder = setup.base / "prometheus"
    folder.mkdir()
    target = setup.metrics.removeprefix("https://").split("/", 1)[0]
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: shipyard-gateways\n"
        "    metrics_path: /api/gateway/metrics\n"
        "    scheme: https\n"
        f"    tls_config: {{ca_file: {setup.cluster_ca}}}\n"
        f"    authorization: {{credentials: {reader}}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    for i in range(7):
        assert requests.get(f"{setup.gateway}/shop/prom-{i}", timeout=10).status_code == 200
    expected = shop_requests(scrape(setup, reader).text)
    with open(folder / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def queried(query: str) -> float | None:
            answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            result = answer.json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_for("Prometheus to scrape the agent", lambda: queried('up{job="shipyard-gateways"}') == 1,
                        timeout=60)
        total = 'sum(shipyard_gateway_requests_total{job="shipyard-gateways",service="shop"})'
        assert wait_for("the agent's counts in Prometheus", lambda: (queried(total) or 0) >= expected, timeout=30)
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(10)


def gateway_worker_tokens(setup: Setup) -> set[str]:
    """The SHIPYARD_HTTP_TOKEN of this agent's gateway workers (bound on its address and gateway port: another
    test's agent may run workers on the same address)."""
    port = setup.gateway.rsplit(":", 1)[1].encode()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"shipyard.gateway.worker" in cmdline and ADDRESS.encode() in cmdline \
                and cmdline[cmdline.index(b"--port") + 1:][:1] == [port]:
            found |= {v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"SHIPYARD_HTTP_TOKEN=")}
    return found


def test_the_agents_gateway_workers_hold_a_read_only_token_of_their_own(setup: Setup) -> None:
    # The processes facing the network do not hold the agent's token (which writes the store), but a token with a
    # server's workers' rules, made for this node.
    [token] = gateway_worker_tokens(setup)
    assert token != setup.agent_token
    me = call(setup.server.url, "GET", "/v1/acl/token/self", token=token)
    assert me.status_code == 200 and me.json()["Description"] == "Shipyard's own gateway@edge-gw", me.text
    assert call(setup.server.url, "GET", "/api/v1/store/kv/jobs/?prefix=1", token=token).status_code == 200
    assert call(setup.server.url, "PUT", "/api/v1/store/kv/jobs/evil", token=token, data=b"x").status_code == 403
    assert call(setup.server.url, "PUT", "/v1/kv/evil", token=token, data=b"x").status_code == 403
    # Making it needs the node's write: another node's agent cannot make (or take over) edge-gw's.
    other = make_token(setup.server, "other-agent", 'store = "write"\nnode "other" { policy = "write" }')
    taken = call(setup.server.url, "PUT", "/api/v1/nodes/edge-gw/gateway-token", token=other,
                 json={"SecretID": str(uuid.uuid4())})
    assert taken.status_code == 403, taken.text
