"""1 GiB through the gateway each way (chunked upload, Content-Length upload, download) with flat worker memory.

Starts `shipyard server --dev` with one gateway worker and an aiohttp upstream registered with a urlprefix- tag,
streams the bodies with requests, and reports MB/s and the worker's peak RSS growth. It never reaches inside the
server.

Usage: python bench/gateway_stream.py [--gib 1]  (progress on stderr, one JSON line on stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

UPSTREAM = r'''
import sys
from aiohttp import web
CHUNK = b"x" * 65536
async def sink(request):
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"size": size})
async def source(request):
    size = int(request.query["size"])
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    while size > 0:
        piece = CHUNK if size >= len(CHUNK) else CHUNK[:size]
        await response.write(piece)
        size -= len(piece)
    await response.write_eof()
    return response
app = web.Application(client_max_size=1 << 40)
app.router.add_get("/source", source)
app.router.add_route("*", "/{tail:.*}", sink)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''
FLAT_LIMIT_MB = 64


def progress(message: str) -> None:
    print(f"[bench/gateway_stream] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench/gateway_stream: timed out waiting for {what}")


def worker_pids(server_pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_bytes()
            if int(data[data.rindex(b")") + 2 :].split()[1]) == server_pid and \
                    b"shipyard.gateway.worker" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    block = os.urandom(1 << 20)
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-stream-"))
    (tmp / "upstream.py").write_text(UPSTREAM)
    up_port, http_port, gw_port = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, str(tmp / "upstream.py"), str(up_port)])]
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--http-port", str(http_port), "--dns-port",
         "0", "--gateway-port", str(gw_port), "--gateway-workers", "1", "--log-level", "warning"],
        start_new_session=True,
    ))
    try:
        control, gateway = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{gw_port}"
        wait_for(lambda: requests.get(control + "/v1/status/leader", timeout=1).ok, "the server")
        requests.put(control + "/v1/agent/service/register", json={
            "Name": "sink", "Address": "127.0.0.1", "Port": up_port, "Tags": ["urlprefix-/big strip=/big"]})
        wait_for(lambda: requests.post(gateway + "/big/x", data=b"x", timeout=1).ok, "the route")
        (worker,) = worker_pids(procs[1].pid)
        before = peak_rss_mb(worker)

        def body() -> Iterator[bytes]:
            left = size
            while left > 0:
                piece = block if left >= len(block) else block[:left]
                left -= len(piece)
                yield piece

        class Sized:
            def __len__(self) -> int:
                return size

            def __iter__(self) -> Iterator[bytes]:
                return body()

        figures: dict[str, float] = {}
        for name, data, headers in (("upload_chunked", body(), {}),
                                    ("upload_length", Sized(), {"Content-Length": str(size)})):
            start = time.perf_counter()
            got = requests.post(gateway + "/big/up", data=data, headers=headers, timeout=600).json()["size"]
            assert got == size, (name, got)
            figures[f"{name}_mb_s"] = round(size / (1 << 20) / (time.perf_counter() - start), 1)
            progress(f"{name}: {figures[f'{name}_mb_s']} MB/s")
        start = time.perf_counter()
        got = 0
        with requests.get(gateway + f"/big/source?size={size}", stream=True, timeout=600) as r:
            for chunk in r.iter_content(1 << 20):
                got += len(chunk)
        assert got == size
        figures["download_mb_s"] = round(size / (1 << 20) / (time.perf_counter() - start), 1)
        progress(f"download: {figures['download_mb_s']} MB/s")
        growth = peak_rss_mb(worker) - before
        print(json.dumps({"bench": "gateway_stream", "bytes": size, **figures,
                          "worker_peak_rss_growth_mb": round(growth, 1), "flat": growth < FLAT_LIMIT_MB}))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
