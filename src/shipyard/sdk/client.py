"""shipyard.sdk.client("assets"): an httpx-based client for another service, balanced round-robin across its passing
instances, which a background blocking query keeps current; with timeouts, retries within a budget, a circuit
breaker per instance, and the correlation headers of the request being served passed along.

It learns instances only from the server's health API (never by polling, never by importing the server), and it
never retries a request that may have reached a service unless the method is idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from shipyard.sdk.correlation import current_headers
from shipyard.sdk.server_api import SdkError, blocking_watch, control_client, server_url

log = logging.getLogger("shipyard.sdk.client")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
DISCOVERY_TIMEOUT = 5.0  # how long the first call waits for the server to name the instances
_UNSET: Any = object()


class ServiceUnavailable(SdkError):
    """No instance of the service could take the request: none passing, all circuits open, or none reachable."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"service {service!r} unavailable: {reason}")
        self.service = service
        self.reason = reason


@dataclass(frozen=True)
class Instance:
    id: str
    address: str
    port: int

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def instances_from_health(entries: list[dict[str, Any]] | None) -> list[Instance]:
    """Instances from /v1/health/service/<name>?passing, in the server's (stable) order."""
    out = []
    for entry in entries or []:
        service, node = entry.get("Service") or {}, entry.get("Node") or {}
        address = service.get("Address") or node.get("Address") or "127.0.0.1"
        port = service.get("Port") or 0
        if port:
            out.append(Instance(id=service.get("ID") or f"{address}:{port}", address=address, port=int(port)))
    return out


