"""Kong's `certificates` and `snis` entities on the gateway admin API (/api/gateway/certificates, /snis, and
/certificates/{certificate}/snis): the certificates the gateway's TLS port serves, picked by SNI.

Checks that a certificate and its key are PEM and belong together before anything is stored; it never returns
key material (the key is shown as "<redacted>") and never writes outside gateway/certificates and gateway/snis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shipyard.api.native.gateway_api import (
    PREFIX,
    NotFoundError,
    _decode,
    _json,
    find,
    kong_errors,
    list_records,
    page,
    read_body,
    store_of,
)
from shipyard.gateway.entities import Fields, Kind, SchemaError, UniqueViolation, dumps, new_id, stamp
from shipyard.store import Compare, Delete, KeyValue, Put

routes = web.RouteTableDef()
CERTIFICATES = Kind("certificates", "gateway/certificates/", "id", ())
SNIS = Kind("snis", "gateway/snis/", "name", ())
REDACTED = "<redacted>"
# A host name, "*.host" (leftmost wildcard), or "*" (the default certificate of the TLS port).
SNI_RE = re.compile(r"^(\*|(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)$")


def _check_pair(f: Fields, cert: str | None, key: str | None) -> None:
    """The certificate (chain) parses, the key parses, and the key is the leaf certificate's."""
    if not cert or not key:
        return
    try:
        leaf = x509.load_pem_x509_certificates(cert.encode())[0]
    except ValueError:
        f.errors["cert"] = "invalid certificate: not a PEM certificate"
        return
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError):
        f.errors["key"] = "invalid key: not an unencrypted PEM private key"
        return
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.PEM, spki) != leaf.public_key().public_bytes(
            serialization.Encoding.PEM, spki):
        f.errors["@entity"] = "certificate does not match key"


def normalize_certificate(body: Mapping[str, Any], existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    f = Fields(body, {"id", "cert", "key", "snis", "tags"})
    key = f.string("key")
    if key == REDACTED and existing is not None:  # a record read back and sent again keeps its key
        key = str(existing.get("key"))
    record: dict[str, Any] = {"id": f.string("id") or "", "cert": f.string("cert", required=True),
                              "key": key, "tags": f.strings("tags")}
    if key is None:
        f.errors["key"] = "required field missing"
    _check_pair(f, record["cert"], key)
    snis = [s.lower() for s in f.strings("snis")]
    for name in snis:
        if not SNI_RE.match(name):
            f.errors["snis"] = f"invalid SNI name: {name[:64]}"
    f.check()
    record["snis"] = snis
    return record


def normalize_sni(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "name", "certificate", "tags"})
    name = (f.string("name", required=True) or "").lower()
    if name and not SNI_RE.match(name):
        f.errors["name"] = f"invalid SNI name: {name[:64]}"
    certificate = f.get("certificate", required=True)
    cert_id = certificate.get("id") if isinstance(certificate, Mapping) else certificate
    if certificate is not None and not isinstance(cert_id, str):
        f.errors["certificate"] = "expected a record with an id"
    f.check()
    return {"id": f.string("id") or "", "name": name, "certificate": {"id": cert_id}, "tags": f.strings("tags")}


def shown(record: Mapping[str, Any], snis: list[str]) -> dict[str, Any]:
    """A certificate as the admin API shows it: the key redacted, its SNI names listed (as Kong lists them)."""
    return {**{k: v for k, v in record.items() if k != "snis"}, "key": REDACTED, "snis": sorted(snis)}


async def _snis_of(store: Any, cert_id: str) -> list[tuple[KeyValue, dict[str, Any]]]:
    result = await store.range(SNIS.prefix, prefix=True)
    out = []
    for kv in result.kvs:
        sni = _decode(kv)
        if (sni.get("certificate") or {}).get("id") == cert_id:
            out.append((kv, sni))
    return out


