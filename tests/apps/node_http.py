"""A tiny HTTP service for node tests: `/` answers the address it listens on (its node's), `/health` is 200.

Standard library only; it binds the address its node gives it (HOST), so instances on two nodes of one machine
never share a socket; SIGTERM finishes the request in flight, then exits.
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
        body = b"ok" if self.path == "/health" else self.server.server_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path}\n")


def main() -> None:
    host = os.environ.get("HOST") or os.environ.get("SHIPYARD_NODE_ADDRESS") or "127.0.0.1"
    server = ThreadingHTTPServer((host, int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"listening on {host}:{os.environ['PORT']}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
