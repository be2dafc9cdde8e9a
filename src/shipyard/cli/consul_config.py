"""Consul agent configuration files for `shipyard server --config-file F --config-dir D`: the keys Shipyard has a
meaning for (JSON or HCL, read by pyhcl), laid over the ServerConfig the flags made; a flag given on the command line
wins, as in Consul. Unknown keys warn; a known key of the wrong type is one line naming its path.

It fills a ServerConfig and nothing else; it never starts anything.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import hcl  # type: ignore[import-untyped]

from shipyard.api.context import ServerConfig
from shipyard.cli.dns_options import DomainName, Duration, Recursor
from shipyard.errors import ShipyardError

log = logging.getLogger("shipyard.config")


class ConfigFileError(ShipyardError):
    status = 1


def _str(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigFileError(f"{path}: expected a string, got {json.dumps(value)}")
    return value


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigFileError(f"{path}: expected true or false, got {json.dumps(value)}")
    return value


def _port(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 65535:
        raise ConfigFileError(f"{path}: expected a port number, got {json.dumps(value)}")
    return max(value, 0)  # Consul's -1 turns a listener off, as 0 does here


def _policy(path: str, value: Any) -> str:
    if value not in ("allow", "deny"):
        raise ConfigFileError(f"{path}: expected \"allow\" or \"deny\", got {json.dumps(value)}")
    return str(value)


Setter = Callable[[ServerConfig, Any, str], None]


def _field(name: str, parse: Callable[[str, Any], Any], flag: str = "") -> tuple[str, Setter]:
    def put(config: ServerConfig, value: Any, path: str) -> None:
        setattr(config, name, parse(path, value))
    return flag or name, put


def _tls_field(name: str, parse: Callable[[str, Any], Any], flag: str) -> tuple[str, Setter]:
    def put(config: ServerConfig, value: Any, path: str) -> None:
        setattr(config.tls, name, parse(path, value))
    return flag, put


def _through(kind: click.ParamType) -> Callable[[str, Any], Any]:
    """A parser from one of the server's own option types, so a file's value means what the flag's would."""
    def parse(path: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigFileError(f"{path}: expected a {kind.name}, got {json.dumps(value)}")
        try:
            return kind.convert(value, None, None)
        except click.BadParameter as exc:
            raise ConfigFileError(f"{path}: {exc.message}") from None
    return parse


def _list_of(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], list[Any]]:
    def parse_list(path: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ConfigFileError(f"{path}: expected a list, got {json.dumps(value)}")
        return [parse(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return parse_list


def _service_ttls(path: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigFileError(f"{path}: expected an object of service name to duration, got {json.dumps(value)}")
    return {str(name): _through(Duration())(f"{path}.{name}", ttl) for name, ttl in value.items()}


def _count(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigFileError(f"{path}: expected a whole number from {low} to {high}, got {json.dumps(value)}")
        return value
    return parse


def _strategy(path: str, value: Any) -> str:
    if value not in ("sequential", "random"):
        raise ConfigFileError(f"{path}: expected \"sequential\" or \"random\", got {json.dumps(value)}")
    return str(value)


def _dns_field(name: str, parse: Callable[[str, Any], Any], flag: str) -> tuple[str, Setter]:
    def put(config: ServerConfig, value: Any, path: str) -> None:
        setattr(config.dns, name, parse(path, value))
    return flag, put


def _data_dir(config: ServerConfig, value: Any, path: str) -> None:
    if config.data_dir is not None:  # --dev keeps everything in memory whatever the file says
        config.data_dir = os.path.abspath(_str(path, value))


# Key path -> (the server flag that, given on the command line, wins over it; how it sets the ServerConfig).
KEYS: dict[str, tuple[str, Setter]] = {
    "datacenter": _field("datacenter", _str),
    "node_name": _field("node_name", _str),
    "data_dir": ("data_dir", _data_dir),
    "client_addr": _field("bind", _str),
    "bind_addr": _field("bind", _str),
    "enable_script_checks": _field("enable_script_checks", _bool),
    "reconnect_timeout": _field("reconnect_timeout", _through(Duration())),
    "ports.http": _field("http_port", _port),
    "ports.dns": _field("dns_port", _port),
    "ports.https": _tls_field("https_port", _port, "https_port"),
    "acl.enabled": _field("acl", _bool),
    "acl.default_policy": _field("acl_default_policy", _policy),
    "acl.tokens.initial_management": _field("acl_initial_management", _str),
    "acl.tokens.master": _field("acl_initial_management", _str),  # Consul's name before 1.11
    "acl.tokens.default": _field("acl_default_token", _str, "acl_default_token"),
    "acl.tokens.agent": _field("acl_agent_token", _str, "acl_agent_token"),
    "acl.tokens.dns": _field("acl_dns_token", _str, "acl_dns_token"),
    "acl.enable_token_persistence": _field("acl_token_persistence", _bool, "acl_token_persistence"),
    "tls.defaults.ca_file": _tls_field("ca_file", _str, "tls_ca"),
    "tls.defaults.cert_file": _tls_field("cert_file", _str, "tls_cert"),
    "tls.defaults.key_file": _tls_field("key_file", _str, "tls_key"),
    "tls.defaults.verify_incoming": _tls_field("verify_incoming", _bool, "verify_incoming"),
    "domain": _dns_field("domain", _through(DomainName()), "domain"),
    "alt_domain": _dns_field("alt_domain", _through(DomainName()), "alt_domain"),
    "recursors": _dns_field("recursors", _list_of(_through(Recursor())), "recursors"),
    "dns_config.allow_stale": _dns_field("allow_stale", _bool, "dns_allow_stale"),
    "dns_config.max_stale": _dns_field("max_stale", _through(Duration()), "dns_max_stale"),
    "dns_config.node_ttl": _dns_field("node_ttl", _through(Duration()), "dns_node_ttl"),
    "dns_config.service_ttl": _dns_field("service_ttl", _service_ttls, "dns_service_ttls"),
    "dns_config.only_passing": _dns_field("only_passing", _bool, "dns_only_passing"),
    "dns_config.a_record_limit": _dns_field("a_record_limit", _count(0, 65535), "dns_a_record_limit"),
    "dns_config.udp_answer_limit": _dns_field("udp_answer_limit", _count(1, 8), "dns_udp_answer_limit"),
    "dns_config.enable_truncate": _dns_field("enable_truncate", _bool, "dns_enable_truncate"),
    "dns_config.recursor_timeout": _dns_field("recursor_timeout", _through(Duration()), "dns_recursor_timeout"),
    "dns_config.recursor_strategy": _dns_field("recursor_strategy", _strategy, "dns_recursor_strategy"),
    "dns_config.enable_additional_node_meta_txt": _dns_field("enable_additional_node_meta_txt", _bool,
                                                             "dns_node_meta_txt"),
}
_PARENTS = {".".join(k.split(".")[:i]) for k in KEYS for i in range(1, k.count(".") + 1)}


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else hcl.loads(text)
    except Exception as exc:  # json's and pyhcl's syntax errors, with the line in the message
        raise ConfigFileError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected an object at the top")
    return data


def config_files(files: Iterable[str], dirs: Iterable[str]) -> list[Path]:
    """The files in Consul's order: each --config-file, then each --config-dir's *.json and *.hcl by name."""
    paths = [Path(f) for f in files]
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise ConfigFileError(f"--config-dir {d}: not a directory")
        paths += sorted(p for p in folder.iterdir() if p.suffix in (".json", ".hcl") and p.is_file())
    return paths


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in _PARENTS:
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
                value = value[0]  # HCL written as `acl = [{...}]` or a repeated block
            if not isinstance(value, dict):
                raise ConfigFileError(f"{path}: expected an object, got {json.dumps(value)}")
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def apply_config_files(config: ServerConfig, paths: list[Path], explicit: set[str]) -> None:
    """Lays the files' known keys over config, later files over earlier ones; a flag in `explicit` (given on the
    command line) keeps its value."""
    for path in paths:
        try:
            _apply_one(config, path, explicit)
        except ConfigFileError as exc:
            if exc.message.startswith(("config file ", "cannot read config file ")):
                raise
            raise ConfigFileError(f"config file {path}: {exc.message}") from None


def _apply_one(config: ServerConfig, path: Path, explicit: set[str]) -> None:
    for key, value in _flatten(read_file(path)):
        known = KEYS.get(key)
        if known is None:
            log.warning("config file %s: %s is not a key Shipyard uses; ignored", path, key)
            continue
        flag, put = known
        if flag not in explicit:
            put(config, value, key)
