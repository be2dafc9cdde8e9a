"""Go clients see the same Consul API: every catalog, health and agent answer, decoded by a Go program.

tests/go/consul_decode.go is compiled at test time with Debian's `golang` (stdlib only, offline) and decodes the
server's answers as HashiCorp's Go client does: every duration through time.ParseDuration, which refuses "" (so a
service with an HTTP or TCP check was invisible to Prometheus's consul_sd_configs, issue 18).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shipyard.api.consul.common import go_duration
from support import ServerProcess, need_binary

GO_SOURCE = Path(__file__).parent / "go" / "consul_decode.go"
SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = need_binary("go")
    out = tmp_path_factory.mktemp("go") / "consul_decode"
    home = out.parent
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0", "GO111MODULE": "on",
           "GOCACHE": os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build"),
           "GOPATH": str(home / "gopath")}
    built = subprocess.run([go, "build", "-o", str(out), str(GO_SOURCE)], env=env, capture_output=True, text=True,
                           timeout=300, cwd=home)
    assert built.returncode == 0, built.stderr
    return out


@pytest.fixture(scope="module")
def registered(server: ServerProcess) -> Iterator[ServerProcess]:
    """Services with HTTP, TCP and TTL checks, with and without DeregisterCriticalServiceAfter, and one without."""
    url = server.url
    services = [
        {"Name": "go-http", "Port": 18080, "Check": {"HTTP": f"{url}/v1/status/leader", "Interval": "10s",
                                                     "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m30s"}},
        {"Name": "go-tcp", "Port": server.http_port, "Check": {"TCP": f"127.0.0.1:{server.http_port}",
                                                               "Interval": "2s"}},
        {"Name": "go-ttl", "Port": 18082, "Checks": [
            {"CheckID": "go-ttl-a", "TTL": "30s", "DeregisterCriticalServiceAfter": "1h"},
            {"CheckID": "go-ttl-b", "TTL": "500ms"},
        ]},
        {"Name": "go-plain", "Port": 18083},
    ]
    for service in services:
        r = requests.put(url + "/v1/agent/service/register", json=service, timeout=10)
        assert r.status_code == 200, r.text
    r = requests.put(url + "/v1/agent/check/register", json={"Name": "go-node-ttl", "TTL": "15s"}, timeout=10)
    assert r.status_code == 200, r.text
    r = requests.put(url + "/v1/session/create", json={"Name": "go-session", "TTL": "30s"}, timeout=10)
    assert r.status_code == 200, r.text
    yield server
    for service in services:
        requests.put(url + f"/v1/agent/service/deregister/{service['Name']}", timeout=10)
    requests.put(url + "/v1/agent/check/deregister/go-node-ttl", timeout=10)


def decode(decoder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(decoder), *args], capture_output=True, text=True, timeout=120)


def test_go_decodes_every_catalog_health_and_agent_answer(decoder: Path, registered: ServerProcess) -> None:
    run = decode(decoder, registered.url)
    assert run.returncode == 0, run.stderr  # was: decode /v1/health/service/go-http: time: invalid duration ""
    report = json.loads(run.stdout)
    fetched = set(report["fetched"])
    for path in ("/v1/health/service/go-http", "/v1/health/service/go-tcp", "/v1/health/service/go-ttl",
                 "/v1/health/checks/go-http", "/v1/health/state/any", "/v1/agent/checks", "/v1/agent/services",
                 "/v1/catalog/service/go-plain", "/v1/session/list"):
        assert path in fetched
    assert report["services"] >= 4

    durations = report["durations"]

    def seen(path: str, check: str, field: str) -> int:
        return durations[f"{path} check {check} {field}"]

    assert seen("/v1/agent/checks", "service:go-http", "Definition.Interval") == 10 * SECOND
    assert seen("/v1/agent/checks", "service:go-http", "Definition.Timeout") == 1 * SECOND
    assert seen("/v1/agent/checks", "service:go-http", "Definition.DeregisterCriticalServiceAfter") == 90 * SECOND
    assert seen("/v1/health/service/go-tcp", "service:go-tcp", "Definition.Interval") == 2 * SECOND
    assert seen("/v1/health/service/go-tcp", "service:go-tcp", "Definition.DeregisterCriticalServiceAfter") == 0
    assert seen("/v1/health/service/go-tcp", "service:go-tcp", "Timeout") == 0
    assert seen("/v1/health/checks/go-ttl", "go-ttl-a", "Definition.TTL") == 30 * SECOND
    assert seen("/v1/health/checks/go-ttl", "go-ttl-a", "Definition.DeregisterCriticalServiceAfter") == 3600 * SECOND
    assert seen("/v1/health/checks/go-ttl", "go-ttl-b", "Definition.TTL") == SECOND // 2
    assert seen("/v1/health/checks/go-ttl", "go-ttl-b", "Interval") == 0
    assert seen("/v1/health/state/any", "go-node-ttl", "Definition.TTL") == 15 * SECOND


def test_durations_are_rendered_as_go_renders_them(decoder: Path) -> None:
    values = [0, 1, 999, 1_000, 1_500, 1_000_000, 1_500_000, 999_999_999, SECOND, 3 * SECOND // 2, 60 * SECOND,
              90 * SECOND, 3600 * SECOND, 3723 * SECOND + SECOND // 2, 86400 * SECOND, 123_456_789_012]
    run = decode(decoder, "-format", *map(str, values))
    assert run.returncode == 0, run.stderr
    assert [go_duration(v) for v in values] == run.stdout.splitlines()


def test_no_duration_field_is_ever_empty(registered: ServerProcess) -> None:
    url = registered.url
    answers = [requests.get(url + path, timeout=10).json() for path in
               ("/v1/agent/checks", "/v1/health/state/any", "/v1/health/service/go-tcp", "/v1/health/checks/go-ttl")]
    checks = [*answers[0].values(), *answers[1], *answers[3]]
    checks += [c for entry in answers[2] for c in entry["Checks"]]
    fields = 0
    for check in checks:
        for where in (check, check.get("Definition") or {}):
            for key in ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"):
                if key in where:
                    fields += 1
                    assert where[key] != "", f"{check['CheckID']}: {key} is empty"
    assert fields > 20
