"""The demo's HTTP service: `/` greets and enqueues a greeting task for the worker, `/health` is 200.

Standard library plus the Shipyard SDK's bus client; it learns its port and bus from the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shipyard.sdk.bus import BusApp

bus = BusApp()
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
            return
        name = self.path.strip("/").split("/")[-1] or "world"
        asyncio.run_coroutine_threadsafe(bus.enqueue("greetings", {"name": name}), loop).result(10)
        self._send(200, {"hello": name, "instance": os.environ.get("SHIPYARD_ALLOC_ID", "local")})

    def _send(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
