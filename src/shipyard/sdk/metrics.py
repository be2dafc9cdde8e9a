"""A tiny in-process metrics registry (counters, gauges, histograms with labels) rendered as Prometheus text.

It owns only numbers in this process and their exposition, plus the standard process_* metrics (the names
prometheus_client's ProcessCollector uses, so existing dashboards work), read from /proc/self when rendered. It
never imports prometheus_client.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import resource
from collections.abc import Iterable

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def _labels(self, key: LabelValues, extra: str = "") -> str:
        parts = [f'{n}="{_escape(v)}"' for n, v in zip(self.label_names, key, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{self._labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {} if self.label_names else {(): 0.0}

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{self._labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Iterable[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label set: counts per bucket (non-cumulative, last slot is +Inf), sum
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = ([0] * (len(self.buckets) + 1), [0.0])
        series[0][bisect.bisect_left(self.buckets, value)] += 1
        series[1][0] += value

    def count(self, **labels: str) -> int:
        series = self.series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        lines = []
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{self._labels(key, le)} {running}")
            lines.append(f"{self.name}_sum{self._labels(key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{self._labels(key)} {running}")
        return lines


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _process_start(starttime_ticks: int) -> float:
    """Boot time + the process's start in ticks since boot: the same for the life of the process, so /proc/stat is
    read once, not per scrape."""
    boot = 0.0
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    boot = float(line.split()[1])
                    break
    except OSError:
        pass
    return round(boot + starttime_ticks / TICKS, 2)


def process_metrics() -> list[str]:
    """process_cpu_seconds_total, process_resident/virtual_memory_bytes, process_start_time_seconds,
    process_open_fds and process_max_fds of this process (Linux /proc); none where /proc is missing."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return []
    # fields[0] is the state (field 3 of proc(5)): utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    start = _process_start(int(fields[19]))
    max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    lines = [
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
        "# TYPE process_cpu_seconds_total counter",
        f"process_cpu_seconds_total {_number(cpu)}",
        "# HELP process_virtual_memory_bytes Virtual memory size in bytes.",
        "# TYPE process_virtual_memory_bytes gauge",
        f"process_virtual_memory_bytes {int(fields[20])}",
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "# TYPE process_resident_memory_bytes gauge",
        f"process_resident_memory_bytes {int(fields[21]) * PAGE}",
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.",
        "# TYPE process_start_time_seconds gauge",
        f"process_start_time_seconds {_number(start)}",
        "# HELP process_open_fds Number of open file descriptors.",
        "# TYPE process_open_fds gauge",
        f"process_open_fds {open_fds - 1}",  # less the one listdir held open
    ]
    if max_fds >= 0:  # RLIM_INFINITY (-1): no limit to report
        lines += ["# HELP process_max_fds Maximum number of open file descriptors.",
                  "# TYPE process_max_fds gauge", f"process_max_fds {max_fds}"]
    return lines


class MetricsRegistry:
    """Named metrics of one process; `render()` is the body of GET /metrics (with the process_* metrics when
    `process` is set, as a Service's registry is)."""

    def __init__(self, process: bool = False) -> None:
        self.metrics: dict[str, Metric] = {}
        self.process = process

    def _add(self, metric: Metric) -> Metric:
        existing = self.metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.label_names != metric.label_names:
                raise ValueError(f"metric {metric.name} already exists with another type or labels")
            return existing
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_text: str, labels: Iterable[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics.values():
            lines += metric.header()
            lines += metric.samples()
        if self.process:
            lines += process_metrics()
        return "\n".join(lines) + "\n"
