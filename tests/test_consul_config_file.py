"""`shipyard server --config-file/--config-dir`: Consul agent configuration (JSON and HCL) for the keys Shipyard
uses; flags given on the command line win; unknown keys warn; a wrong type is one line naming the key's path."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from shipyard.api.context import ServerConfig
from shipyard.cli.consul_config import ConfigFileError, apply_config_files, config_files
from support import free_port, wait_until_answering

HCL = '''
datacenter = "east"
node_name  = "box-1"
enable_script_checks = true
acl {
  enabled        = true
  default_policy = "deny"
  tokens {
    initial_management = "%s"
  }
}
ports {
  http  = %d
  dns   = -1
  https = 9501
}
tls {
  defaults {
    ca_file         = "/etc/ca.pem"
    verify_incoming = true
  }
}
'''


def test_hcl_and_json_files_fill_the_server_config_and_flags_win(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    token = str(uuid.uuid4())
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-base.hcl").write_text(HCL % (token, 8600))
    (tmp_path / "conf.d" / "20-more.json").write_text('{"acl": {"tokens": {"default": "d"}}, "ui_config": {}}')
    config = ServerConfig(data_dir=str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING):
        apply_config_files(config, config_files([], [str(tmp_path / "conf.d")]), {"datacenter"})
    assert (config.acl, config.acl_default_policy, config.acl_initial_management) == (True, "deny", token)
    assert config.acl_default_token == "d" and config.enable_script_checks
    assert (config.http_port, config.dns_port, config.tls.https_port) == (8600, 0, 9501)
    assert (config.tls.ca_file, config.tls.verify_incoming) == ("/etc/ca.pem", True)
    assert config.node_name == "box-1" and config.datacenter == "dc1"  # --datacenter was given: it wins
    assert "ui_config is not a key Shipyard uses" in caplog.text


@pytest.mark.parametrize(("text", "words"), [
    ('acl { enabled = "yes" }', "acl.enabled: expected true or false"),
    ('ports { http = "80" }', "ports.http: expected a port number"),
    ('acl { default_policy = "maybe" }', 'acl.default_policy: expected "allow" or "deny"'),
    ('acl = "on"', "acl: expected an object"),
    ('acl {\n  enabled = \n}', "Line 3"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "consul.hcl"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        apply_config_files(ServerConfig(data_dir=None), [path], set())
    assert words in info.value.message and str(path) in info.value.message


def test_server_with_a_consul_config_file_enforces_its_acls(tmp_path: Path) -> None:
    token, http_port = str(uuid.uuid4()), free_port()
    path = tmp_path / "consul.hcl"
    path.write_text(HCL.replace("tls {", "unused_tls {") % (token, http_port))
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "shipyard.cli.main", "server", "--data-dir", str(tmp_path / "data"),
           "--config-file", str(path), "--no-gateway", "--vault-port", "0"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_until_answering(proc, url + "/v1/status/leader", (200,), "server", log, 30)
        assert requests.get(url + "/v1/kv/x", timeout=5).status_code == 403
        assert requests.get(url + "/v1/kv/x", headers={"X-Consul-Token": token}, timeout=5).status_code == 404
        assert requests.get(url + "/v1/agent/self", headers={"X-Consul-Token": token},
                            timeout=5).json()["Config"]["Datacenter"] == "east"
        assert "unused_tls is not a key Shipyard uses" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


def test_wrong_type_in_a_config_file_is_one_line_at_start(tmp_path: Path) -> None:
    path = tmp_path / "consul.json"
    path.write_text('{"acl": {"enabled": "yes"}}')
    done = subprocess.run([sys.executable, "-m", "shipyard.cli.main", "server", "--dev", "--config-file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: config file {path}: acl.enabled: expected true or false, "
                                                'got "yes"']
