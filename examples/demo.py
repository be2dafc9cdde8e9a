"""`make demo`: starts `shipyard server` with a sample service registered, and says what to try.

Runs in the foreground until Ctrl-C, then stops everything it started; it keeps nothing running behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: {what} did not happen within {timeout:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="shipyard-data")
    parser.add_argument("--http-port", type=int, default=8500)
    parser.add_argument("--dns-port", type=int, default=8600)
    parser.add_argument("--exit-when-healthy", action="store_true", help="Stop once everything is healthy.")
    args = parser.parse_args()
    if port_taken(args.http_port):
        raise SystemExit(f"error: port {args.http_port} is in use (another server?); pass --http-port")
    api = f"http://127.0.0.1:{args.http_port}"
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    log_dir = Path(args.data_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as p:
            task = p.add_task("starting shipyard server", total=None)
            server_log = open(log_dir / "server.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", args.data_dir,
                 "--http-port", str(args.http_port), "--dns-port", str(args.dns_port)],
                stdout=server_log, stderr=subprocess.STDOUT,
            ))
            wait_until(lambda: httpx.get(api + "/v1/status/leader").status_code == 200, 30, "server start")
            p.update(task, description="starting the sample service `hello` (2 instances)")
            for n in range(2):
                port = free_port()
                env = {**os.environ, "PORT": str(port), "INSTANCE": f"hello-{n}"}
                procs.append(subprocess.Popen(
                    [sys.executable, str(HERE / "hello" / "app.py")], env=env,
                    stdout=subprocess.DEVNULL, stderr=open(log_dir / f"hello-{n}.log", "ab"),
                ))
                registration = {
                    "Name": "hello", "ID": f"hello-{n}", "Address": "127.0.0.1", "Port": port,
                    "Tags": ["demo", "urlprefix-/hello"], "Meta": {"version": "1"},
                    "Check": {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s", "Timeout": "1s",
                              "DeregisterCriticalServiceAfter": "1m"},
                }
                httpx.put(api + "/v1/agent/service/register", json=registration).raise_for_status()
            p.update(task, description="waiting for `hello` to pass its health checks")
            wait_until(
                lambda: len(httpx.get(api + "/v1/health/service/hello?passing").json()) == 2, 30, "hello healthy"
            )
        console.print(f"[green]all services healthy[/green] in {time.monotonic() - started:.1f}s", highlight=False)
        console.print(f"""
Shipyard control API: [bold]{api}[/bold] (Consul-compatible)
Try:
  curl -s {api}/v1/health/service/hello?passing
  dig @127.0.0.1 -p {args.dns_port} hello.service.consul SRV
  curl -s -X PUT -d 'debug' {api}/v1/kv/config/hello/log-level
  curl -s {api}/v1/kv/config/hello/log-level?raw
  .venv/bin/shipyard --http-addr 127.0.0.1:{args.http_port} services
  .venv/bin/shipyard --http-addr 127.0.0.1:{args.http_port} health hello
Press Ctrl-C to stop.""", highlight=False)
        if args.exit_when_healthy:
            return
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same way on SIGTERM as on Ctrl-C
    main()
