"""Consul's `acl.enable_token_persistence`: tokens set through `PUT /v1/agent/token/<kind>` survive a restart of a real
server (kept in `<data dir>/acl-tokens.json`, 0600, and winning over the config file's tokens) when it is true, and
are gone after one when it is false; the file's reading and writing on their own."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from shipyard.acl.token_file import TOKENS_FILE, TokenFileError, canonical_kind, read_tokens, write_tokens
from shipyard.api.context import ServerConfig
from shipyard.cli.consul_config import apply_config_files
from support import ServerProcess

MANAGEMENT = str(uuid.uuid4())


def _write_config(path: Path, persistence: bool, default_token: str = "") -> None:
    tokens = {"initial_management": MANAGEMENT, **({"default": default_token} if default_token else {})}
    path.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny",
                                        "enable_token_persistence": persistence, "tokens": tokens}}))


def _anonymous_kv_status(server: ServerProcess) -> int:
    """GET of a missing key without a token: 404 when the default token may read keys, 403 otherwise."""
    return requests.get(f"{server.url}/v1/kv/persisted/x", timeout=10).status_code


def _token(server: ServerProcess, rules: str) -> str:
    headers = {"X-Consul-Token": MANAGEMENT}
    policy = requests.put(f"{server.url}/v1/acl/policy", headers=headers, timeout=10,
                          json={"Name": f"p-{uuid.uuid4().hex[:6]}", "Rules": rules})
    assert policy.status_code == 200, policy.text
    token = requests.put(f"{server.url}/v1/acl/token", headers=headers, timeout=10,
                         json={"Policies": [{"ID": policy.json()["ID"]}]})
    assert token.status_code == 200, token.text
    return str(token.json()["SecretID"])


def _set_default_token(server: ServerProcess, secret: str, kind: str = "default") -> None:
    answer = requests.put(f"{server.url}/v1/agent/token/{kind}", json={"Token": secret},
                          headers={"X-Consul-Token": MANAGEMENT}, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("persistence", [True, False], ids=["persisted", "in-memory"])
def test_agent_tokens_survive_a_restart_only_with_token_persistence(tmp_path: Path, persistence: bool) -> None:
    config = tmp_path / "consul.json"
    _write_config(config, persistence)
    server = ServerProcess(tmp_path / "data", "--config-file", str(config), "--no-gateway", "--vault-port", "0")
    server.start()
    try:
        assert _anonymous_kv_status(server) == 403  # the anonymous token: default deny
        reader = _token(server, 'key_prefix "" { policy = "read" }')
        _set_default_token(server, reader, kind="acl_token")  # Consul's legacy name of the default token
        assert _anonymous_kv_status(server) == 404
        saved = server.data_dir / TOKENS_FILE
        if persistence:
            assert saved.stat().st_mode & 0o777 == 0o600
            assert json.loads(saved.read_text()) == {"default": reader}  # Consul's file: the API's tokens only
        else:
            assert not saved.exists()
        # Restarted with a default token in the config (one that may read nothing): a persisted token wins over
        # it, as in Consul, with a warning; without persistence the config's is the one.
        _write_config(config, persistence, default_token=_token(server, 'key_prefix "" { policy = "deny" }'))
        server.restart()
        assert _anonymous_kv_status(server) == (404 if persistence else 403)
        warned = "token present in both the configuration and persisted token store" in server.log_tail()
        assert warned == persistence
        assert reader not in server.log_tail()
    finally:
        server.stop()


def test_token_file_round_trip_kinds_and_bad_files(tmp_path: Path) -> None:
    write_tokens(str(tmp_path), {"default": "d", "dns": "n", "agent": ""})
    assert (tmp_path / TOKENS_FILE).stat().st_mode & 0o777 == 0o600
    assert read_tokens(str(tmp_path)) == {"default": "d", "dns": "n"}
    assert not [p for p in tmp_path.iterdir() if p.name != TOKENS_FILE]  # no temporary file left behind
    (tmp_path / TOKENS_FILE).write_text('{"agent_master": "m", "unknown": "u"}')  # Consul before 1.11
    assert read_tokens(str(tmp_path)) == {"agent_recovery": "m"}
    (tmp_path / TOKENS_FILE).write_text("{not json")
    with pytest.raises(TokenFileError) as info:
        read_tokens(str(tmp_path))
    assert TOKENS_FILE in info.value.message and "not json" not in info.value.message
    assert read_tokens(str(tmp_path / "absent")) == {}
    assert (canonical_kind("acl_agent_token"), canonical_kind("dns"), canonical_kind("master")) == ("agent", "dns",
                                                                                                     None)


def test_config_file_tokens_include_the_dns_token(tmp_path: Path) -> None:
    path = tmp_path / "consul.hcl"
    path.write_text('acl {\n  enable_token_persistence = true\n  tokens {\n    dns = "d-1"\n  }\n}\n')
    config = ServerConfig(data_dir=None)
    apply_config_files(config, [path], set())
    assert (config.acl_dns_token, config.acl_token_persistence) == ("d-1", True)
