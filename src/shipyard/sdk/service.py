"""shipyard.sdk.Service: serves an ASGI app with uvicorn, answers /health and /metrics in front of it, carries the
correlation headers of each request, and (outside the scheduler) registers itself with a TTL check it heartbeats.

It talks to the Shipyard server over HTTP only; it never imports the server's internals, never lets a lost server
stop it from serving, and never exits without deregistering what it registered itself (except under kill -9, which
the TTL check and DeregisterCriticalServiceAfter clean up).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from types import FrameType
from typing import Any

import httpx
import uvicorn

from shipyard.sdk.client import aclose_all as close_clients
from shipyard.sdk.config import close_all as close_settings
from shipyard.sdk.config import watch_all as watch_settings
from shipyard.sdk.correlation import CORRELATION_HEADER, PROPAGATED_HEADERS, incoming_headers, new_correlation_id
from shipyard.sdk.metrics import MetricsRegistry
from shipyard.sdk.server_api import SdkError, control_verify, server_url, token_headers

log = logging.getLogger("shipyard.sdk.service")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]
HealthCallable = Callable[[], Any]
Hook = Callable[[], Awaitable[Any]]

DEFAULT_TTL = 10.0
DEFAULT_DEREGISTER_AFTER = 60.0
DEFAULT_STOP_GRACE = 10.0
HEALTH_TIMEOUT = 5.0
OK_STATUSES = ("ok", "pass", "passing", "healthy", "up")
UNMATCHED_ROUTE = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw.rstrip("s"))
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds", name, raw)
        return default
    return value if value > 0 else default


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{int(seconds * 1000)}ms"


async def _send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: Any,
                     *, head: bool = False) -> None:
    payload = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]})
    await send({"type": "http.response.body", "body": b"" if head else payload})


def _route_label(scope: dict[str, Any]) -> str:
    """The route template (`/assets/{id}`), not the raw path, so metrics keep a bounded number of series."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


class ServiceMiddleware:
    """The ASGI app in front of the user's: /health, /metrics, correlation contextvar, request metrics."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        metrics = service.metrics
        self.requests = metrics.counter(
            "http_requests_total", "HTTP requests served, by method, route template and status class",
            ("method", "route", "status_class"))
        self.latency = metrics.histogram(
            "http_request_duration_seconds", "Time to serve an HTTP request, by method and route template",
            ("method", "route"), LATENCY_BUCKETS)
        self.in_flight = metrics.gauge("http_requests_in_flight", "HTTP requests being served now")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == "/health" and method in ("GET", "HEAD"):
            ok, body = await self.service.check_health()
            await _send_json(send, 200 if ok else 503, body, head=method == "HEAD")
            return
        if path == "/metrics" and method in ("GET", "HEAD"):
            text = self.service.metrics.render().encode()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
            ]})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else text})
            return
        await self._serve_app(scope, receive, send, method)

    async def _serve_app(self, scope: dict[str, Any], receive: Any, send: Any, method: str) -> None:
        carried: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            if name in PROPAGATED_HEADERS:
                carried[name] = raw_value.decode("latin-1")
        generated = CORRELATION_HEADER not in carried
        if generated:
            # Every request gets an id, so that the calls it makes downstream can be tied together in logs.
            carried[CORRELATION_HEADER] = new_correlation_id()
        token = incoming_headers.set(carried)
        status = 0

        async def send_and_watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(n.lower() == CORRELATION_HEADER.encode() for n, _ in headers):
                    headers.append((b"x-correlation-id", carried[CORRELATION_HEADER].encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        self.in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            elapsed = time.perf_counter() - started
            self.in_flight.dec()
            route = _route_label(scope)
            status_class = f"{status // 100}xx" if status else "5xx"
            self.requests.inc(method=method, route=route, status_class=status_class)
            self.latency.observe(elapsed, method=method, route=route)
            incoming_headers.reset(token)


class _GracefulServer(uvicorn.Server):
    """uvicorn's Server, with signals taken through the event loop and reported to the Service at once (so it
    deregisters before draining), and without uvicorn re-raising the signal after a clean shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[int], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
                installed.append(sig)
            except (RuntimeError, ValueError):  # not the main thread: whoever runs us handles signals
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit(sig)
        super().handle_exit(sig, frame)


