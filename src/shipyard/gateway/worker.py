"""A gateway worker process: `python -m shipyard.gateway.worker --control URL --port 8080`.

Owns one listening socket (SO_REUSEPORT, shared with its sibling workers), the route table it follows from the
store by watch through the server's HTTP API, upstream pools and passive health; it never opens the store's
files and never writes to the store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import importlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

import uvloop

from shipyard.gateway import DATA_PLANE_BUILD
from shipyard.gateway.balancer import HealthBoard, RetryBudget
from shipyard.gateway.builtin import GatewayBuiltins
from shipyard.gateway.counters import ENV_PATH as COUNTERS_ENV
from shipyard.gateway.counters import shared_counters
from shipyard.gateway.own_listeners import OwnListeners
from shipyard.gateway.plugin_chain import ConsumerIndex
from shipyard.gateway.proxy import ClientConnection, GatewaySettings
from shipyard.gateway.table import RouteTable, build_route_table
from shipyard.gateway.tls_certificates import CertificateSet, listener_context
from shipyard.gateway.upstream import UpstreamPool
from shipyard.store.base import Event, EventType
from shipyard.store.follow import follow_prefix
from shipyard.store.remote import RemoteStore
from shipyard.tasks import cancel_and_wait
from shipyard.tls import client_context, self_signed

log = logging.getLogger("shipyard.gateway.worker")

WATCHED_PREFIXES = ("gateway/", "catalog/", "jobs/")
TICK = 0.5  # seconds: the coarse clock and timeout checks
# A request that heard nothing this long from an instance that left the route table (its checks critical: its
# node's link cut, its agent gone) goes to another one (proxy.abandon_unrouted) rather than wait for the connect (5 s)
# or read (60 s) timeout: clients with shorter ones would fail though the platform knows the instance is gone.
GONE_SILENCE = 1.0
REBUILD_DELAY = 0.02  # coalesce bursts of store events into one table build


class GatewayWorker:
    """The state one worker process shares between its client connections."""

    def __init__(self, settings: GatewaySettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.table = RouteTable([], ConsumerIndex())
        self.pool = UpstreamPool(loop)
        self.board = HealthBoard()
        self.builtins = GatewayBuiltins()  # /docs
        self.budget = RetryBudget()
        self.clock = loop.time()
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        self.port_b = str(settings.port).encode()
        self.forwarded_tail = b"\r\nX-Forwarded-Port: %s\r\nVia: %s\r\n" % (self.port_b, settings.via)
        self.tls_port_b = b""  # the TLS port, once listening: X-Forwarded-Port there, and where redirects point
        self.tls_forwarded_tail = self.forwarded_tail
        self.tls_server: asyncio.AbstractServer | None = None
        self.host_names: dict[bytes, bytes] = {}  # Host header -> lowercase name without port
        self.counters = shared_counters() if os.environ.get(COUNTERS_ENV) else None  # handed to plugins
        self.server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.routed: frozenset[str] = frozenset()  # every target address of the current table

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task for an exchange's async step (upstream connect, plugin phases), referenced until done."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def set_table(self, table: RouteTable) -> None:
        self.table = table  # connections read it per request: in-flight exchanges keep their match
        self.routed = frozenset(t.address for route in table.routes for t in route.backend.spec.targets)

    def _tick(self) -> None:
        now = self.clock = self.loop.time()
        for conn in list(self.connections):
            try:
                conn.check_timeouts(now)
                conn.abandon_unrouted(self.routed, now, GONE_SILENCE)
            except Exception:
                log.exception("timeout check failed")
        self.pool.close_idle(now)
        self._ticker = self.loop.call_later(TICK, self._tick)

    async def listen(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        # A protocol by its methods, not by its base class (compiled by mypyc, see ClientConnection): cast, no-op.
        self.server = await self.loop.create_server(lambda: cast(asyncio.Protocol, ClientConnection(self)), sock=sock,
                                                    backlog=4096)
        self._ticker = self.loop.call_later(TICK, self._tick)

    async def listen_tls(self, host: str, port: int, context: ssl.SSLContext) -> None:
        """The TLS port: the same protocol over asyncio's SSL transport (the context picks certificates by SNI)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        self.tls_port_b = str(port).encode()
        self.tls_forwarded_tail = b"\r\nX-Forwarded-Port: %s\r\nVia: %s\r\n" % (self.tls_port_b, self.settings.via)
        self.tls_server = await self.loop.create_server(lambda: cast(asyncio.Protocol, ClientConnection(self)),
                                                        sock=sock, backlog=4096, ssl=context,
                                                        ssl_handshake_timeout=self.settings.header_timeout)

    async def drain(self, grace: float) -> None:
        """Stop accepting, let every exchange in flight finish (with Connection: close), then return."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        if self.tls_server is not None:
            self.tls_server.close()
        deadline = self.loop.time() + grace
        while self.loop.time() < deadline:
            for conn in list(self.connections):
                if conn.current is None and conn.parsing is None and conn.tunnel is None:
                    conn._close()
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn._abort()
        self.pool.close_idle(self.loop.time(), 0)
        if self._ticker is not None:
            self._ticker.cancel()
        await self.builtins.close()


class RouteFollower:
    """Keeps the worker's table equal to build_route_table(store contents): each prefix followed with the store's
    follow_prefix (a range, then a watch from its revision; a gap or error re-reads that prefix)."""

    def __init__(self, store: RemoteStore, on_table: Callable[[RouteTable], None],
                 own: OwnListeners | None = None) -> None:
        self.store = store
        self.on_table = on_table
        self.own = own
        self.contents: dict[str, bytes] = {}
        self.revision = 0
        self.ready = asyncio.Event()
        self._rebuild: asyncio.TimerHandle | None = None
        self._loaded: set[str] = set()  # prefixes read at least once
        self.certificates: CertificateSet | None = None  # the TLS port's, rebuilt when gateway/certificates change

    async def run(self) -> None:
        await asyncio.gather(*(follow_prefix(self.store, prefix, self._apply, functools.partial(self._resync, prefix),
                                             name=f"gateway routes {prefix}")
                               for prefix in WATCHED_PREFIXES))

    async def _resync(self, prefix: str) -> int:
        """Replaces what is known under prefix with a fresh read; the first table waits for every prefix."""
        result = await self.store.range(prefix, prefix=True)
        for key in [k for k in self.contents if k.startswith(prefix)]:
            del self.contents[key]
        for kv in result.kvs:
            self.contents[kv.key] = kv.value
        self.revision = max(self.revision, result.revision)
        self._loaded.add(prefix)
        if len(self._loaded) == len(WATCHED_PREFIXES):
            self._build()
        return result.revision

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            if event.type == EventType.DELETE:
                self.contents.pop(event.kv.key, None)
            else:
                self.contents[event.kv.key] = event.kv.value
            self.revision = max(self.revision, event.kv.mod_revision)
        if self._rebuild is None and len(self._loaded) == len(WATCHED_PREFIXES):
            self._rebuild = asyncio.get_running_loop().call_later(REBUILD_DELAY, self._build)

    def _build(self) -> None:
        self._rebuild = None
        try:
            table = build_route_table(self.contents, self.revision, self.own)
        except Exception:
            log.exception("building the route table failed; keeping the previous one")
            return
        self.on_table(table)
        if self.certificates is not None:
            try:
                self.certificates.update(self.contents)
            except Exception:
                log.exception("loading the gateway certificates failed; keeping the previous ones")
        self.ready.set()


def control_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client context for an https control API: its CA, and our certificate if it verifies clients."""
    if not any(url.startswith("https://") for url in args.control):
        return None
    return client_context(args.control_ca, args.control_cert, args.control_key)


