"""The plugin contract of the gateway: what a plugin is, the phases it runs in, what it may touch.

A plugin is one small class in one file of this package; it never does blocking I/O on the worker's
event loop and never holds per-request state on itself (configs are shared by all requests).

Phases, in order, for every request that matched a route (Kong's model):
  1. `access(ctx)`        before the upstream is called. Return a `Reject` (or raise `Reject`) to answer
                          the client at the gateway (401, 403, 429, 413, CORS preflight 204...). May edit
                          ctx.request_headers, set ctx.consumer / ctx.credential, add ctx.response_headers.
  2. `response(ctx)`      once the upstream's status line and headers are known, before they are sent:
                          may edit ctx.upstream_status / ctx.upstream_headers (header transforms, CORS).
  3. `log(ctx)`           after the response is finished (metrics); must not raise.
Plugins run in descending `priority` (Kong's numbers: cors 2000, ip-restriction 990, auth ~1000-1250,
acl 950, rate-limiting 910, request-size-limiting 951, transformers 800, correlation-id 1, prometheus 13).

A plugin may also have `fast_access(req: FastRequest) -> bool`, an optional shortcut for the requests it lets
through: when every plugin of a route has one and none has a response or log phase or consumer-scoped plugins,
the proxy first tries them in order on the request as received (bytes, no RequestContext). Each either does what
access() would do for an admitted request and returns True, or returns False before any side effect; one False
(rejections, unusual configs) and the whole chain runs the usual way. Tests of access() hold for both.

Scopes (resolved by the control plane when it builds the route table): global, service, route,
consumer. The most specific configuration of one plugin name wins (consumer+route > route > service
> global), as in Kong; consumer-scoped plugins apply after authentication identified the consumer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Consumer:
    id: str
    username: str
    custom_id: str = ""
    groups: tuple[str, ...] = ()  # ACL groups


@dataclass
class RequestContext:
    """One request as plugins see it. Header lists keep order and duplicates: (name, value) pairs,
    names as received (compare case-insensitively with `header()`)."""

    method: str
    path: str  # path as received, without the query string
    query: str
    host: str
    client_ip: str
    scheme: str
    request_headers: list[tuple[str, str]]
    route_id: str = ""
    service_name: str = ""
    consumer: Consumer | None = None
    credential: Mapping[str, Any] | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)  # added to the client response
    upstream_status: int = 0
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    started_at: float = 0.0
    upstream_latency: float | None = None  # seconds, None when no upstream was called
    body_size: int | None = None  # Content-Length if given
    shared: dict[str, Any] = field(default_factory=dict)  # per-request scratch space between plugins

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.request_headers:
            if key.lower() == lname:
                return value
        return None

    def set_header(self, name: str, value: str) -> None:
        lname = name.lower()
        self.request_headers = [(k, v) for k, v in self.request_headers if k.lower() != lname]
        self.request_headers.append((name, value))

    def set_headers(self, pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...],
                    lowercase_names: frozenset[str] | None = None) -> None:
        """set_header for several headers, in one pass over the request headers (`lowercase_names`: their names
        in lower case, when the caller has them already)."""
        lnames = lowercase_names if lowercase_names is not None else {name.lower() for name, _ in pairs}
        kept = [(k, v) for k, v in self.request_headers if k.lower() not in lnames]
        kept += pairs
        self.request_headers = kept

    def remove_header(self, name: str) -> None:
        lname = name.lower()
        self.request_headers = [(k, v) for k, v in self.request_headers if k.lower() != lname]


class FastRequest:
    """What `fast_access` sees and sets: the request as received, and what the admitted request gets."""

    __slots__ = ("client_ip", "consumer", "consumers", "counters", "credential", "drop", "headers", "query",
                 "response_block", "route_id", "service_name", "upstream_block")

    def __init__(self, headers: list[tuple[bytes, bytes]], query: bytes, client_ip: str, route_id: str,
                 service_name: str, consumers: Any, counters: Any) -> None:
        self.headers = headers  # (name, value) as received, minus the ones the proxy rewrites (Host, ...)
        self.query = query
        self.client_ip = client_ip
        self.route_id = route_id
        self.service_name = service_name
        self.consumers = consumers  # the ConsumerIndex
        self.counters = counters  # the node's SharedCounters, or None
        self.consumer: Consumer | None = None
        self.credential: Mapping[str, Any] | None = None
        self.drop: frozenset[bytes] | None = None  # lower-case names of request headers not forwarded
        self.upstream_block = b""  # header lines added to the upstream request ("Name: value\r\n"...)
        self.response_block = b""  # header lines added to the client's response


class Reject(Exception):
    """Answer the client at the gateway: Kong's status codes and JSON bodies ({"message": ...})."""

    def __init__(self, status: int, message: str | None = None, *, headers: list[tuple[str, str]] | None = None,
                 body: bytes | None = None) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.message = message
        self.headers = headers or []
        self.body = body


class PluginConfigError(ValueError):
    """A plugin's configuration is invalid; the admin API answers 400 with this message."""


class Plugin:
    """Base class. Subclasses set `name` and `priority`, validate config in __init__, and override phases."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    fast_access: ClassVar[Any] = None  # optional: a method (FastRequest) -> bool, see the module docstring

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    async def access(self, ctx: RequestContext) -> Reject | None:
        return None

    def response(self, ctx: RequestContext) -> None:
        return None

    def log(self, ctx: RequestContext) -> None:
        return None


PLUGINS: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: makes a plugin available by its name (adding a plugin is adding a file)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    PLUGINS[cls.name] = cls
    return cls
