"""The prometheus plugin: per route and service request counts by status class, latency and upstream latency
histograms, summed for the whole node in the shared metrics file; `metrics_exposition()` renders them.

Where it is served: `GET /api/gateway/metrics` on the control port (Kong serves its metrics on the Admin API, not on
the proxy port, so a routed service's own /metrics is never shadowed and the figures are not public); the server
renders the node's shared file, so one scrape sums every worker. Never raises from the log phase and never blocks
on anything but one short file lock.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.counters import SharedMetrics, shared_metrics
from shipyard.gateway.plugins.base import Plugin, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUESTS = "shipyard_gateway_requests_total"
LATENCY = "shipyard_gateway_request_latency_seconds"
UPSTREAM = "shipyard_gateway_upstream_latency_seconds"
SEP = "\x1f"
# Names in the shared file are at most 112 bytes, too short for label sets with ids and long service names: a
# series is stored as (family code, hash of its labels, bucket), and each label set once, in pieces, as names.
FAMILY_CODES = {"q": REQUESTS, "l": LATENCY, "u": UPSTREAM}
LABELS_CODE = "n"
PIECE_BYTES = 80
MAX_LABEL_VALUE = 200

_registered: set[tuple[int, str]] = set()  # (id of a SharedMetrics, label hash) this process already wrote


def _label(value: str) -> str:
    value = value[:MAX_LABEL_VALUE]
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _pieces(text: str) -> list[str]:
    """text cut into pieces of at most PIECE_BYTES of UTF-8, never inside a character."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for ch in text:
        n = len(ch.encode())
        if size + n > PIECE_BYTES:
            out.append("".join(current))
            current, size = [], 0
        current.append(ch)
        size += n
    out.append("".join(current))
    return out


def _label_key(metrics: SharedMetrics | None, labels: str, updates: list[tuple[str, float]]) -> str:
    h = hashlib.blake2b(labels.encode(), digest_size=8).hexdigest()
    seen = (id(metrics), h)
    if seen not in _registered:
        for i, piece in enumerate(_pieces(labels)):
            updates.append((f"{LABELS_CODE}{SEP}{h}{SEP}{i}{SEP}{piece}", 0.0))
        _registered.add(seen)
    return h


def _observe(updates: list[tuple[str, float]], code: str, key: str, seconds: float) -> None:
    i = bisect.bisect_left(BUCKETS, seconds)
    updates.append((f"{code}{SEP}{key}{SEP}{i}", 1.0))  # i == len(BUCKETS): only in +Inf
    updates.append((f"{code}{SEP}{key}{SEP}sum", seconds))


def route_label(ctx: RequestContext) -> str:
    """Kong labels series with the route's name; the id when it has none."""
    match = ctx.shared.get("match")
    name = getattr(getattr(getattr(match, "route", None), "spec", None), "name", "")
    return str(name or ctx.route_id)


def metrics_for(ctx: RequestContext, now: float, metrics: SharedMetrics | None = None, *,
                per_consumer: bool = False) -> list[tuple[str, float]]:
    labels = f'service="{_label(ctx.service_name)}",route="{_label(route_label(ctx))}"'
    if per_consumer:
        labels += f',consumer="{_label(ctx.consumer.username if ctx.consumer is not None else "")}"'
    updates: list[tuple[str, float]] = []
    key = _label_key(metrics, labels, updates)
    status = ctx.shared.get("status") or ctx.upstream_status or 0
    updates.append((f"q{SEP}{key}{SEP}{int(status) // 100}xx", 1.0))
    if ctx.started_at:
        _observe(updates, "l", key, max(0.0, now - ctx.started_at))
    if ctx.upstream_latency is not None:
        _observe(updates, "u", key, max(0.0, ctx.upstream_latency))
    return updates


def _value(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def metrics_exposition(metrics: SharedMetrics | None = None) -> bytes:
    """The node's gateway metrics in the Prometheus text format 0.0.4 (histograms made cumulative here)."""
    snapshot = (metrics or shared_metrics()).snapshot()
    pieces: dict[str, dict[int, str]] = {}
    series: dict[tuple[str, str], dict[str, float]] = {}
    for name, value in snapshot.items():
        parts = name.split(SEP, 3)
        if parts[0] == LABELS_CODE and len(parts) == 4 and parts[2].isdigit():
            pieces.setdefault(parts[1], {})[int(parts[2])] = parts[3]
        elif parts[0] in FAMILY_CODES and len(parts) == 3:
            series.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    labels: dict[str, str] = {}
    for h, found in pieces.items():
        if set(found) == set(range(len(found))):
            labels[h] = "".join(found[i] for i in range(len(found)))
    lines = [f"# HELP {REQUESTS} Requests through the gateway by service, route and status class.",
             f"# TYPE {REQUESTS} counter"]
    for (code, h), values in sorted(series.items(), key=lambda item: labels.get(item[0][1], "")):
        if code == "q" and h in labels:
            for status_class, value in sorted(values.items()):
                lines.append(f'{REQUESTS}{{{labels[h]},status_class="{_label(status_class)}"}} {_value(value)}')
    for code, family, help_text in (("l", LATENCY, "Time from request to response end at the gateway."),
                                    ("u", UPSTREAM, "Time the upstream took to answer.")):
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} histogram"]
        for (fam, h), values in sorted(series.items(), key=lambda item: labels.get(item[0][1], "")):
            if fam != code or h not in labels:
                continue
            total = 0.0
            for i, le in enumerate([*map(repr, BUCKETS), "+Inf"]):
                total += values.get(str(i), 0.0)
                lines.append(f'{family}_bucket{{{labels[h]},le="{le}"}} {_value(total)}')
            lines.append(f"{family}_sum{{{labels[h]}}} {values.get('sum', 0.0)!r}")
            lines.append(f"{family}_count{{{labels[h]}}} {_value(total)}")
    return ("\n".join(lines) + "\n").encode()


@register
class PrometheusPlugin(Plugin):
    name = "prometheus"
    priority = 13

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.per_consumer = r.bool("per_consumer", False)
        r.finish()

    def log(self, ctx: RequestContext) -> None:
        try:
            metrics = ctx.shared.get("metrics")
            if not isinstance(metrics, SharedMetrics):
                metrics = shared_metrics()
            now = time.monotonic() if ctx.started_at < 1e9 else time.time()
            metrics.add_many(metrics_for(ctx, now, metrics, per_consumer=self.per_consumer))
        except Exception:  # metrics must never break a request; the log phase may not raise
            _registered.clear()  # a label set marked written may not have been: write them again
