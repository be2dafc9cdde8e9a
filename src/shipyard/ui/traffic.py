"""The gateway traffic history behind the console's per-route charts: samples of the prometheus plugin's counters
taken every few seconds into a bounded ring buffer, turned into per-interval rate, error rate and latency
percentiles, and drawn as inline SVG sparklines on the server.

The only state the console keeps, and it is bounded (SAMPLES samples of at most MAX_ROUTES routes) and for display
only: losing it (a restart) loses the charts' past, nothing else. It never writes the store and never blocks the
event loop (the metrics file is read in a thread).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from markupsafe import Markup, escape

from shipyard.api.context import PLATFORM
from shipyard.gateway.plugins.prometheus import LATENCY, REQUESTS
from shipyard.gateway.supervisor import GatewaySupervisor
from shipyard.tasks import cancel_and_wait

log = logging.getLogger("shipyard.ui.traffic")

INTERVAL = 5.0  # seconds between samples: a chart point is one interval
SAMPLES = 61  # 60 intervals: the last 5 minutes, one point per 2 px of a chart
MAX_ROUTES = 50  # routes kept per sample (the busiest): memory stays under ~2 MB whatever the route count
CHARTED_ROUTES = 12  # rows of charts on the page (the busiest over the window): keeps each live update small
RouteKey = tuple[str, str]  # (service, route)
_SERIES = re.compile(r"(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Counts:
    """One route's cumulative counters at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (s) -> cumulative count


def route_counts(text: str) -> dict[RouteKey, Counts]:
    """Per (service, route): requests, 5xx and latency buckets summed over the other labels (status, consumer)."""
    out: dict[RouteKey, Counts] = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match is None or not match.group(1).startswith((REQUESTS, LATENCY + "_bucket")):
            continue
        name, value = match.group(1), float(match.group(3))
        labels = dict(_LABEL.findall(match.group(2)))
        counts = out.setdefault((labels.get("service", ""), labels.get("route", "")), Counts())
        if name == REQUESTS:
            counts.requests += value
            counts.errors += value if labels.get("status_class") == "5xx" else 0.0
        elif name == LATENCY + "_bucket":
            bound = float(labels.get("le", "inf").replace("+Inf", "inf"))
            counts.buckets[bound] = counts.buckets.get(bound, 0.0) + value
    if len(out) > MAX_ROUTES:
        out = dict(sorted(out.items(), key=lambda kv: -kv[1].requests)[:MAX_ROUTES])
    return out


