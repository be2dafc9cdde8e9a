"""The console's pure helpers: how a KV value is shown by its content, and latency percentiles from histogram
buckets (the gateway view)."""

from __future__ import annotations

import pytest

from shipyard.ui.views import _percentile, render_value


@pytest.mark.parametrize(("raw", "kind", "shown"), [
    (b'{"a":1,"b":[true]}', "json", '{\n  "a": 1,\n  "b": [\n    true\n  ]\n}'),
    (b"db:\n  host: x\n  port: 5432\n", "yaml", "db:\n  host: x\n  port: 5432\n"),
    (b"plain words: not yaml on one line", "text", "plain words: not yaml on one line"),
    (b"{not json", "text", "{not json"),
    (b"\xff\xfe\x00", "binary", "<3 bytes of binary data>"),
])
def test_values_are_shown_by_their_content(raw: bytes, kind: str, shown: str) -> None:
    assert render_value(raw) == (kind, shown)


def test_percentiles_are_the_bounds_of_the_buckets_that_hold_them() -> None:
    buckets = [(0.01, 50.0), (0.05, 90.0), (0.1, 99.0), (float("inf"), 100.0)]
    assert _percentile(buckets, 100, 0.5) == "≤ 10 ms"
    assert _percentile(buckets, 100, 0.95) == "≤ 100 ms"
    assert _percentile(buckets, 100, 0.995) == "> 100 ms"
