"""The console's pure helpers behind the gateway charts, the certificates table and the Secrets page's mount list:
samples into per-interval points (resets, percentiles, a bounded buffer), sparklines, certificate rows, which KV
mounts a Vault token's policies reach."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shipyard.gateway.plugins.prometheus import LATENCY, REQUESTS
from shipyard.secrets.policy import ACL, parse_policy
from shipyard.ui.gateway_views import certificate_row
from shipyard.ui.secrets_views import mount_visible
from shipyard.ui.traffic import Counts, TrafficHistory, route_charts, route_counts, sparkline


def _exposition(ok: int, errors: int, fast: int) -> str:
    """The prometheus plugin's text for one route: `fast` requests under 10 ms, the others under 100 ms."""
    total = ok + errors
    labels = 'service="svc",route="r1"'
    return "\n".join([
        f'{REQUESTS}{{{labels},status_class="2xx",consumer=""}} {ok}',
        f'{REQUESTS}{{{labels},status_class="5xx",consumer=""}} {errors}',
        f'{LATENCY}_bucket{{{labels},le="0.01"}} {fast}',
        f'{LATENCY}_bucket{{{labels},le="0.1"}} {total}',
        f'{LATENCY}_bucket{{{labels},le="+Inf"}} {total}',
        "shipyard_gateway_workers 1",
    ])


def test_counters_become_per_interval_rate_errors_and_percentiles() -> None:
    history = TrafficHistory()
    history.add(95.0, {})  # before the route's first request
    history.add(100.0, route_counts(_exposition(ok=10, errors=0, fast=10)))
    history.add(105.0, route_counts(_exposition(ok=30, errors=10, fast=20)))  # +30 requests in 5 s, 10 of them 5xx
    history.add(110.0, route_counts(_exposition(ok=3, errors=0, fast=0)))  # counters went down: a gateway restart
    first, second, third = history.points(("svc", "r1"))
    assert first.rate == 2.0 and first.error_pct == 0 and first.p50 == 10  # the route's first sample: all of it
    assert second.rate == 6.0 and round(second.error_pct or 0, 1) == 33.3
    assert second.p50 == 100 and second.p99 == 100  # 10 of the 30 new ones were fast: the median is not
    assert third.rate == 0.6 and third.p50 == 100  # after a reset the new counters are the interval's own


def test_the_history_is_a_bounded_ring_buffer() -> None:
    history = TrafficHistory(samples=4)
    for i in range(10):
        history.add(float(i), {("s", "r"): Counts(requests=float(i))})
    assert len(history.samples) == 4 and [t for t, _ in history.samples] == [6.0, 7.0, 8.0, 9.0]
    assert len(history.points(("s", "r"))) == 3


def test_sparklines_are_inline_svg_with_gaps_and_a_text_alternative() -> None:
    svg = str(sparkline({"errors": [1.0, None, 3.0, 2.0]}, 'route "<x>": errors', slots=4))
    assert svg.startswith('<svg class="spark"') and svg.count("<polyline") == 2  # the gap splits the line
    assert "&lt;x&gt;" in svg and "<x>" not in svg and 'role="img"' in svg
    assert 'points="2,18"' in svg and 'points="79,2 118,10"' in svg  # scaled to the highest value, whole pixels
    assert route_charts(TrafficHistory()) == []


def _cert(days_left: float, cn: str = "a.example.test") -> str:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=500))
            .not_valid_after(now + dt.timedelta(days=days_left))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_certificate_rows_say_days_left_and_never_carry_the_key() -> None:
    now = dt.datetime.now(dt.UTC)
    rows = [certificate_row({"id": str(d), "cert": _cert(d), "key": "SECRET-KEY"}, ["a.example.test"], now)
            for d in (90.5, 5.5, -2.5)]
    assert [(r["state"], r["days_left"]) for r in rows] == [("valid", 90), ("expiring", 5), ("expired", -2)]
    assert rows[0]["sans"] == ["a.example.test"] and rows[0]["subject"] == "CN=a.example.test"
    assert rows[0]["issuer"] == "self-signed"
    assert all("SECRET-KEY" not in str(r) for r in rows)
    broken = certificate_row({"id": "x", "cert": "not pem"}, [], now)
    assert broken["error"] and broken["state"] == "bad"


def test_kv_mounts_shown_to_a_token_are_those_its_policies_reach() -> None:
    acl = ACL([parse_policy("p", 'path "secret/data/app/*" { capabilities = ["read"] }\n'
                                 'path "team/" { capabilities = ["list"] }')])
    assert mount_visible(acl, "secret/") and mount_visible(acl, "team/")
    assert not mount_visible(acl, "kv1/")
    assert mount_visible(ACL([], root=True), "kv1/")
    assert mount_visible(ACL([parse_policy("all", 'path "*" { capabilities = ["list"] }')]), "kv1/")