def quantile_ms(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the q-quantile; the last finite bound when it is in +Inf."""
    if count <= 0:
        return None
    finite = 0.0
    for bound, cumulative in buckets:
        if math.isinf(bound):
            return finite * 1000
        if cumulative >= q * count:
            return bound * 1000
        finite = bound
    return finite * 1000


@dataclass
class Point:
    """One interval of one route."""

    at: float
    rate: float  # requests per second
    error_pct: float | None  # None when there was no request
    p50: float | None
    p95: float | None
    p99: float | None


def _delta(new: Counts, old: Counts | None) -> Counts:
    """What happened between two samples; counters that went down were reset (a gateway restart): all of the new
    ones are then the interval's."""
    if old is None or new.requests < old.requests:
        return new
    buckets = {b: max(0.0, v - old.buckets.get(b, 0.0)) for b, v in new.buckets.items()}
    return Counts(new.requests - old.requests, max(0.0, new.errors - old.errors), buckets)


def interval_point(at: float, seconds: float, delta: Counts) -> Point:
    buckets = sorted(delta.buckets.items())
    count = buckets[-1][1] if buckets else delta.requests
    return Point(at, delta.requests / seconds if seconds > 0 else 0.0,
                 100 * delta.errors / delta.requests if delta.requests else None,
                 quantile_ms(buckets, count, 0.5), quantile_ms(buckets, count, 0.95),
                 quantile_ms(buckets, count, 0.99))


class TrafficHistory:
    """A ring buffer of (time, per-route counters): SAMPLES deep, so memory stays bounded however long it runs."""

    def __init__(self, samples: int = SAMPLES) -> None:
        self.samples: deque[tuple[float, dict[RouteKey, Counts]]] = deque(maxlen=samples)
        self.task: asyncio.Task[None] | None = None  # the sampler filling it (traffic.add_traffic_sampler)

    def add(self, at: float, counts: dict[RouteKey, Counts]) -> None:
        self.samples.append((at, counts))

    def routes(self) -> list[RouteKey]:
        return sorted(self.samples[-1][1]) if self.samples else []

    def points(self, key: RouteKey) -> list[Point]:
        out = []
        pairs = list(self.samples)  # a copy: the sampler may append while a view reads
        for (t0, before), (t1, after) in itertools.pairwise(pairs):
            now = after.get(key)
            if now is not None:
                out.append(interval_point(t1, t1 - t0, _delta(now, before.get(key))))
        return out


# ---- drawing -------------------------------------------------------------------------------------------------

WIDTH, HEIGHT, PAD = 120, 28, 2


def _polyline(values: list[float | None], top: float, slots: int) -> str:
    """Points of one series scaled into the box; a gap (None) breaks the line into separate runs."""
    step = (WIDTH - 2 * PAD) / max(1, slots - 1)
    offset = slots - len(values)  # the newest point at the right edge, however few there are yet
    runs: list[list[str]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            runs.append([])
            continue
        x = PAD + (offset + i) * step
        y = HEIGHT - PAD - (value / top if top > 0 else 0) * (HEIGHT - 2 * PAD)
        runs[-1].append(f"{x:.0f},{y:.0f}")  # whole pixels: a third of the bytes, the same picture
    return "".join(f'<polyline class="{{cls}}" points="{" ".join(run)}"/>' for run in runs if run)


def sparkline(series: dict[str, list[float | None]], label: str, slots: int = SAMPLES - 1) -> Markup:
    """An inline SVG chart of one or more series sharing a scale (their class names style them), with a text
    alternative for screen readers."""
    top = max([v for values in series.values() for v in values if v is not None], default=0.0)
    body = "".join(_polyline(values, top, slots).replace("{cls}", str(escape(cls))) for cls, values in series.items())
    return Markup(f'<svg class="spark" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
                  f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>{body}</svg>')


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


def route_charts(history: TrafficHistory) -> list[dict[str, Any]]:
    """One row per route seen in the last sample (the CHARTED_ROUTES busiest over the window): its charts and its
    latest interval's figures."""
    rows = []
    charted = [(key, points) for key in history.routes() if (points := history.points(key))]
    charted.sort(key=lambda pair: -sum(p.rate for p in pair[1]))
    for (service, route), points in sorted(charted[:CHARTED_ROUTES]):
        last = points[-1]
        name = route or service
        rows.append({
            "service": service, "route": route, "rate": _fmt(last.rate, "req/s"),
            "error_pct": _fmt(last.error_pct, "%"), "p50": _fmt(last.p50, "ms"), "p95": _fmt(last.p95, "ms"),
            "p99": _fmt(last.p99, "ms"),
            "rate_chart": sparkline({"rate": [p.rate for p in points]}, f"{name}: requests per second"),
            "error_chart": sparkline({"errors": [p.error_pct for p in points]}, f"{name}: 5xx share"),
            "latency_chart": sparkline({"p50": [p.p50 for p in points], "p95": [p.p95 for p in points],
                                        "p99": [p.p99 for p in points]}, f"{name}: latency p50, p95, p99"),
        })
    return rows


# ---- the sampler ---------------------------------------------------------------------------------------------

HISTORY: web.AppKey[TrafficHistory] = web.AppKey("ui_traffic_history", TrafficHistory)


def _metrics_reader(app: web.Application) -> Callable[[], str] | None:
    gateway = app[PLATFORM].extras.get("gateway")
    return gateway.metrics_text if isinstance(gateway, GatewaySupervisor) else None


async def sample_forever(history: TrafficHistory, reader: Callable[[], Callable[[], str] | None],
                         interval: float = INTERVAL) -> None:
    """Every interval: the node's metrics into the ring buffer. The gateway is looked up each time, because the
    server attaches it after the app has started (and a server without one just never samples)."""
    while True:
        read_text = reader()
        if read_text is not None:
            try:
                history.add(time.time(), route_counts(await asyncio.to_thread(read_text)))
            except Exception:  # a metrics file being recreated: the next sample will do (the charts show a gap)
                log.debug("traffic sample failed", exc_info=True)
        await asyncio.sleep(interval)


async def _start_sampler(app: web.Application) -> None:
    history = app[HISTORY]
    history.task = asyncio.get_running_loop().create_task(sample_forever(history, lambda: _metrics_reader(app)))


async def _stop_sampler(app: web.Application) -> None:
    await cancel_and_wait(app[HISTORY].task)


def add_traffic_sampler(app: web.Application) -> None:
    """Samples while the server runs."""
    app[HISTORY] = TrafficHistory()
    app.on_startup.append(_start_sampler)
    app.on_cleanup.append(_stop_sampler)
