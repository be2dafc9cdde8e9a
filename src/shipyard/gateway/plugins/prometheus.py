"""The prometheus plugin: per route and service request counts by status class, latency and upstream latency
histograms, summed for the whole node in the shared metrics file; `metrics_exposition()` renders them.

Where it is served: a gateway worker answers `GET /metrics` (Prometheus text format) from `metrics_exposition()`
(any worker shows the whole node, since the sums live in the shared file), and the control server can render
the same file. Never raises from the log phase and never blocks on anything but one short file lock.
"""

from __future__ import annotations

import bisect
import time

from shipyard.gateway.counters import SharedMetrics, shared_metrics
from shipyard.gateway.plugins.base import Plugin, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUESTS = "shipyard_gateway_requests_total"
LATENCY = "shipyard_gateway_request_latency_seconds"
UPSTREAM = "shipyard_gateway_upstream_latency_seconds"
SEP = "\x1f"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _observe(updates: list[tuple[str, float]], family: str, labels: str, seconds: float) -> None:
    i = bisect.bisect_left(BUCKETS, seconds)
    le = "+Inf" if i >= len(BUCKETS) else repr(BUCKETS[i])
    updates.append((f"{family}{SEP}{labels}{SEP}{le}", 1.0))
    updates.append((f"{family}{SEP}{labels}{SEP}sum", seconds))


def metrics_for(ctx: RequestContext, now: float) -> list[tuple[str, float]]:
    labels = f'service="{_label(ctx.service_name)}",route="{_label(ctx.route_id)}"'
    status = ctx.shared.get("status") or ctx.upstream_status or 0
    updates = [(f"{REQUESTS}{SEP}{labels},status_class=\"{int(status) // 100}xx\"{SEP}", 1.0)]
    if ctx.started_at:
        _observe(updates, LATENCY, labels, max(0.0, now - ctx.started_at))
    if ctx.upstream_latency is not None:
        _observe(updates, UPSTREAM, labels, max(0.0, ctx.upstream_latency))
    return updates


def metrics_exposition(metrics: SharedMetrics | None = None) -> bytes:
    """The node's gateway metrics in the Prometheus text format (histograms made cumulative here)."""
    snapshot = (metrics or shared_metrics()).snapshot()
    counts: dict[str, float] = {}
    hist: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in snapshot.items():
        parts = key.split(SEP)
        if len(parts) != 3:
            continue
        family, labels, extra = parts
        if family == REQUESTS:
            counts[labels] = counts.get(labels, 0.0) + value
        else:
            hist.setdefault((family, labels), {})[extra] = value
    lines = [f"# HELP {REQUESTS} Requests through the gateway by service, route and status class.",
             f"# TYPE {REQUESTS} counter"]
    lines += [f"{REQUESTS}{{{labels}}} {value:.0f}" for labels, value in sorted(counts.items())]
    for family, help_text in ((LATENCY, "Time from request to response end at the gateway."),
                              (UPSTREAM, "Time the upstream took to answer.")):
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} histogram"]
        for (fam, labels), values in sorted(hist.items()):
            if fam != family:
                continue
            total = 0.0
            for le in [*map(repr, BUCKETS), "+Inf"]:
                total += values.get(le, 0.0)
                lines.append(f'{family}_bucket{{{labels},le="{le}"}} {total:.0f}')
            lines.append(f"{family}_sum{{{labels}}} {values.get('sum', 0.0)}")
            lines.append(f"{family}_count{{{labels}}} {total:.0f}")
    return ("\n".join(lines) + "\n").encode()


@register
class PrometheusPlugin(Plugin):
    name = "prometheus"
    priority = 13

    def __init__(self, config):  # type: ignore[no-untyped-def]
        super().__init__(config)
        r = ConfigReader(config)
        self.per_consumer = r.bool("per_consumer", False)
        r.finish()

    def log(self, ctx: RequestContext) -> None:
        metrics = ctx.shared.get("metrics")
        if not isinstance(metrics, SharedMetrics):
            metrics = shared_metrics()
        metrics.add_many(metrics_for(ctx, time.monotonic() if ctx.started_at < 1e9 else time.time()))
