"""Attacks a web page can make a browser send to the control API, sent byte for byte over raw sockets.

Each must be refused before any handler runs (foreign Origin 403, rebound Host 421, simple-request body types 415),
while the real clients' requests (same origin, loopback names, --allowed-host, py-consul's untyped bodies) pass.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support import ServerProcess

EVIL = "http://evil.example"
JOB_YAML = b"services:\n  pwned:\n    cmd: touch /tmp/shipyard-pwned-by-csrf\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("guard") / "data", "--no-gateway",
                         "--allowed-host", "ctl.example", "--allowed-host", "shipyard.lan").start()
    yield proc
    proc.stop()


def raw(srv: ServerProcess, method: str, path: str, *, host: str | None = None, headers: dict[str, str] | None = None,
        body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request as an attacker's browser would put it on the wire; (status, headers, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or srv.addr}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), parsed, payload


def no_cors_post(srv: ServerProcess, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """What fetch(url, {method: "POST", mode: "no-cors", body: "..."}) from evil.example sends (no preflight)."""
    return raw(srv, "POST", path, body=body, headers={
        "Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "no-cors"})


def test_cross_site_job_deploy_is_refused_and_nothing_is_created(srv: ServerProcess) -> None:
    status, headers, body = no_cors_post(srv, "/api/v1/jobs", JOB_YAML)
    assert status == 403, body
    assert headers["content-type"].startswith("application/json")
    assert "Origin" in json.loads(body)["error"]
    assert requests.get(f"{srv.url}/api/v1/jobs/pwned", timeout=10).status_code == 404


def test_cross_site_marathon_app_is_refused(srv: ServerProcess) -> None:
    app = json.dumps({"id": "/pwned", "cmd": "touch /tmp/shipyard-pwned-by-csrf", "instances": 1}).encode()
    status, _, body = no_cors_post(srv, "/v2/apps", app)
    assert status == 403, body
    assert requests.get(f"{srv.url}/v2/apps/pwned", timeout=10).status_code == 404


@pytest.mark.parametrize("path", ["/v1/kv/secret", "/api/gateway/consumers", "/api/v1/bus/queues",
                                  "/api/v1/store/kv/jobs/", "/v2/apps", "/api/v1/jobs"])
def test_rebound_host_is_misdirected_on_every_api(srv: ServerProcess, path: str) -> None:
    status, _, body = raw(srv, "GET", path, host=f"attacker.example:{srv.http_port}")
    assert status == 421, body
    assert b"attacker.example" in body and b"--allowed-host" in body


@pytest.mark.parametrize("host", ["0.0.0.0", "evil.example@127.0.0.1", "127.0.0.1.nip.io", "localhost.evil.example"])
def test_hosts_that_only_look_local_are_misdirected(srv: ServerProcess, host: str) -> None:
    # 0.0.0.0 reaches localhost from browsers on Linux and macOS ("0.0.0.0 day"); the others are rebinding names.
    status, _, body = raw(srv, "GET", "/v1/kv/secret", host=f"{host}:{srv.http_port}")
    assert status == 421, body


def test_rebound_host_cannot_write_kv(srv: ServerProcess) -> None:
    status, _, _ = raw(srv, "PUT", "/v1/kv/rebound", host=f"attacker.example:{srv.http_port}", body=b"x")
    assert status == 421
    assert requests.get(f"{srv.url}/v1/kv/rebound", timeout=10).status_code == 404


@pytest.mark.parametrize("origin", [EVIL, "null", "http://localhost:1", "https://127.0.0.1"])
def test_foreign_origin_cannot_write_a_raw_kv_value(srv: ServerProcess, origin: str) -> None:
    status, _, _ = raw(srv, "PUT", "/v1/kv/csrf", headers={"Origin": origin}, body=b"x")
    assert status == 403
    assert requests.get(f"{srv.url}/v1/kv/csrf", timeout=10).status_code == 404


@pytest.mark.parametrize(("path", "ctype"), [
    ("/api/v1/jobs", "text/plain"),
    ("/v2/apps", "text/plain;charset=UTF-8"),
    ("/api/gateway/services", "application/x-www-form-urlencoded"),
    ("/api/v1/bus/publish", "multipart/form-data; boundary=x"),
    ("/api/v1/store/txn", "text/plain"),
])
def test_simple_request_body_types_get_415_even_without_origin(srv: ServerProcess, path: str, ctype: str) -> None:
    # An old browser or a plugin that sends no Origin still cannot pass a form or text body as JSON/YAML.
    status, _, body = raw(srv, "POST", path, headers={"Content-Type": ctype}, body=b"name=x&url=http://a")
    assert status == 415, body
    assert "application/json" in json.loads(body)["error"]


def test_consul_json_endpoint_refuses_text_plain_in_consul_style(srv: ServerProcess) -> None:
    status, headers, body = raw(srv, "PUT", "/v1/agent/service/register", headers={"Content-Type": "text/plain"},
                                body=b'{"Name": "pwned"}')
    assert status == 415 and headers["content-type"].startswith("text/plain"), body
    assert "pwned" not in requests.get(f"{srv.url}/v1/agent/services", timeout=10).json()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "ctl.example", "SHIPYARD.LAN", "app.localhost"])
def test_own_names_and_same_origin_are_served(srv: ServerProcess, host: str) -> None:
    authority = f"{host}:{srv.http_port}"
    status, _, body = raw(srv, "PUT", "/v1/kv/ok", host=authority, headers={"Origin": f"http://{authority}"},
                          body=b"v")
    assert (status, body) == (200, b"true")


def test_real_clients_bodies_still_pass(srv: ServerProcess, tmp_path: Path) -> None:
    # py-consul sends JSON with no Content-Type; Consul KV takes any bytes of any type; YAML deploys as YAML.
    assert requests.put(f"{srv.url}/v1/agent/service/register", data='{"Name": "web", "Port": 80}',
                        timeout=10).status_code == 200
    assert requests.put(f"{srv.url}/v1/kv/form", data={"a": "b"}, timeout=10).status_code == 200
    assert requests.get(f"{srv.url}/v1/kv/form?raw", timeout=10).content == b"a=b"
    spec = b"services:\n  fine:\n    cmd: sleep 60\n"
    r = requests.post(f"{srv.url}/api/v1/jobs", data=spec, headers={"Content-Type": "application/yaml"}, timeout=10)
    assert r.status_code == 201, r.text
    requests.delete(f"{srv.url}/api/v1/jobs/fine", timeout=10)
