"""shipyard.sdk.config: typed settings read from the KV store under a prefix (`<prefix>/<field>` per field), kept
current by a blocking query on the prefix, with callbacks when they change.

It reads the KV over the server's HTTP API only; it never writes it, and a missing server, a missing key or a bad
value never crashes the service: defaults (or the last good value) stay in force and the problem is logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import logging
import os
import types
import typing
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, Union

import httpx

from shipyard.sdk.server_api import (
    SdkError,
    blocking_watch,
    control_client,
    control_verify,
    server_url,
    token_headers,
)

log = logging.getLogger("shipyard.sdk.config")

T = TypeVar("T")
ChangeCallback = Callable[[Any, Any], Any]
TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f"})


class Settings:
    """Base class for typed settings: annotate fields with defaults and each subclass becomes a frozen dataclass.

        class AssetSettings(config.Settings):
            max_upload_mb: int = 100
            formats: list[str] = ["jpg", "png"]     # list/dict values are JSON in the KV
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in inspect.get_annotations(cls):
            default = cls.__dict__.get(name, dataclasses.MISSING)
            # Mutable defaults are fine here: each instance gets its own copy.
            if isinstance(default, list | dict | set):
                setattr(cls, name, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
        dataclasses.dataclass(frozen=True)(cls)


def parse_value(raw: bytes, hint: Any) -> Any:
    """The KV value `raw` as type `hint` (int, float, bool, str, bytes, list/dict/tuple as JSON, Optional[...]);
    ValueError when it does not fit."""
    text = raw.decode("utf-8").strip() if hint is not bytes else ""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("", "null", "none") and len(options) < len(typing.get_args(hint)):
            return None
        errors = []
        for option in options:
            try:
                return parse_value(raw, option)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if hint is bool:
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if hint is str or hint is Any:
        return raw.decode("utf-8")
    if hint is bytes:
        return raw
    container = origin or hint
    if container in (list, dict, tuple, set, frozenset):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        expected = dict if container is dict else list
        if not isinstance(value, expected):
            raise ValueError(f"JSON {type(value).__name__} where a {expected.__name__} is expected")
        return value if container in (list, dict) else container(value)
    raise ValueError(f"unsupported settings type {hint!r}")


class LiveSettings(Generic[T]):
    """The current settings (`.current`, or attributes directly), kept up to date by `watch()`."""

    def __init__(self, cls: type[T], prefix: str, *, server: str | None = None) -> None:
        self.cls = cls
        # Checked on self.cls: the check narrows what it looks at to "a dataclass", which cls must stay a type[T].
        if not dataclasses.is_dataclass(self.cls):
            raise SdkError(f"{cls.__name__} is not a dataclass nor a shipyard.sdk.config.Settings subclass")
        self.prefix = prefix.strip("/")
        self.server = server
        self.hints = typing.get_type_hints(cls)
        self.fields = [f for f in dataclasses.fields(self.cls) if f.init]
        try:
            self.defaults: T = cls()
        except TypeError as exc:
            raise SdkError(f"every field of {cls.__name__} needs a default: {exc}") from None
        self.current: T = self.defaults
        self.callbacks: list[ChangeCallback] = []
        self._bad: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first: asyncio.Event | None = None
        self._http: httpx.AsyncClient | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for names LiveSettings lacks: settings.max_upload_mb == settings.current.max_upload_mb.
        if name.startswith("_") or "current" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.current, name)

    def on_change(self, fn: ChangeCallback) -> ChangeCallback:
        """Decorator: `fn(old, new)` (sync or async) runs after each change of the settings."""
        self.callbacks.append(fn)
        return fn

    @property
    def path(self) -> str:
        return f"/v1/kv/{self.prefix}/"

    # ---- applying what the KV holds -----------------------------------------------------------

    def _entries(self, body: Any) -> dict[str, bytes]:
        out = {}
        for entry in body if isinstance(body, list) else []:
            key = str(entry.get("Key", ""))
            name = key[len(self.prefix) + 1:] if key.startswith(self.prefix + "/") else ""
            if not name or "/" in name:
                continue  # deeper keys belong to something else under the prefix
            value = entry.get("Value")
            out[name] = base64.b64decode(value) if value else b""
        return out

    def _build(self, entries: dict[str, bytes]) -> T:
        values = {}
        for field in self.fields:
            raw = entries.get(field.name)
            if raw is None:
                self._bad.pop(field.name, None)
                values[field.name] = getattr(self.defaults, field.name)
                continue
            try:
                values[field.name] = parse_value(raw, self.hints.get(field.name, str))
                self._bad.pop(field.name, None)
            except (ValueError, UnicodeDecodeError) as exc:
                if self._bad.get(field.name) != raw:
                    log.warning("config %s/%s: ignoring bad value %r (%s); keeping %r", self.prefix, field.name,
                                raw[:200], exc, getattr(self.current, field.name))
                    self._bad[field.name] = raw
                values[field.name] = getattr(self.current, field.name)
        try:
            return self.cls(**values)
        except Exception as exc:  # a __post_init__ that validates: keep what we had
            log.warning("config %s: the new values were rejected (%s); keeping the current ones", self.prefix, exc)
            return self.current

    async def _apply(self, body: Any) -> None:
        old, new = self.current, self._build(self._entries(body))
        if new == old:
            return
        self.current = new
        log.info("config %s changed", self.prefix)
        for fn in list(self.callbacks):
            try:
                result = fn(old, new)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("config %s: on_change callback %s failed", self.prefix, getattr(fn, "__name__", fn))

    def read_now(self) -> T:
        """One synchronous read (for module level, before any loop runs); on failure the defaults stay."""
        try:
            with httpx.Client(base_url=server_url(self.server), timeout=3.0, trust_env=False,
                              headers=token_headers(), verify=control_verify(server_url(self.server))) as http:
                response = http.get(self.path, params={"recurse": "1"})
            if response.status_code not in (200, 404):
                raise httpx.HTTPStatusError(str(response.status_code), request=response.request, response=response)
        except httpx.HTTPError as exc:
            log.warning("config %s: cannot read from %s (%s); using defaults until the watch starts", self.prefix,
                        server_url(self.server), exc)
            return self.current
        self.current = self._build(self._entries(response.json() if response.status_code == 200 else None))
        return self.current

    # ---- watching ------------------------------------------------------------------------------

    async def watch(self) -> None:
        """Start following the prefix (blocking queries in a background task) and return once the first read is
        in — or after a few seconds if the server does not answer. Idempotent; Service calls it on startup."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._loop is not loop or self._task.done():
            self._loop = loop
            self._first = asyncio.Event()
            self._http = control_client(server_url(self.server))
            self._task = loop.create_task(self._follow(self._http, self._first), name=f"config watch {self.prefix}")
        assert self._first is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), 5.0)

    async def _follow(self, http: httpx.AsyncClient, first: asyncio.Event) -> None:
        while True:
            try:
                async for _status, body in blocking_watch(http, self.path, {"recurse": "1"}):
                    await self._apply(body)
                    first.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # a malformed answer must not stop the settings from following the KV
                log.exception("config %s: watching failed; starting over", self.prefix)
                await asyncio.sleep(1.0)

    async def refresh(self) -> T:
        """Read the prefix once now (without watching)."""
        async with control_client(server_url(self.server)) as http:
            response = await http.get(self.path, params={"recurse": "1"})
        if response.status_code not in (200, 404):
            response.raise_for_status()
        await self._apply(response.json() if response.status_code == 200 else None)
        return self.current

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if self._http is not None:
                await self._http.aclose()
        self._http = None


_loaded: weakref.WeakSet[LiveSettings[Any]] = weakref.WeakSet()


def default_prefix() -> str:
    service = os.environ.get("SHIPYARD_SERVICE")
    if not service:
        raise SdkError("config.load needs prefix=... (or SHIPYARD_SERVICE, for the default config/<service>)")
    return f"config/{service}"


def load(cls: type[T], prefix: str | None = None, *, server: str | None = None) -> LiveSettings[T]:
    """Settings of type `cls` from the KV under `prefix` (default config/$SHIPYARD_SERVICE).

    Called outside a running event loop (module level), it reads the KV once at once; inside one, it starts from
    the defaults and `await settings.watch()` (or Service on startup) brings the stored values."""
    settings = LiveSettings(cls, prefix or default_prefix(), server=server)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        settings.read_now()
    _loaded.add(settings)
    return settings


async def watch_all() -> None:
    """Start watching every settings object loaded in this process (Service does this on startup)."""
    await asyncio.gather(*(settings.watch() for settings in list(_loaded)))


async def close_all() -> None:
    for settings in list(_loaded):
        await settings.aclose()