class SelfRegistration:
    """The service's own catalog entry: registered with a TTL check, heartbeated, deregistered on the way out.

    Level-triggered: each beat re-registers when the server no longer knows the check (server wiped or restarted
    from scratch, or the entry was reaped after a long pause)."""

    def __init__(self, service: Service, base_url: str) -> None:
        self.service = service
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False,
                                      headers=token_headers(), verify=control_verify(base_url))
        self.service_id = service.service_id
        self.check_id = f"service:{self.service_id}"
        self.registered = False
        self.attempted = False  # a register was sent (even if its answer was lost): deregister on the way out
        self.deregistered = False
        self.lock = asyncio.Lock()
        self.beating: asyncio.Task[None] | None = None
        self._warned = False

    def definition(self, ok: bool, output: str) -> dict[str, Any]:
        svc = self.service
        return {
            "ID": self.service_id,
            "Name": svc.name,
            "Address": svc.advertised_address,
            "Port": svc.port,
            "Tags": list(svc.tags),
            "Meta": {**svc.meta, "shipyard-sdk": "self-registered"},
            "Check": {
                "CheckID": self.check_id,
                "Name": f"{svc.name} heartbeat",
                "TTL": _duration(svc.ttl),
                "DeregisterCriticalServiceAfter": _duration(svc.deregister_after),
                "Status": "passing" if ok else "critical",
                "Output": output,
            },
        }

    async def start(self) -> None:
        await self.beat()
        self.beating = asyncio.create_task(self._beat_forever(), name=f"heartbeat {self.service_id}")

    async def _beat_forever(self) -> None:
        # Three beats per TTL: one lost or late beat never lets the check expire.
        every = max(self.service.ttl / 3, 0.2)
        while not self.deregistered:
            await asyncio.sleep(every)
            await self.beat()

    async def beat(self) -> None:
        async with self.lock:
            if not self.deregistered:
                await self._beat()

    async def _beat(self) -> None:
        ok, body = await self.service.check_health()
        output = json.dumps(body, default=str)[:1024]
        try:
            if not self.registered:
                self.attempted = True
                await self._put("/v1/agent/service/register", json=self.definition(ok, output))
                self.registered = True
                log.info("registered %s as %s at %s:%s (TTL check %s)", self.service.name, self.service_id,
                         self.service.advertised_address, self.service.port, _duration(self.service.ttl))
            else:
                verb = "pass" if ok else "fail"
                response = await self.http.put(f"/v1/agent/check/{verb}/{self.check_id}", params={"note": output})
                if response.status_code == 404:
                    log.warning("the server forgot %s; registering again", self.service_id)
                    self.registered = False
                    await self._beat()
                    return
                response.raise_for_status()
        except httpx.HTTPError as exc:
            if not self._warned:
                log.warning("cannot reach the shipyard server at %s to register/heartbeat %s: %s",
                            self.http.base_url, self.service_id, exc)
                self._warned = True
            return
        if self._warned:
            log.info("the shipyard server at %s answers again", self.http.base_url)
            self._warned = False

    async def _put(self, path: str, **kwargs: Any) -> None:
        response = await self.http.put(path, **kwargs)
        response.raise_for_status()

    async def deregister(self) -> None:
        """Idempotent; called as soon as a stop signal arrives, and again on the way out."""
        if self.deregistered:
            return
        self.deregistered = True
        # The lock lets a register or heartbeat in flight finish first, so it cannot land after the deregister.
        async with self.lock:
            if self.beating is not None and self.beating is not asyncio.current_task():
                self.beating.cancel()
            if not self.attempted:
                return
            try:
                response = await self.http.put(f"/v1/agent/service/deregister/{self.service_id}")
                if response.status_code != 404:
                    response.raise_for_status()
                log.info("deregistered %s", self.service_id)
            except httpx.HTTPError as exc:
                log.warning("could not deregister %s (its TTL check will expire): %s", self.service_id, exc)

    async def aclose(self) -> None:
        await self.deregister()
        async with self.lock:  # a deregister started by the stop signal may still be on the wire
            pass
        if self.beating is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.beating
        await self.http.aclose()