def default_certificates(args: argparse.Namespace) -> CertificateSet:
    """The TLS port's certificates: --tls-cert as the default (a self-signed one without it), SNIs from the store."""
    if args.tls_cert:
        with open(args.tls_cert, "rb") as cert_file, open(args.tls_key or args.tls_cert, "rb") as key_file:
            cert_pem, key_pem = cert_file.read(), key_file.read()
    else:
        cert_pem, key_pem = self_signed("localhost", ["localhost"])
    return CertificateSet(listener_context(cert_pem, key_pem))


def _die_with_parent() -> None:
    """Linux: SIGTERM us when the server that started us dies, even by kill -9."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shipyard.gateway.worker", description=__doc__)
    p.add_argument("--control", required=True, action="append",
                   help="the server's control API, e.g. http://127.0.0.1:8500; repeatable (servers of one cluster: "
                        "the next is used when one cannot be reached, as an agent's workers do)")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--server-port", type=int, action="append", default=[],
                   help="a port of the server's own listeners besides --control's and --port (its DNS port): never "
                        "routed to from the catalog; repeatable")
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument("--keepalive-timeout", type=float, default=60.0)
    p.add_argument("--body-timeout", type=float, default=60.0)
    p.add_argument("--write-timeout", type=float, default=60.0)
    p.add_argument("--max-header-size", type=int, default=32 * 1024)
    p.add_argument("--max-headers", type=int, default=100)
    p.add_argument("--max-body-size", type=int, default=0, help="bytes; 0: no limit")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight requests")
    p.add_argument("--plugin-module", action="append", default=[],
                   help="import this module too (it registers more plugins); repeatable")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--control-ca", default="", help="CA of an https:// --control")
    p.add_argument("--control-cert", default="", help="client certificate for an https:// --control")
    p.add_argument("--control-key", default="", help="key of --control-cert")
    p.add_argument("--tls-port", type=int, default=0, help="also terminate TLS on this port (0: no)")
    p.add_argument("--tls-cert", default="", help="default certificate of --tls-port (default: self-signed)")
    p.add_argument("--tls-key", default="", help="key of --tls-cert")
    return p.parse_args(argv)


async def run_worker(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    settings = GatewaySettings(
        max_header_size=args.max_header_size, max_headers=args.max_headers, max_body_size=args.max_body_size,
        header_timeout=args.header_timeout, keepalive_timeout=args.keepalive_timeout,
        body_timeout=args.body_timeout, write_timeout=args.write_timeout, port=args.port,
    )
    worker = GatewayWorker(settings, loop)
    store = RemoteStore(args.control, ssl_context=control_tls(args))
    own = OwnListeners.of_this_host({args.port, *args.server_port}, args.bind, args.control[0])
    worker.pool.own = own
    follower = RouteFollower(store, worker.set_table, own)
    follower.certificates = default_certificates(args) if args.tls_port else None
    follow_task = asyncio.ensure_future(follower.run())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.parent_pid:  # from the start: a server gone before the first table would leave us waiting forever
        worker.spawn(_watch_parent(args.parent_pid, stop))
    ready = asyncio.ensure_future(follower.ready.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        # Requests make many short-lived objects and few cycles: collect young objects rarely, and never scan the
        # modules and tables loaded so far (fewer, shorter GC pauses in the latency tail).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        await worker.listen(args.bind, args.port)
        if follower.certificates is not None:
            await worker.listen_tls(args.bind, args.tls_port, follower.certificates.listening)
        log.info("gateway worker %d serving http://%s:%d (%d routes; data plane: %s)", os.getpid(), args.bind,
                 args.port, len(worker.table), DATA_PLANE_BUILD)
        await stop.wait()
    await worker.drain(args.shutdown_grace)
    ready.cancel()
    await cancel_and_wait(follow_task)
    await store.close()


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != pid:
            stop.set()
            return
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    _die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        # The server died while we were starting, before the death signal was asked for: nothing would send it.
        log.warning("gateway worker %d: its server (pid %d) is gone; exiting", os.getpid(), args.parent_pid)
        return
    for module in args.plugin_module:
        importlib.import_module(module)
    uvloop.run(run_worker(args))


if __name__ == "__main__":
    main()
