"""Benchmark of the secrets engine (Vault API) against the Consul KV of the same server, in one invocation:
KV v2 writes and reads, and transit encrypt, with hvac-style requests (X-Vault-Token, JSON bodies).

Owns the harness (one real `shipyard server` with a data dir, the engine in dev mode) and one load generator used
identically for each side; never imports Shipyard internals. The ratio is the barrier's cost: encryption, the
token and policy check, KV v2's metadata entry, and the audit-free request path.

Usage: python bench/secrets.py [--quick] [--ops N] [--concurrency C]  (progress on stderr, one JSON line on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

ROOT_TOKEN = "bench-root-token"
VALUE = "v" * 256


def progress(message: str) -> None:
    print(f"[bench/secrets] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, vault_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(workdir / "data"),
           "--http-port", str(http_port), "--dns-port", "0", "--no-gateway", "--vault-port", str(vault_port),
           "--vault-dev", "--vault-dev-root-token-id", ROOT_TOKEN, "--log-level", "warning"]
    log = open(workdir / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{vault_port}/v1/sys/health", timeout=1) as answer:
                if answer.status == 200:
                    return proc, http_port, vault_port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start: {(workdir / 'server.log').read_text()[-2000:]}")


async def run_phase(ops: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Operations/s with `concurrency` clients, each awaiting one request at a time."""
    counter = iter(range(ops))

    async def client() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ops / (time.perf_counter() - start)


def expect(status: int, wanted: tuple[int, ...], what: str) -> None:
    if status not in wanted:
        raise SystemExit(f"{what}: unexpected status {status}")


async def measure(http_port: int, vault_port: int, ops: int, concurrency: int) -> dict[str, float]:
    vault = f"http://127.0.0.1:{vault_port}/v1"
    consul = f"http://127.0.0.1:{http_port}/v1"
    headers = {"X-Vault-Token": ROOT_TOKEN, "X-Vault-Request": "true"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"{vault}/sys/mounts/transit", json={"type": "transit"}, headers=headers) as answer:
            expect(answer.status, (204,), "mount transit")

        async def vault_write(i: int) -> None:
            async with http.post(f"{vault}/secret/data/bench/k{i}", json={"data": {"v": VALUE}},
                                 headers=headers) as answer:
                expect(answer.status, (200,), "vault write")
                await answer.read()

        async def vault_read(i: int) -> None:
            async with http.get(f"{vault}/secret/data/bench/k{i}", headers=headers) as answer:
                expect(answer.status, (200,), "vault read")
                await answer.read()

        async def consul_write(i: int) -> None:
            async with http.put(f"{consul}/kv/bench/k{i}", data=VALUE) as answer:
                expect(answer.status, (200,), "consul write")
                await answer.read()

        async def consul_read(i: int) -> None:
            async with http.get(f"{consul}/kv/bench/k{i}") as answer:
                expect(answer.status, (200,), "consul read")
                await answer.read()

        plaintext = base64.b64encode(VALUE.encode()).decode()

        async def encrypt(i: int) -> None:
            async with http.post(f"{vault}/transit/encrypt/bench", json={"plaintext": plaintext},
                                 headers=headers) as answer:
                expect(answer.status, (200,), "transit encrypt")
                await answer.read()

        figures: dict[str, float] = {}
        for name, one in (("consul_kv_write_rps", consul_write), ("vault_kv2_write_rps", vault_write),
                          ("consul_kv_read_rps", consul_read), ("vault_kv2_read_rps", vault_read),
                          ("transit_encrypt_rps", encrypt)):
            progress(f"{name}: {ops} ops, {concurrency} concurrent")
            figures[name] = round(await run_phase(ops, concurrency, one), 1)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (500 operations per phase)")
    parser.add_argument("--ops", type=int, default=0, help="operations per phase (default 3000; --quick 500)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    ops = args.ops or (500 if args.quick else 3000)
    with tempfile.TemporaryDirectory(prefix="bench-secrets-") as tmp:
        proc, http_port, vault_port = start_server(Path(tmp))
        try:
            figures = uvloop.run(measure(http_port, vault_port, ops, args.concurrency))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
    figures["write_ratio_vault_vs_consul"] = round(figures["vault_kv2_write_rps"] / figures["consul_kv_write_rps"], 3)
    figures["read_ratio_vault_vs_consul"] = round(figures["vault_kv2_read_rps"] / figures["consul_kv_read_rps"], 3)
    print(json.dumps({"bench": "secrets", "ops_per_phase": ops, "concurrency": args.concurrency, **figures}))


if __name__ == "__main__":
    main()
