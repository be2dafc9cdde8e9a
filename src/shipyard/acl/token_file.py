"""The agent tokens set through `PUT /v1/agent/token/<kind>`, kept as Consul keeps them under
`acl.enable_token_persistence = true`: `<data dir>/acl-tokens.json`, JSON of the kinds set by the API, mode 0600.

It only names the kinds and reads and writes that file (atomically: a crash leaves the old file or the new one, never
half of one); it never decides which token wins, and never logs a token.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping

import orjson

from shipyard.errors import ShipyardError

TOKENS_FILE = "acl-tokens.json"  # Consul's agent/token/persistence.go tokensPath
# Consul's persistedTokens fields: the kinds the file keeps.
PERSISTED_KINDS = ("default", "agent", "agent_recovery", "replication", "config_file_service_registration", "dns")
# /v1/agent/token/<kind>: Consul's legacy names for the same tokens (agent_endpoint.go's AgentToken switch).
LEGACY_KINDS = {"acl_token": "default", "acl_agent_token": "agent", "acl_agent_master_token": "agent_recovery",
                "agent_master": "agent_recovery", "acl_replication_token": "replication"}


class TokenFileError(ShipyardError):
    status = 500


def canonical_kind(kind: str) -> str | None:
    """The token kind a `/v1/agent/token/<kind>` path names; None for a kind Consul does not know."""
    kind = LEGACY_KINDS.get(kind, kind)
    return kind if kind in PERSISTED_KINDS else None


def read_tokens(data_dir: str) -> dict[str, str]:
    """The persisted tokens ({} without a file); TokenFileError (naming the file, never its content) when it cannot
    be read or decoded."""
    path = os.path.join(data_dir, TOKENS_FILE)
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TokenFileError(f"failed reading tokens file {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise TokenFileError(f"failed to decode tokens file {path}: not a JSON object")
    if not data.get("agent_recovery") and isinstance(data.get("agent_master"), str):
        data["agent_recovery"] = data["agent_master"]  # written by Consul before 1.11
    return {kind: value for kind in PERSISTED_KINDS if isinstance(value := data.get(kind), str) and value}


def write_tokens(data_dir: str, tokens: Mapping[str, str]) -> None:
    """Replaces the file with these tokens, readable by the owner only (a temporary file made 0600, fsynced, then
    renamed over it)."""
    body = orjson.dumps({kind: tokens[kind] for kind in PERSISTED_KINDS if tokens.get(kind)})
    path = os.path.join(data_dir, TOKENS_FILE)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{TOKENS_FILE}.", dir=data_dir)  # mkstemp makes it 0600
    except OSError as exc:
        raise TokenFileError(f"Failed to persist tokens - {exc.strerror} ({data_dir})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise TokenFileError(f"Failed to persist tokens - {exc.strerror} ({path})") from None
