"""Audit devices: one JSON line per request and per response, every secret string HMAC'd (hmac-sha256:...).

It writes only to the files operators configure; it never writes a token, a key or a secret value in clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import Any

from shipyard.errors import BadRequest

# Fields Vault leaves in clear because they are not secret and operators search by them.
_CLEAR_KEYS = frozenset({"policies", "token_policies", "type", "path", "operation", "mount_type", "version",
                         "key_version", "latest_version", "renewable", "lease_duration", "ttl", "num_uses",
                         "remote_address", "request_id", "namespace", "display_name", "orphan", "keys"})
# Not "id": a token lookup answers with the token itself under "id"; only the request's own id stays in clear.


class FileAuditDevice:
    def __init__(self, path: str, file_path: str, salt: bytes, options: dict[str, str]) -> None:
        self.path = path
        self.file_path = file_path
        self.salt = salt
        self.options = options
        self.log_raw = False  # Vault's log_raw is refused: clear secrets on disk are what this exists to avoid

    def hash(self, value: str) -> str:
        return "hmac-sha256:" + hmac.new(self.salt, value.encode(), hashlib.sha256).hexdigest()

    def redact(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self.redact(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v, key) for v in value]
        if isinstance(value, str) and key not in _CLEAR_KEYS:
            return self.hash(value)
        if isinstance(value, bool | int | float) or value is None or key in _CLEAR_KEYS:
            return value
        return self.hash(str(value))

    async def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        await asyncio.to_thread(self._append, line.encode())

    def _append(self, line: bytes) -> None:
        fd = os.open(self.file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def file_device(path: str, options: dict[str, Any], salt: bytes) -> FileAuditDevice:
    file_path = str(options.get("file_path") or options.get("path") or "")
    if not file_path or file_path in ("stdout", "discard"):
        raise BadRequest("file_path is required (a file; stdout and discard are not supported)")
    if str(options.get("log_raw", "false")).lower() == "true":
        raise BadRequest("log_raw is not supported: audit logs never hold secrets in clear")
    if not os.path.isabs(file_path):
        raise BadRequest("file_path must be absolute")
    device = FileAuditDevice(path, file_path, salt, {k: str(v) for k, v in options.items()})
    device._append(b"")  # fails now (400) if the file cannot be opened, not at the first request
    return device


def entry(kind: str, device: FileAuditDevice, auth: dict[str, Any] | None, request: dict[str, Any],
          response: dict[str, Any] | None = None, error: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "type": kind,
                           "auth": device.redact(auth or {}), "request": device.redact(request)}
    if "id" in request:
        out["request"]["id"] = request["id"]  # the request's own id (a UUID), to pair request and response lines
    if kind == "response":
        out["response"] = device.redact(response or {})
    if error:
        out["error"] = error
    return out