class Service:
    """An ASGI app run as a Shipyard service.

    Outside the scheduler (no SHIPYARD_ALLOC_ID) it registers itself as `<name>-<host>-<port>` with a TTL check
    (`ttl`, default 10 s or $SHIPYARD_CHECK_TTL; removed after `deregister_after`, default 1 min or
    $SHIPYARD_DEREGISTER_AFTER, of being critical), heartbeats it with the result of `health`, and deregisters on
    SIGTERM/SIGINT before draining in-flight requests. Scheduled, the agent registers and checks it instead."""

    def __init__(
        self,
        app: ASGIApp,
        name: str | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        health: HealthCallable | None = None,
        ttl: float | None = None,
        deregister_after: float | None = None,
        server: str | None = None,
    ) -> None:
        resolved = name or os.environ.get("SHIPYARD_SERVICE")
        if not resolved:
            raise SdkError("Service needs a name: pass name=... or set SHIPYARD_SERVICE")
        self.app = app
        self.name = resolved
        self.host = host
        self.port: int = port if port is not None else int(os.environ.get("PORT") or 0)
        self.tags = tuple(tags)
        self.meta = {str(k): str(v) for k, v in (meta or {}).items()}
        self.health = health
        self.ttl = ttl or _float_env("SHIPYARD_CHECK_TTL", DEFAULT_TTL)
        self.deregister_after = deregister_after or _float_env("SHIPYARD_DEREGISTER_AFTER", DEFAULT_DEREGISTER_AFTER)
        self.stop_grace = _float_env("SHIPYARD_STOP_GRACE", DEFAULT_STOP_GRACE)
        self.server = server
        self.alloc_id = os.environ.get("SHIPYARD_ALLOC_ID") or None
        self.metrics = MetricsRegistry(process=True)
        self.asgi = ServiceMiddleware(app, self)
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []
        self.stopping = False
        self.registration: SelfRegistration | None = None
        self._uvicorn: _GracefulServer | None = None
        self._deregistering: asyncio.Task[None] | None = None

    @property
    def scheduled(self) -> bool:
        """True when the Shipyard scheduler started this instance (it then registers and checks it)."""
        return self.alloc_id is not None

    @property
    def service_id(self) -> str:
        return self.alloc_id or f"{self.name}-{self.host}-{self.port}"

    @property
    def advertised_address(self) -> str:
        # Listening on every address: announce loopback, the address every local client can reach.
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    def on_startup(self, fn: Hook) -> Hook:
        """Decorator: `async def` run in the serving loop before the service accepts requests."""
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Decorator: `async def` run in the serving loop after in-flight requests finished."""
        self.shutdown_hooks.append(fn)
        return fn

    async def check_health(self) -> tuple[bool, dict[str, Any]]:
        """(ok, body of GET /health): the `health` callable's verdict; failing while stopping."""
        if self.stopping:
            return False, {"status": "stopping"}
        if self.health is None:
            return True, {"status": "ok"}
        try:
            result = self.health()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, HEALTH_TIMEOUT)
        except Exception as exc:
            return False, {"status": "failing", "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(result, dict):
            ok = result.get("ok", True) is not False and str(result.get("status", "ok")).lower() in OK_STATUSES
            return ok, {**result, "status": "ok" if ok else "failing"}
        ok = bool(result)
        return ok, {"status": "ok" if ok else "failing"}

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (blocking): uvicorn with uvloop and httptools."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            # httpx logs every request at INFO: heartbeats and watches would drown the service's own lines.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self.serve())

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise SdkError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(2048)
        sock.set_inheritable(False)
        self.port = sock.getsockname()[1]
        return sock

    def _stop_requested(self, sig: int) -> None:
        # Called in the loop as soon as the signal arrives: leave the catalog first, so that clients stop
        # choosing this instance while uvicorn stops accepting and finishes what is in flight.
        if self.stopping:
            return
        self.stopping = True
        log.info("%s: %s received, stopping (grace %gs)", self.service_id, signal.Signals(sig).name, self.stop_grace)
        if self.registration is not None:
            self._deregistering = asyncio.get_running_loop().create_task(self.registration.deregister())

    def stop(self) -> None:
        """Ask a running `serve()` to stop gracefully, as SIGTERM would (for embedding and tests)."""
        self._stop_requested(signal.SIGTERM)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    async def serve(self) -> None:
        """Run the service in the current event loop until stopped."""
        sock = self._bind()
        uv_config = uvicorn.Config(
            self.asgi, http="httptools", lifespan="auto", access_log=False, server_header=False,
            # uvicorn annotates this int but hands it to asyncio.timeout(), which takes the fraction we mean.
            timeout_graceful_shutdown=max(self.stop_grace - 1.0, 0.5), log_level="info",  # type: ignore[arg-type]
        )
        server = self._uvicorn = _GracefulServer(uv_config, self._stop_requested)
        serving: asyncio.Task[None] | None = None
        try:
            await watch_settings()
            for hook in self.startup_hooks:
                await hook()
            serving = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn {self.service_id}")
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            if serving.done():
                await serving
                return
            log.info("%s serving on http://%s:%s%s", self.name, self.host, self.port,
                     " (scheduled: the agent registers it)" if self.scheduled else "")
            if not self.scheduled and not self.stopping:
                self.registration = SelfRegistration(self, server_url(self.server))
                await self.registration.start()
            await serving
        finally:
            if serving is not None and not serving.done():
                server.should_exit = True
                with contextlib.suppress(BaseException):
                    await serving
            if self.registration is not None:
                await self.registration.aclose()
            for hook in self.shutdown_hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("shutdown hook %s failed", getattr(hook, "__name__", hook))
            await close_settings()
            await close_clients()
            sock.close()
