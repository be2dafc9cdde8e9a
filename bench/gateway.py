"""Benchmark of the API gateway against nginx, in one invocation, in front of the same fast upstream, driven by wrk.

The upstream is nginx answering a small static response (never the bottleneck). The reference is nginx (Debian)
as a reverse proxy with a keep-alive upstream pool and the same number of workers as the gateway; the gateway runs
as `shipyard server` would run it, routing by a urlprefix- tag of the upstream registered through the Consul API.
A second gateway route (/keyed, to the same upstream) has key-auth + rate-limiting (a limit high enough never to
refuse). Phases: nginx, gateway without plugins, gateway with the two plugins, repeated --rounds times in turn, so
that a machine whose load drifts (other jobs) weighs on all three alike; figures are medians over the rounds and
each ratio is the median of the ratios of one round. It never reaches inside the server.
A TLS phase pair follows in each round: nginx terminating TLS (ssl on its listener) and the gateway terminating TLS
(--gateway-tls-port), with the same self-signed certificate (ECDSA P-256), keep-alive, both TLS 1.2+ (wrk, OpenSSL);
--no-tls skips it, --tls-only runs only it.

Usage: python bench/gateway.py [--quick] [--duration S] [--rounds N] [--connections C] [--workers N]
(progress on stderr, one JSON line with all figures on stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
THROUGHPUT_TARGET = 0.6
PLUGINS_TARGET = 0.5
P99_TARGET = 2.0
API_KEY = "bench-key-0123456789"


def progress(message: str) -> None:
    print(f"[bench/gateway] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench/gateway: timed out waiting for {what}")


def start_nginx(prefix: Path, body: str) -> subprocess.Popen[bytes]:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process on;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n"
        f"worker_rlimit_nofile 65536;\n{body}"
    )
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc


def upstream_conf(port: int) -> str:
    return f"""worker_processes 1;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
  }}
}}
"""


def tls_server_conf(port: int, cert: Path, key: Path) -> str:
    """nginx terminating TLS with the certificate the gateway gets, in front of the same upstream pool."""
    return f"""
  server {{
    listen 127.0.0.1:{port} ssl reuseport backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      add_header Via "1.1 nginx";
    }}
  }}"""


def proxy_conf(port: int, upstream: int, workers: int, tls: str = "") -> str:
    return f"""worker_processes {workers};
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      add_header Via "1.1 nginx";
    }}
  }}{tls}
}}
"""


def write_certificate(folder: Path) -> tuple[Path, Path]:
    from shipyard.tls import self_signed

    cert_pem, key_pem = self_signed("localhost", ["localhost"])
    cert, key = folder / "bench-cert.pem", folder / "bench-key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return cert, key


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(url: str, duration: int, connections: int, threads: int, headers: list[str] = ()) -> dict[str, Any]:
    cmd = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency", "--timeout", "5s"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "rps": round(float(rps.group(1)), 1) if rps else 0.0,
        "p50_ms": round(_ms(p50.group(1)), 3) if p50 else None,
        "p99_ms": round(_ms(p99.group(1)), 3) if p99 else None,
        "requests": int(total.group(1)) if total else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def plugins_available() -> bool:
    try:
        import shipyard.gateway.plugins as plugins
    except ImportError:
        return False
    return {"key-auth", "rate-limiting"} <= set(plugins.PLUGINS)


def enable_plugins(control: str, gateway: str) -> None:
    """Route /keyed to the upstream with key-auth and rate-limiting; the urlprefix-/ route stays plugin-free."""
    api = control + "/api/gateway"
    steps = [
        ("PUT", "/services/keyed", {"host": "bench-upstream"}),
        ("PUT", "/routes/keyed", {"service": "keyed", "paths": ["/keyed"]}),
        ("PUT", "/consumers/bench", {"username": "bench"}),
        ("POST", "/consumers/bench/key-auth", {"key": API_KEY}),
        ("POST", "/routes/keyed/plugins", {"name": "key-auth", "config": {}}),
        ("POST", "/routes/keyed/plugins", {"name": "rate-limiting",
                                           "config": {"second": 100_000_000, "limit_by": "consumer"}}),
    ]
    for method, path, body in steps:
        status, text = http(method, api + path, body)
        if status >= 300 and status != 409:
            raise SystemExit(f"bench/gateway: {method} {path}: {status} {text[:200]!r}")
    wait_for(lambda: http("GET", gateway + "/keyed")[0] == 401, "key-auth to be enforced")
    wait_for(lambda: http("GET", gateway + "/keyed", headers={"apikey": API_KEY})[0] == 200, "the key to be accepted")
    wait_for(lambda: http("GET", gateway + "/")[0] == 200, "the plugin-free route")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of rps and latencies over rounds; requests and errors summed."""
    out: dict[str, Any] = {
        "rps": round(statistics.median(r["rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] or 0.0 for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] or 0.0 for r in runs), 3),
    }
    for name in ("requests", "socket_errors", "non_2xx"):
        out[name] = sum(r[name] for r in runs)
    out["rounds_rps"] = [r["rps"] for r in runs]
    return out


def median_ratio(top: list[float | None], bottom: list[float | None]) -> float | None:
    ratios = [t / b for t, b in zip(top, bottom, strict=True) if t and b]
    return round(statistics.median(ratios), 3) if ratios else None


def tls_summary(phases: dict[str, list[dict[str, Any]]], args: argparse.Namespace, duration: int) -> dict[str, Any]:
    """The TLS phase pair: nginx terminating TLS vs the gateway terminating TLS (same certificate, keep-alive)."""
    nginx, gateway = summary(phases["nginx_tls"]), summary(phases["gateway_tls"])
    ratio = median_ratio([r["rps"] for r in phases["gateway_tls"]], [r["rps"] for r in phases["nginx_tls"]])
    errors = sum(r["socket_errors"] + r["non_2xx"] for r in (nginx, gateway))
    return {
        "bench": "gateway-tls", "workers": args.workers, "connections": args.connections, "duration_s": duration,
        "rounds": args.rounds, "nginx_tls": nginx, "gateway_tls": gateway, "tls_ratio": ratio,
        "tls_p99_ratio": median_ratio([r["p99_ms"] for r in phases["gateway_tls"]],
                                      [r["p99_ms"] for r in phases["nginx_tls"]]),
        "errors": errors,
        "targets": {"tls_ratio>=0.6": bool(ratio and ratio >= THROUGHPUT_TARGET), "zero_errors": errors == 0},
    }


def full_summary(phases: dict[str, list[dict[str, Any]]], args: argparse.Namespace, duration: int,
                 with_plugins: bool, tls_phases: bool) -> dict[str, Any]:
    """The JSON line: every phase's medians, the ratios against nginx, and the targets met."""
    nginx, plain = summary(phases["nginx"]), summary(phases["gateway"])
    out: dict[str, Any] = {
        "bench": "gateway", "workers": args.workers, "connections": args.connections, "threads": args.threads,
        "duration_s": duration, "rounds": args.rounds, "nginx": nginx, "gateway": plain,
        "ratio": median_ratio([r["rps"] for r in phases["gateway"]], [r["rps"] for r in phases["nginx"]]),
        "p99_ratio": median_ratio([r["p99_ms"] for r in phases["gateway"]], [r["p99_ms"] for r in phases["nginx"]]),
    }
    if with_plugins:
        out["gateway_key_auth_rate_limiting"] = summary(phases["plugins"])
        out["plugins_ratio"] = median_ratio([r["rps"] for r in phases["plugins"]],
                                            [r["rps"] for r in phases["nginx"]])
        out["plugins_p99_ratio"] = median_ratio([r["p99_ms"] for r in phases["plugins"]],
                                                [r["p99_ms"] for r in phases["nginx"]])
    else:
        out["gateway_key_auth_rate_limiting"] = None
        out["note"] = "key-auth/rate-limiting plugins not available: plugin phase skipped"
    if tls_phases:
        out["tls"] = tls_summary(phases, args, duration)
    errors = sum(r["socket_errors"] + r["non_2xx"] for r in (nginx, plain, out.get(
        "gateway_key_auth_rate_limiting") or {"socket_errors": 0, "non_2xx": 0}))
    errors += out["tls"]["errors"] if tls_phases else 0
    out["targets"] = {
        "ratio>=0.6": bool(out["ratio"] and out["ratio"] >= THROUGHPUT_TARGET),
        "plugins_ratio>=0.5": bool(out.get("plugins_ratio") and out["plugins_ratio"] >= PLUGINS_TARGET),
        "p99<=2x": bool(out["p99_ratio"] and out["p99_ratio"] <= P99_TARGET),
        "zero_errors": errors == 0,
    }
    if tls_phases:
        out["targets"]["tls_ratio>=0.6"] = out["tls"]["targets"]["tls_ratio>=0.6"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (for a smoke test)")
    parser.add_argument("--duration", type=int, default=0, help="seconds per phase (default 10, --quick 3)")
    parser.add_argument("--rounds", type=int, default=0, help="nginx/gateway/plugins rounds (default 3, --quick 1)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS phases")
    parser.add_argument("--tls-only", action="store_true", help="only the TLS phases (nginx TLS vs gateway TLS)")
    args = parser.parse_args()
    duration = args.duration or (3 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 3)
    for binary in (NGINX, WRK):
        if not os.path.exists(binary):
            raise SystemExit(f"bench/gateway: {binary} is missing (apt-get install nginx-light wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-gateway-"))
    up_port, nginx_port, http_port, gw_port = free_port(), free_port(), free_port(), free_port()
    nginx_tls_port, gw_tls_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cert, key = write_certificate(tmp)
        tls_args = ["--gateway-tls-port", str(gw_tls_port), "--gateway-tls-cert", str(cert),
                    "--gateway-tls-key", str(key)]
        procs.append(start_nginx(tmp / "upstream", upstream_conf(up_port)))
        procs.append(start_nginx(tmp / "proxy", proxy_conf(nginx_port, up_port, args.workers,
                                                           tls_server_conf(nginx_tls_port, cert, key))))
        server_log = open(tmp / "server.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--http-port", str(http_port),
             "--dns-port", "0", "--gateway-port", str(gw_port), "--gateway-workers", str(args.workers),
             "--log-level", "warning", *tls_args],
            stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        control, gateway, reference = (f"http://127.0.0.1:{p}" for p in (http_port, gw_port, nginx_port))
        wait_for(lambda: http("GET", f"http://127.0.0.1:{up_port}/")[0] == 200, "the upstream nginx")
        wait_for(lambda: http("GET", reference + "/")[0] == 200, "the reference nginx")
        wait_for(lambda: http("GET", control + "/v1/status/leader")[0] == 200, "shipyard server")
        status, _ = http("PUT", control + "/v1/agent/service/register", {
            "Name": "bench-upstream", "ID": "bench-upstream-1", "Address": "127.0.0.1", "Port": up_port,
            "Tags": ["urlprefix-/"],
        })
        assert status == 200, status
        wait_for(lambda: http("GET", gateway + "/")[0] == 200, "the gateway to route to the upstream")
        progress(f"upstream :{up_port}, nginx :{nginx_port}, gateway :{gw_port}, {args.workers} workers each")

        def measure(url: str, name: str, headers: list[str] = ()) -> dict[str, Any]:
            run_wrk(url, 1, args.connections, args.threads, headers)  # warm up: connections, pools, caches
            result = run_wrk(url, duration, args.connections, args.threads, headers)
            progress(f"{name}: {result}")
            return result

        with_plugins = plugins_available()
        if with_plugins:
            enable_plugins(control, gateway)
        phases: dict[str, list[dict[str, Any]]] = {"nginx": [], "gateway": [], "plugins": [], "nginx_tls": [],
                                                   "gateway_tls": []}
        tls_phases = not args.no_tls
        if tls_phases:
            wait_for(lambda: run_wrk(f"https://localhost:{gw_tls_port}/", 1, 1, 1)["requests"] > 0,
                     "the gateway's TLS port")
        for round_no in range(1, args.rounds + 1):
            progress(f"round {round_no}/{args.rounds}")
            if tls_phases:
                phases["nginx_tls"].append(measure(f"https://localhost:{nginx_tls_port}/", "nginx, TLS"))
                phases["gateway_tls"].append(measure(f"https://localhost:{gw_tls_port}/", "gateway, TLS"))
            if args.tls_only:
                continue
            phases["nginx"].append(measure(reference + "/", "nginx"))
            phases["gateway"].append(measure(gateway + "/", "gateway, no plugins"))
            if with_plugins:
                phases["plugins"].append(measure(gateway + "/keyed", "gateway, key-auth + rate-limiting",
                                                 [f"apikey: {API_KEY}"]))
        if args.tls_only:
            print(json.dumps(tls_summary(phases, args, duration)), flush=True)
            return
        out = full_summary(phases, args, duration, with_plugins, tls_phases)
        print(json.dumps(out), flush=True)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
