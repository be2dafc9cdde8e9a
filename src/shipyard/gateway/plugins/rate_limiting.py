"""The rate-limiting plugin: requests per second/minute/hour/day by consumer, credential or IP (Kong's
rate-limiting, policy "local"), counted in the node's shared counters file so every worker sees one count.

Never makes a network call per request; never counts a refused request against a window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.counters import WINDOWS, SharedCounters, WindowUse, shared_counters
from shipyard.gateway.plugins.base import FastRequest, Plugin, PluginConfigError, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader


@register
class RateLimitingPlugin(Plugin):
    name = "rate-limiting"
    priority = 910

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        configured = [(period, seconds, r.int(period, None, minimum=1)) for period, seconds in WINDOWS.items()]
        self.limits = [(p, s, n) for p, s, n in configured if n is not None]
        self.limit_by = r.choice("limit_by", ("consumer", "credential", "ip", "header", "service"), "consumer")
        self.header_name = r.str("header_name", "")
        self.policy = r.choice("policy", ("local",), "local")
        self.hide_client_headers = r.bool("hide_client_headers", False)
        self.fault_tolerant = r.bool("fault_tolerant", True)
        r.finish()
        if not self.limits:
            raise PluginConfigError("at least one of these fields must be non-empty: second, minute, hour, day")
        if self.limit_by == "header" and not self.header_name:
            raise PluginConfigError("header_name: required when limit_by is header")
        # Distinct configs never share counts (two plugins on two routes with the same consumer).
        self.scope = f"{sorted(config.items())!r}"
        # Header names and limit values are the same for every request: made once here, not per request.
        self.windows = [
            (seconds, limit, f"X-RateLimit-Limit-{period.capitalize()}", f"X-RateLimit-Remaining-{period.capitalize()}",
             str(limit))
            for period, seconds, limit in self.limits
        ]
        # One window with headers shown (the common config) has a shorter path in access(): same counts, same headers.
        self.single = self.windows[0] if len(self.windows) == 1 and not self.hide_client_headers else None
        # Counter keys of consumers, made once per (route, service, consumer) rather than formatted per request (the
        # same str object each time also keeps its hash, which the counters' lease lookup needs).
        self._consumer_keys: dict[tuple[str, str, str], str] = {}
        # fast_access's last (route id, service name, consumer) and its key: under load one consumer's requests come
        # in runs, and three `is` checks cost less than building and hashing the tuple above.
        self._last_fast: tuple[str, str, object, str] = ("", "", None, "")
        # fast_access's headers for an admitted request: (left, left, reset) go in.
        self.fast_headers = None if self.single is None else (
            f"{self.single[2]}: {self.single[4]}\r\n{self.single[3]}: %d\r\nRateLimit-Limit: {self.single[4]}\r\n"
            "RateLimit-Remaining: %d\r\nRateLimit-Reset: %d\r\n").encode("latin-1", "replace")

    def consumer_key(self, route_id: str, service_name: str, consumer_id: str) -> str:
        cache_key = (route_id, service_name, consumer_id)
        key = self._consumer_keys.get(cache_key)
        if key is None:
            if len(self._consumer_keys) >= 10000:
                self._consumer_keys.clear()
            key = self._consumer_keys[cache_key] = f"rl|{route_id}|{service_name}|{self.scope}|c:{consumer_id}"
        return key

    def counter_key(self, ctx: RequestContext) -> str:
        consumer = ctx.consumer
        if self.limit_by == "consumer" and consumer is not None:
            return self.consumer_key(ctx.route_id, ctx.service_name, consumer.id)
        return f"rl|{ctx.route_id}|{ctx.service_name}|{self.scope}|{self.identifier(ctx)}"

    def fast_access(self, req: FastRequest) -> bool:
        """access() for an admitted request of a one-window limit by consumer or IP; a refusal, other identities
        and shown-nothing configs are left to access() (a refused request was not counted, so it counts again)."""
        template = self.fast_headers
        counters = req.counters
        if template is None or not isinstance(counters, SharedCounters):
            return False
        consumer = req.consumer
        if self.limit_by == "consumer" and consumer is not None:
            last = self._last_fast
            if last[2] is consumer and last[0] is req.route_id and last[1] is req.service_name:
                key = last[3]
            else:
                key = self.consumer_key(req.route_id, req.service_name, consumer.id)
                self._last_fast = (req.route_id, req.service_name, consumer, key)
        elif self.limit_by == "ip" or self.limit_by == "consumer":  # no consumer: Kong counts by IP
            key = f"rl|{req.route_id}|{req.service_name}|{self.scope}|ip:{req.client_ip}"
        else:
            return False
        seconds, limit = self.single[0], self.single[1]  # type: ignore[index]
        try:
            use = counters.acquire(key, seconds, limit)
        except OSError:
            return False
        if not use.allowed:
            return False
        count = use.count
        left = limit - count if count < limit else 0
        reset = use.reset
        req.response_block += template % (left, left, 1 if reset <= 1 else math.ceil(reset))
        return True

    def identifier(self, ctx: RequestContext) -> str:
        if self.limit_by == "consumer" and ctx.consumer is not None:
            return f"c:{ctx.consumer.id}"
        if self.limit_by == "credential" and ctx.credential is not None and ctx.credential.get("id"):
            return f"k:{ctx.credential['id']}"
        if self.limit_by == "header":
            value = ctx.header(self.header_name)
            if value:
                return f"h:{value}"
        if self.limit_by == "service":
            return f"s:{ctx.service_name}"
        return f"ip:{ctx.client_ip}"  # Kong falls back to the IP when the chosen identity is missing

    async def access(self, ctx: RequestContext) -> Reject | None:
        key = self.counter_key(ctx)
        single = self.single
        if single is not None:
            return self._access_one_window(ctx, key, single)
        uses: list[tuple[WindowUse, int, str, str, str]] = []
        refused = None
        try:
            # The data plane hands its counters in ctx.shared; else $SHIPYARD_GATEWAY_SHARED is opened.
            counters = ctx.shared.get("counters")
            if not isinstance(counters, SharedCounters):
                counters = shared_counters()
            for seconds, limit, limit_name, remaining_name, limit_text in self.windows:
                use = counters.acquire(key, seconds, limit)
                uses.append((use, seconds, limit_name, remaining_name, limit_text))
                if not use.allowed:
                    refused = use
                    break
            if refused is not None:
                for _, seconds, *_ in uses[:-1]:
                    counters.release(key, seconds)
        except OSError:
            if self.fault_tolerant:
                return None
            raise
        if self.hide_client_headers:
            if refused is None:
                return None
            headers: list[tuple[str, str]] = []
        else:
            headers = []
            tightest, tightest_left, tightest_text = refused, 0, ""
            for use, _, limit_name, remaining_name, limit_text in uses:
                left = use.limit - use.count if use.count < use.limit else 0
                headers += ((limit_name, limit_text), (remaining_name, str(left)))
                if use is refused or (refused is None and (tightest is None or left < tightest_left or (
                        left == tightest_left and use.reset > tightest.reset))):
                    tightest, tightest_left, tightest_text = use, left, limit_text
            assert tightest is not None
            headers += (("RateLimit-Limit", tightest_text), ("RateLimit-Remaining", str(tightest_left)),
                        ("RateLimit-Reset", str(max(1, math.ceil(tightest.reset)))))
        if refused is not None:
            headers.append(("Retry-After", str(max(1, math.ceil(refused.reset)))))
            return Reject(429, "API rate limit exceeded", headers=headers)
        ctx.response_headers.extend(headers)
        return None

    def _access_one_window(self, ctx: RequestContext, key: str,
                           window: tuple[int, int, str, str, str]) -> Reject | None:
        """access() for one window whose headers are shown: what the general path does, without its loops."""
        seconds, limit, limit_name, remaining_name, limit_text = window
        counters = ctx.shared.get("counters")
        try:
            if not isinstance(counters, SharedCounters):
                counters = shared_counters()
            use = counters.acquire(key, seconds, limit)
        except OSError:
            if self.fault_tolerant:
                return None
            raise
        count = use.count
        left = str(limit - count) if count < limit else "0"
        reset = use.reset
        reset_text = "1" if reset <= 1 else str(math.ceil(reset))
        headers = [(limit_name, limit_text), (remaining_name, left), ("RateLimit-Limit", limit_text),
                   ("RateLimit-Remaining", left), ("RateLimit-Reset", reset_text)]
        if not use.allowed:
            headers.append(("Retry-After", reset_text))
            return Reject(429, "API rate limit exceeded", headers=headers)
        ctx.response_headers += headers
        return None