def _replace_snis(current: list[tuple[KeyValue, dict[str, Any]]], names: list[str], cert_id: str,
                  compares: list[Any], ops: list[Any]) -> None:
    """Adds to a txn what makes the certificate's SNIs exactly `names`: a new name must be free, a dropped one
    must not have changed meanwhile."""
    held = {sni["name"] for _, sni in current}
    for kv, sni in current:
        if sni["name"] not in names:
            ops.append(Delete(kv.key))
            compares.append(Compare(kv.key, "mod", "=", kv.mod_revision))
    for name in names:
        if name not in held:
            sni = stamp({"id": new_id(), "name": name, "certificate": {"id": cert_id}, "tags": []})
            ops.append(Put(SNIS.key(sni), dumps(sni)))
            compares.append(Compare(SNIS.key(sni), "version", "=", 0))


async def _write_certificate(store: Any, record: dict[str, Any], previous: tuple[KeyValue, dict[str, Any]] | None,
                             names: list[str] | None) -> dict[str, Any]:
    """One txn: the certificate, and (when `names` is given) its SNI set replaced; a name another certificate holds
    is Kong's 409."""
    old_kv, old = previous if previous is not None else (None, None)
    record["id"] = (old or {}).get("id") or record.get("id") or new_id()
    stamp(record, old)
    key = CERTIFICATES.key(record)
    compares = [Compare(key, "mod", "=", old_kv.mod_revision) if old_kv else Compare(key, "version", "=", 0)]
    ops: list[Any] = [Put(key, dumps({k: v for k, v in record.items() if k != "snis"}))]
    current = await _snis_of(store, record["id"]) if old_kv else []
    kept = [sni["name"] for _, sni in current]
    if names is not None:
        _replace_snis(current, names, record["id"], compares, ops)
        kept = list(names)
    result = await store.txn(compares, ops, [])
    if not result.succeeded:
        for name in names or []:
            kv = await store.get(SNIS.key({"name": name}))
            if kv is not None and (_decode(kv).get("certificate") or {}).get("id") != record["id"]:
                raise UniqueViolation({"snis": name})
        raise UniqueViolation({"id": record["id"]})
    return shown(record, kept)


async def _find_certificate(request: web.Request) -> tuple[KeyValue, dict[str, Any]]:
    """By id, or by one of its SNI names (Kong accepts either in the URL)."""
    store, ident = store_of(request), request.match_info["certificate"]
    try:
        return await find(store, CERTIFICATES, ident)
    except NotFoundError:
        sni = await store.get(SNIS.key({"name": ident.lower()}))
        if sni is None:
            raise
        return await find(store, CERTIFICATES, str((_decode(sni).get("certificate") or {}).get("id")))


@routes.get(PREFIX + "/certificates")
@kong_errors
async def list_certificates(request: web.Request) -> web.Response:
    store = store_of(request)
    names: dict[str, list[str]] = {}
    for sni in await list_records(store, SNIS):
        names.setdefault(str((sni.get("certificate") or {}).get("id")), []).append(sni["name"])
    return page([shown(c, names.get(c["id"], [])) for c in await list_records(store, CERTIFICATES)], request)


@routes.post(PREFIX + "/certificates")
@kong_errors
async def create_certificate(request: web.Request) -> web.Response:
    record = normalize_certificate(await read_body(request))
    return _json(await _write_certificate(store_of(request), record, None, record["snis"]), 201)


@routes.get(PREFIX + "/certificates/{certificate}")
@kong_errors
async def get_certificate(request: web.Request) -> web.Response:
    _, record = await _find_certificate(request)
    return _json(shown(record, [s["name"] for _, s in await _snis_of(store_of(request), record["id"])]))


@routes.patch(PREFIX + "/certificates/{certificate}")
@kong_errors
async def patch_certificate(request: web.Request) -> web.Response:
    body = await read_body(request)
    kv, old = await _find_certificate(request)
    merged = {**{k: v for k, v in old.items() if k not in ("created_at", "updated_at")}, **body}
    record = normalize_certificate(merged, old)
    return _json(await _write_certificate(store_of(request), record, (kv, old),
                                          record["snis"] if "snis" in body else None))


