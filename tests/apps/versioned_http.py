"""A tiny HTTP service for scheduler tests: `/` answers its VERSION, `/health` is 200 unless UNHEALTHY is set.

Standard library only, so any instance starts fast; SIGTERM finishes the request in flight, then exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            status = 500 if os.environ.get("UNHEALTHY") else 200
            body = b"unhealthy" if status == 500 else b"ok"
        else:
            status, body = 200, f"{os.environ.get('VERSION', '0')} {os.environ.get('SHIPYARD_ALLOC_ID', '')}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path}\n")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"version {os.environ.get('VERSION', '0')} listening on {os.environ['PORT']}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
