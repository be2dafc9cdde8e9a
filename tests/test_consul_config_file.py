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


DNS_HCL = '''
domain     = "sy.internal"
alt_domain = "alt.test"
recursors  = ["127.0.0.1:5353", "[::1]"]
dns_config {
  only_passing     = true
  node_ttl         = "30s"
  service_ttl      = { "web*" = "10s", "db" = "1m" }
  a_record_limit   = 2
  udp_answer_limit = 5
  enable_truncate  = true
  allow_stale      = false
  recursor_timeout = "500ms"
  recursor_strategy = "random"
}
'''


def test_dns_keys_fill_the_dns_config_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "dns.hcl"
    path.write_text(DNS_HCL)
    config = ServerConfig(data_dir=None)
    apply_config_files(config, [path], {"dns_node_ttl"})
    dns = config.dns
    assert (dns.domain, dns.alt_domain) == ("sy.internal.", "alt.test.")
    assert dns.recursors == ["127.0.0.1:5353", "[::1]:53"]
    assert dns.only_passing and dns.enable_truncate and not dns.allow_stale
    assert dns.node_ttl == 0.0  # --dns-node-ttl was given: it wins
    assert dns.service_ttl == {"web*": 10.0, "db": 60.0}
    assert (dns.a_record_limit, dns.udp_answer_limit) == (2, 5)
    assert (dns.recursor_timeout, dns.recursor_strategy) == (0.5, "random")


@pytest.mark.parametrize(("text", "words"), [
    ('dns_config { node_ttl = "soon" }', "dns_config.node_ttl: 'soon' is not a duration"),
    ('dns_config { udp_answer_limit = 99 }', "dns_config.udp_answer_limit: expected a whole number from 1 to 8"),
    ('recursors = "1.1.1.1"', "recursors: expected a list"),
    ('dns_config { service_ttl = "5s" }', "dns_config.service_ttl: expected an object"),
    ('dns_config { recursor_strategy = "fastest" }', 'dns_config.recursor_strategy: expected "sequential"'),
])
def test_bad_dns_keys_are_one_line_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "consul.hcl"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        apply_config_files(ServerConfig(data_dir=None), [path], set())
    assert words in info.value.message, info.value.message


def test_a_server_answers_dns_as_its_config_file_says(tmp_path: Path) -> None:
    from dns_support import ask, records, wait_for
    from support import ServerProcess

    path = tmp_path / "dns.json"
    path.write_text('{"domain": "sy.internal", "dns_config": {"service_ttl": {"web": "42s"}}}')
    server = ServerProcess(tmp_path / "data", "--config-file", str(path), "--no-gateway").start()
    try:
        requests.put(f"{server.url}/v1/agent/service/register", json={"Name": "web", "Port": 8080},
                     timeout=10).raise_for_status()
        wait_for(lambda: bool(records(ask(server.dns_port, "web.service.sy.internal", "A").answer)))
        [rrset] = ask(server.dns_port, "web.service.sy.internal", "A").answer
        assert rrset.ttl == 42
    finally:
        server.stop()


def test_reconnect_timeout_from_a_config_file_and_the_flag_wins(tmp_path: Path) -> None:
    path = tmp_path / "consul.hcl"
    path.write_text('reconnect_timeout = "8h"\n')
    config = ServerConfig(data_dir=None)
    assert config.reconnect_timeout == 72 * 3600  # Consul's default
    apply_config_files(config, [path], set())
    assert config.reconnect_timeout == 8 * 3600
    flagged = ServerConfig(data_dir=None, reconnect_timeout=30.0)
    apply_config_files(flagged, [path], {"reconnect_timeout"})
    assert flagged.reconnect_timeout == 30.0
    path.write_text('reconnect_timeout = "later"\n')
    with pytest.raises(ConfigFileError) as info:
        apply_config_files(ServerConfig(data_dir=None), [path], set())
    assert "reconnect_timeout: 'later' is not a duration" in info.value.message, info.value.message