@routes.delete(PREFIX + "/certificates/{certificate}")
@kong_errors
async def delete_certificate(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, record = await _find_certificate(request)
    except NotFoundError:
        return web.Response(status=204)
    ops: list[Any] = [Delete(kv.key), *(Delete(skv.key) for skv, _ in await _snis_of(store, record["id"]))]
    await store.txn([Compare(kv.key, "mod", "=", kv.mod_revision)], ops, [])
    return web.Response(status=204)


async def _create_sni(request: web.Request, body: dict[str, Any]) -> web.Response:
    store = store_of(request)
    record = normalize_sni(body)
    try:
        _, cert = await find(store, CERTIFICATES, str(record["certificate"]["id"]))
    except NotFoundError:
        raise SchemaError({"certificate": f"the foreign key '{record['certificate']['id']}' does not reference an "
                                          "existing 'certificates' entity."}) from None
    record["certificate"] = {"id": cert["id"]}
    record["id"] = record["id"] or new_id()
    stamp(record)
    key = SNIS.key(record)
    result = await store.txn([Compare(key, "version", "=", 0)], [Put(key, dumps(record))], [])
    if not result.succeeded:
        raise UniqueViolation({"name": record["name"]})
    return _json(record, 201)


@routes.get(PREFIX + "/snis")
@kong_errors
async def list_snis(request: web.Request) -> web.Response:
    return page(await list_records(store_of(request), SNIS), request)


@routes.post(PREFIX + "/snis")
@kong_errors
async def create_sni(request: web.Request) -> web.Response:
    return await _create_sni(request, await read_body(request))


@routes.get(PREFIX + "/certificates/{certificate}/snis")
@kong_errors
async def list_certificate_snis(request: web.Request) -> web.Response:
    _, cert = await _find_certificate(request)
    return page([sni for _, sni in await _snis_of(store_of(request), cert["id"])], request)


@routes.post(PREFIX + "/certificates/{certificate}/snis")
@kong_errors
async def create_certificate_sni(request: web.Request) -> web.Response:
    _, cert = await _find_certificate(request)
    return await _create_sni(request, {**await read_body(request), "certificate": {"id": cert["id"]}})


@routes.get(PREFIX + "/snis/{sni}")
@kong_errors
async def get_sni(request: web.Request) -> web.Response:
    _, record = await find(store_of(request), SNIS, request.match_info["sni"].lower())
    return _json(record)


@routes.patch(PREFIX + "/snis/{sni}")
@kong_errors
async def patch_sni(request: web.Request) -> web.Response:
    """Moves an SNI to another certificate (its name is its key: renaming is delete and create)."""
    store = store_of(request)
    kv, old = await find(store, SNIS, request.match_info["sni"].lower())
    body = await read_body(request)
    record = normalize_sni({**{k: v for k, v in old.items() if k not in ("created_at", "updated_at")}, **body})
    if record["name"] != old["name"]:
        raise SchemaError({"name": "cannot be changed (delete the SNI and create one)"})
    try:
        await find(store, CERTIFICATES, str(record["certificate"]["id"]))
    except NotFoundError:
        raise SchemaError({"certificate": "does not reference an existing 'certificates' entity."}) from None
    stamp(record, old)
    result = await store.txn([Compare(kv.key, "mod", "=", kv.mod_revision)], [Put(kv.key, dumps(record))], [])
    if not result.succeeded:
        raise SchemaError({"@entity": "the SNI changed while it was being updated; try again"})
    return _json(record)


@routes.delete(PREFIX + "/snis/{sni}")
@kong_errors
async def delete_sni(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        kv, _ = await find(store, SNIS, request.match_info["sni"].lower())
    except NotFoundError:
        return web.Response(status=204)
    await store.txn([], [Delete(kv.key)], [])
    return web.Response(status=204)
