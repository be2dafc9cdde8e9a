"""What the console's Gateway page shows beyond routes, services, consumers and plugins: the TLS certificates the
gateway serves (Kong's `certificates` and their `snis`) and the per-route traffic charts (ui/traffic.py).

It reads the certificate records from the store and parses only their public certificate; it never passes a
private key (or anything but the fields listed in certificate_row) to a template, and never writes.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from shipyard.acl import Authorizer
from shipyard.api.context import Platform, platform_of
from shipyard.api.native.gateway_tls_api import CERTIFICATES, SNIS
from shipyard.ui.traffic import HISTORY, route_charts
from shipyard.ui.views import can

EXPIRING_DAYS = 30  # highlighted from this many days before expiry (Let's Encrypt renews at 30 days left)


@functools.lru_cache(maxsize=256)  # bounded; the live view re-renders every few seconds, certificates rarely change
def parse_certificate(pem: str) -> dict[str, Any]:
    """Subject, issuer, SANs and validity of the leaf (first) certificate of a PEM chain; the key is not here."""
    try:
        leaf = x509.load_pem_x509_certificates(pem.encode())[0]
    except (ValueError, IndexError):
        return {"error": "not a readable PEM certificate"}
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in sans.get_values_for_type(x509.DNSName)] + [
            str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    common = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {"error": "", "subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
            "common_name": str(common[0].value) if common else "", "sans": names,
            "not_before": leaf.not_valid_before_utc, "not_after": leaf.not_valid_after_utc,
            "self_signed": leaf.issuer == leaf.subject}


def certificate_row(record: dict[str, Any], snis: list[str], now: dt.datetime) -> dict[str, Any]:
    """What the page shows of one certificate record: never its `key`."""
    parsed = parse_certificate(str(record.get("cert") or ""))
    row: dict[str, Any] = {"id": str(record.get("id") or ""), "snis": sorted(snis),
                           "tags": list(record.get("tags") or []), "error": parsed["error"], "subject": "",
                           "issuer": "", "sans": [], "expires": "", "days_left": None, "state": "bad"}
    if parsed["error"]:
        return row
    days = (parsed["not_after"] - now).total_seconds() / 86400  # whole days are counted toward zero below
    row.update(subject=parsed["subject"], issuer="self-signed" if parsed["self_signed"] else parsed["issuer"],
               sans=parsed["sans"], expires=parsed["not_after"].strftime("%Y-%m-%d %H:%M UTC"),
               days_left=int(days), state="expired" if days < 0 else "expiring" if days <= EXPIRING_DAYS
               else "valid")
    return row


async def certificates(platform: Platform, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every certificate with its SNIs, soonest to expire first."""
    now = now or dt.datetime.now(dt.UTC)
    by_cert: dict[str, list[str]] = {}
    for kv in (await platform.store.range(SNIS.prefix, prefix=True)).kvs:
        sni = orjson.loads(kv.value)
        cert_id = (sni.get("certificate") or {}).get("id") if isinstance(sni, dict) else None
        if isinstance(cert_id, str):
            by_cert.setdefault(cert_id, []).append(str(sni.get("name") or ""))
    rows = []
    for kv in (await platform.store.range(CERTIFICATES.prefix, prefix=True)).kvs:
        record = orjson.loads(kv.value)
        if isinstance(record, dict):
            rows.append(certificate_row(record, by_cert.get(str(record.get("id") or ""), []), now))
    return sorted(rows, key=lambda r: (r["days_left"] is not None, r["days_left"] or 0, r["id"]))


async def gateway_extras(request: web.Request, auth: Authorizer | None) -> dict[str, Any]:
    """Certificates and traffic charts for the gateway fragment (empty for a token that may not read the gateway,
    whose fragment says so)."""
    if not can(auth, "gateway", ""):
        return {"certificates": [], "charts": [], "expiring_days": EXPIRING_DAYS}
    platform = platform_of(request)
    history = request.app.get(HISTORY)
    return {"certificates": await certificates(platform), "expiring_days": EXPIRING_DAYS,
            "charts": route_charts(history) if history is not None else []}
