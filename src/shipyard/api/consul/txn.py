"""Consul /v1/txn: up to 128 KV operations applied all-or-nothing, with Consul's Results/Errors shapes.

Decodes and validates the body here; the transaction itself is shipyard.registry.kv.ConsulKV.transact.

Limits: only KV operations (no Node/Service/Check ops); delete-tree and get-tree act on what is under
the prefix when the txn commits; an index check (cas, delete-cas, check-index) on a key written earlier
in the same txn fails, its new ModifyIndex being unknown before commit; lock inside a txn ignores
lock-delay, as Consul's does.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from aiohttp import web

from shipyard.api.body import read_limited
from shipyard.api.consul.common import ConsulError, json_response
from shipyard.api.context import platform_of
from shipyard.errors import BadRequest, PayloadTooLarge
from shipyard.registry.kv import MAX_TXN_OPS, MAX_VALUE_SIZE, TxnOp, validate_key

routes = web.RouteTableDef()

MAX_TXN_BODY = 512 * 1024  # Consul's txn_max_req_len default
_TREE_VERBS = frozenset({"delete-tree", "get-tree"})


def _fail(message: str) -> ConsulError:
    return ConsulError(400, f"Failed to parse body: {message}")


def _uint(fields: dict[str, Any], name: str, label: str, where: str) -> int:
    value = fields.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise _fail(f"{where}: {label} must be an unsigned 64-bit integer, got {orjson.dumps(value).decode()}")
    return value


def _str(fields: dict[str, Any], name: str, label: str, where: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(f"{where}: {label} must be a string, got {orjson.dumps(value).decode()}")
    return value


def parse_ops(body: Any) -> list[TxnOp]:
    if not isinstance(body, list):
        raise _fail("expected a JSON array of operations")
    if len(body) > MAX_TXN_OPS:
        raise ConsulError(413, f"Transaction contains too many operations ({len(body)} > {MAX_TXN_OPS})")
    ops: list[TxnOp] = []
    for i, item in enumerate(body):
        where = f"operation {i}"
        if not isinstance(item, dict):
            raise _fail(f"{where}: expected an object")
        outer = {str(k).lower(): v for k, v in item.items()}
        if "kv" not in outer:
            kinds = ", ".join(sorted(item)) or "nothing"
            raise _fail(f"{where}: only KV operations are supported (got {kinds})")
        raw = outer["kv"]
        if not isinstance(raw, dict):
            raise _fail(f"{where}: KV must be an object")
        fields = {str(k).lower(): v for k, v in raw.items()}
        verb = _str(fields, "verb", "Verb", where)
        key = _str(fields, "key", "Key", where)
        value = b""
        encoded = fields.get("value")
        if encoded is not None:
            if not isinstance(encoded, str):
                raise _fail(f"{where}: unexpected value type: {type(encoded).__name__}")
            try:
                value = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _fail(f"{where}: failed to decode value: {exc}") from None
        if len(value) > MAX_VALUE_SIZE:
            raise ConsulError(413, f'Value for key "{key}" is too large ({len(value)} > {MAX_VALUE_SIZE} bytes)')
        try:
            validate_key(key, allow_empty=verb in _TREE_VERBS)
        except BadRequest as exc:
            raise _fail(f"{where}: {exc.message}") from None
        ops.append(
            TxnOp(
                verb, key, value,
                _uint(fields, "flags", "Flags", where),
                _uint(fields, "index", "Index", where),
                _str(fields, "session", "Session", where),
            )
        )
    return ops


@routes.put("/v1/txn")
async def txn_apply(request: web.Request) -> web.Response:
    try:
        body = await read_limited(request, MAX_TXN_BODY)
    except PayloadTooLarge:
        raise ConsulError(413, f"Request body too large, max size: {MAX_TXN_BODY} bytes") from None
    try:
        decoded = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError as exc:
        raise _fail(str(exc)) from None
    if decoded is None:
        raise _fail("EOF")
    ops = parse_ops(decoded)
    outcome = await platform_of(request).kv.transact(ops)
    if outcome.errors:
        errors = [{"OpIndex": i, "What": what} for i, what in outcome.errors]
        return json_response({"Results": None, "Errors": errors}, status=409)
    results = [{"KV": e.to_json()} for e in outcome.results or []]
    return json_response({"Results": results or None, "Errors": None}, index=outcome.revision)
