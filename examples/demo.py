"""`make demo`: runs the example project with `shipyard up`, shows it working, and says what to try.

Runs in the foreground until Ctrl-C, then `shipyard down` stops the services and the server it started.
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

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "hello"
console = Console()


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def shipyard(addr: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "--http-addr", addr, *args])
    if check and done.returncode != 0:
        raise SystemExit(done.returncode)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http-port", type=int, default=8500)
    parser.add_argument("--dns-port", type=int, default=8600)
    parser.add_argument("--exit-when-healthy", action="store_true", help="Show it working, then stop.")
    args = parser.parse_args()
    for port in (args.http_port, args.dns_port):
        if port_taken(port):
            raise SystemExit(f"error: port {port} is in use (another server?); pass --http-port/--dns-port")
    addr = f"127.0.0.1:{args.http_port}"
    api = f"http://{addr}"
    os.environ["SHIPYARD_DNS_PORT"] = str(args.dns_port)
    try:
        shipyard(addr, "up", str(PROJECT))
        entry = httpx.get(f"{api}/v1/health/service/hello?passing").json()[0]["Service"]
        greeting = httpx.get(f"http://127.0.0.1:{entry['Port']}/demo", timeout=10).json()
        console.print(f"GET hello/demo -> {greeting}", highlight=False)
        console.print(f"""
Shipyard is running the example in {PROJECT} (services: hello x2, worker: greeter).
Control API (Consul- and Marathon-compatible): [bold]{api}[/bold]   DNS: 127.0.0.1:{args.dns_port}
Try:
  .venv/bin/shipyard ps
  curl -s {api}/v1/health/service/hello?passing
  dig @127.0.0.1 -p {args.dns_port} hello.service.consul SRV
  curl -s http://127.0.0.1:{entry['Port']}/you            # enqueues a task for the worker
  .venv/bin/shipyard logs greeter                       # ... which prints it
  .venv/bin/shipyard queues
  .venv/bin/shipyard scale hello 3
  .venv/bin/shipyard kv put config/hello/level debug && .venv/bin/shipyard kv get config/hello/level
  curl -s {api}/v2/apps                                 # Marathon's view of the same jobs
(use --http-addr {addr} if you changed the port) Press Ctrl-C to stop.""", highlight=False)
        if not args.exit_when_healthy:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping…")
        shipyard(addr, "down", str(PROJECT), check=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same way on SIGTERM as on Ctrl-C
    main()