class CircuitBreaker:
    """Per instance: opens after `threshold` consecutive failures (transport errors, 5xx), lets one probe through
    after `reset_after` seconds (half-open), and closes on the probe's success."""

    def __init__(self, threshold: int, reset_after: float) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def would_allow(self, now: float) -> bool:
        return self.opened_at is None or (not self.probing and now - self.opened_at >= self.reset_after)

    def allows(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or now - self.opened_at < self.reset_after:
            return False
        self.probing = True
        return True

    def abandoned(self) -> None:
        """The call was cancelled before it told us anything: let the next one probe instead."""
        self.probing = False

    def succeeded(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.probing or (self.opened_at is None and self.failures >= self.threshold):
            self.opened_at = now
        self.probing = False


class RetryBudget:
    """Retries allowed over a sliding window: `ratio` of the requests made, plus a floor of `per_second`, so that
    retries cannot multiply the load on a struggling service (Finagle's RetryBudget)."""

    def __init__(self, ratio: float = 0.2, per_second: float = 3.0, window: float = 10.0) -> None:
        self.ratio, self.per_second, self.window = ratio, per_second, window
        self.requests: collections.deque[float] = collections.deque()
        self.retries: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        for stamps in (self.requests, self.retries):
            while stamps and now - stamps[0] > self.window:
                stamps.popleft()

    def record_request(self, now: float) -> None:
        self._trim(now)
        self.requests.append(now)

    def try_retry(self, now: float) -> bool:
        self._trim(now)
        if len(self.retries) >= self.ratio * len(self.requests) + self.per_second * self.window:
            return False
        self.retries.append(now)
        return True


def _is_connect_failure(exc: httpx.TransportError) -> bool:
    """The request never reached the instance, so even a POST can safely go to another one."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _replayable(kwargs: dict[str, Any]) -> bool:
    content = kwargs.get("content")
    if content is not None and not isinstance(content, bytes | bytearray | str):
        return False  # a stream can be sent once only
    files = kwargs.get("files")
    return not files or all(not hasattr(f, "read") for f in (files.values() if isinstance(files, dict) else files))


class _LoopState:
    """What belongs to one event loop: connections, the watch task and what it found."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: httpx.Limits) -> None:
        self.loop = loop
        self.http = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=limits, trust_env=False)
        self.control: httpx.AsyncClient | None = None
        self.watch: asyncio.Task[None] | None = None
        self.instances: list[Instance] = []
        self.resolved = asyncio.Event()
        self.changed = asyncio.Condition()


class ServiceClient:
    """Calls one service by name. Create it with `client(name)`; use it from async code."""

    def __init__(
        self,
        name: str,
        *,
        server: str | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
        max_attempts: int = 3,
        circuit_threshold: int = 5,
        circuit_reset: float = 10.0,
        retry_budget: RetryBudget | None = None,
        tag: str | None = None,
    ) -> None:
        self.name = name
        self.server = server
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.circuit_threshold = circuit_threshold
        self.circuit_reset = circuit_reset
        self.budget = retry_budget or RetryBudget()
        self.tag = tag
        self.breakers: dict[str, CircuitBreaker] = {}
        self._next = 0
        self._state: _LoopState | None = None

    # ---- instances --------------------------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or state.loop is not loop:
            # A client made at import time, or used from a new loop (tests): the old loop's connections and
            # watch died with it, so start afresh here rather than touch them.
            state = self._state = _LoopState(loop, httpx.Limits(max_connections=200, max_keepalive_connections=50))
            state.control = control_client(server_url(self.server))
            state.watch = loop.create_task(self._watch(state), name=f"shipyard client watch {self.name}")
        return state

    async def _watch(self, state: _LoopState) -> None:
        while True:
            try:
                await self._follow(state)
            except asyncio.CancelledError:
                raise
            except Exception:  # a malformed answer must not freeze the list for the life of the process
                log.exception("%s: watching instances failed; starting over", self.name)
                await asyncio.sleep(1.0)

    async def _follow(self, state: _LoopState) -> None:
        assert state.control is not None
        params: dict[str, Any] = {"passing": "1"}
        if self.tag:
            params["tag"] = self.tag
        async for _status, body in blocking_watch(state.control, f"/v1/health/service/{quote(self.name, safe='')}",
                                                  params):
            found = instances_from_health(body if isinstance(body, list) else [])
            if found != state.instances:
                log.info("%s: %d passing instance(s): %s", self.name, len(found),
                         ", ".join(f"{i.address}:{i.port}" for i in found) or "none")
            state.instances = found
            live = {i.id for i in found}
            for gone in [k for k in self.breakers if k not in live]:
                del self.breakers[gone]
            state.resolved.set()
            async with state.changed:
                state.changed.notify_all()

    async def instances(self) -> list[Instance]:
        """The passing instances as last reported by the server (waits for the first answer)."""
        state = self._loop_state()
        if not state.resolved.is_set():
            try:
                await asyncio.wait_for(state.resolved.wait(), DISCOVERY_TIMEOUT)
            except TimeoutError:
                raise ServiceUnavailable(
                    self.name, f"the shipyard server at {server_url(self.server)} did not answer") from None
        return list(state.instances)

    async def wait_for_instances(self, predicate: Callable[[list[Instance]], bool], timeout: float = 30.0
                                 ) -> list[Instance]:
        """Wait until the instance list (as the watch delivers it, no polling) satisfies `predicate`."""
        state = self._loop_state()
        await self.instances()

        async def satisfied() -> list[Instance]:
            async with state.changed:
                await state.changed.wait_for(lambda: predicate(list(state.instances)))
                return list(state.instances)

        return await asyncio.wait_for(satisfied(), timeout)

    def _breaker(self, instance: Instance) -> CircuitBreaker:
        breaker = self.breakers.get(instance.id)
        if breaker is None:
            breaker = self.breakers[instance.id] = CircuitBreaker(self.circuit_threshold, self.circuit_reset)
        return breaker

    def _pick(self, instances: list[Instance], tried: set[str], now: float) -> Instance | None:
        for _ in range(len(instances)):
            instance = instances[self._next % len(instances)]
            self._next += 1
            if instance.id not in tried and self._breaker(instance).allows(now):
                return instance
        return None

    # ---- requests ---------------------------------------------------------------------------

    def _headers(self, headers: Any) -> httpx.Headers:
        out = httpx.Headers(headers)
        for name, value in current_headers().items():
            if name not in out:
                out[name] = value
        return out

    async def request(self, method: str, path: str, *, timeout: Any = _UNSET, **kwargs: Any) -> httpx.Response:
        """Send a request to one passing instance (retrying another within the budget when safe) and return the
        read response, whatever its status. Keyword arguments are httpx's (params, headers, json, content...)."""
        method = method.upper()
        instances = await self.instances()
        state = self._loop_state()
        kwargs["headers"] = self._headers(kwargs.get("headers"))
        timeout = self.timeout if timeout is _UNSET else timeout
        path = path if path.startswith("/") else "/" + path
        replayable = _replayable(kwargs)
        idempotent = method in IDEMPOTENT_METHODS
        now = time.monotonic()
        self.budget.record_request(now)
        tried: set[str] = set()
        last_error: httpx.TransportError | None = None
        last_response: httpx.Response | None = None
        while True:
            instance = self._pick(instances, tried, now)
            if instance is None:
                break
            tried.add(instance.id)
            breaker = self._breaker(instance)
            try:
                response = await state.http.request(method, instance.base_url + path, timeout=timeout, **kwargs)
            except asyncio.CancelledError:
                breaker.abandoned()
                raise
            except httpx.TransportError as exc:
                now = time.monotonic()
                breaker.failed(now)
                last_error, last_response = exc, None
                safe = _is_connect_failure(exc) or (idempotent and not isinstance(exc, httpx.TimeoutException))
                if safe and replayable and self._may_retry(instances, tried, now):
                    log.info("%s %s on %s failed (%s); retrying on another instance", method, path,
                             instance.base_url, type(exc).__name__)
                    continue
                if _is_connect_failure(exc):
                    raise ServiceUnavailable(self.name, f"{instance.base_url} unreachable: {exc!r}") from exc
                raise
            now = time.monotonic()
            if response.status_code >= 500:
                breaker.failed(now)
            else:
                breaker.succeeded()
            if (response.status_code in RETRY_STATUSES and idempotent and replayable
                    and self._may_retry(instances, tried, now)):
                last_error, last_response = None, response
                continue
            return response
        if last_response is not None:
            return last_response
        if last_error is not None:
            raise ServiceUnavailable(self.name, f"no instance reachable ({last_error!r})") from last_error
        if not instances:
            raise ServiceUnavailable(self.name, "no passing instance")
        raise ServiceUnavailable(self.name, "circuit open on every passing instance")

    def _may_retry(self, instances: list[Instance], tried: set[str], now: float) -> bool:
        """Another attempt is allowed: attempts left, an untried instance that may take it, and budget."""
        if len(tried) >= self.max_attempts:
            return False
        if not any(i.id not in tried and self._breaker(i).would_allow(now) for i in instances):
            return False
        return self.budget.try_retry(now)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("HEAD", path, **kwargs)

    async def options(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("OPTIONS", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, timeout: Any = _UNSET, **kwargs: Any
                     ) -> AsyncIterator[httpx.Response]:
        """`async with svc.stream("GET", "/files/1") as r: async for chunk in r.aiter_bytes()` — a streamed
        response from one instance; retried on another only when the connection could not be made."""
        method = method.upper()
        instances = await self.instances()
        state = self._loop_state()
        kwargs["headers"] = self._headers(kwargs.get("headers"))
        timeout = self.timeout if timeout is _UNSET else timeout
        path = path if path.startswith("/") else "/" + path
        now = time.monotonic()
        self.budget.record_request(now)
        tried: set[str] = set()
        while True:
            instance = self._pick(instances, tried, now)
            if instance is None:
                raise ServiceUnavailable(self.name, "no passing instance with a closed circuit")
            tried.add(instance.id)
            breaker = self._breaker(instance)
            request = state.http.build_request(method, instance.base_url + path, timeout=timeout, **kwargs)
            try:
                response = await state.http.send(request, stream=True)
            except asyncio.CancelledError:
                breaker.abandoned()
                raise
            except httpx.TransportError as exc:
                now = time.monotonic()
                breaker.failed(now)
                if _is_connect_failure(exc) and _replayable(kwargs) and self._may_retry(instances, tried, now):
                    continue
                if _is_connect_failure(exc):
                    raise ServiceUnavailable(self.name, f"{instance.base_url} unreachable: {exc!r}") from exc
                raise
            if response.status_code >= 500:
                breaker.failed(time.monotonic())
            else:
                breaker.succeeded()
            try:
                yield response
            finally:
                await response.aclose()
            return

    async def aclose(self) -> None:
        """Stop the watch and close connections (those of the current loop)."""
        state, self._state = self._state, None
        if state is None:
            return
        if state.watch is not None:
            state.watch.cancel()
            with contextlib.suppress(BaseException):
                await state.watch
        with contextlib.suppress(RuntimeError):
            await state.http.aclose()
            if state.control is not None:
                await state.control.aclose()
        for key, cached in list(_clients.items()):
            if cached is self:
                del _clients[key]


_clients: dict[tuple[Any, ...], ServiceClient] = {}


def client(name: str, **options: Any) -> ServiceClient:
    """The client for service `name` (one per name and options in this process, so it can be made at import time
    and shared). Options: server, timeout, max_attempts, circuit_threshold, circuit_reset, retry_budget, tag."""
    key = (name, *sorted((k, repr(v)) for k, v in options.items()))
    found = _clients.get(key)
    if found is None:
        found = _clients[key] = ServiceClient(name, **options)
    return found


async def aclose_all() -> None:
    """Close every client used from the running loop (Service calls this on shutdown)."""
    loop = asyncio.get_running_loop()
    for cached in list(_clients.values()):
        if cached._state is not None and cached._state.loop is loop:
            await cached.aclose()
