"""Gateway configuration entities (Kong's model): schemas, normalisation, and their store layout under gateway/.

Owns validation and the unique-value index (gateway/unique/...) kept consistent by store txns; never serves HTTP
and never touches keys outside gateway/.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from shipyard.gateway.paths import RegexError, compile_route_regex, regex_error_text
from shipyard.gateway.plugin_chain import instantiate
from shipyard.gateway.plugins.base import PluginConfigError
from shipyard.gateway.plugins.basic_auth import hash_password, is_password_hash

ROOT = "gateway/"
UNIQUE = "gateway/unique/"
NAME_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
PROTOCOLS = ("http", "https")
REDIRECT_STATUSES = (426, 301, 302, 307, 308)  # what a route with protocols: [https] answers plain HTTP
METHODS_RE = re.compile(r"^[A-Z]{1,16}$")
ALGORITHMS = ("round-robin", "least-connections", "consistent-hashing")
HASH_ON = ("none", "header", "cookie", "ip")
CREDENTIAL_KINDS = ("key-auth", "jwt", "basic-auth", "acl")
# URL segment under /consumers/{c}/ -> stored kind
CREDENTIAL_PATHS = {"key-auth": "key-auth", "jwt": "jwt", "basic-auth": "basic-auth", "acls": "acl"}
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256")
NAMESPACE = uuid.UUID("7b0c3a52-4c1e-4a55-9a3e-0d6f2f0b1c11")


class SchemaError(Exception):
    """Kong's 400: {"message": "schema violation (...)", "name": "schema violation", "fields": {...}}."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = dict(fields)
        text = "; ".join(f"{k}: {v}" for k, v in self.fields.items())
        super().__init__(f"schema violation ({text})" if len(self.fields) == 1 else f"{len(self.fields)} schema "
                         f"violations ({text})")


class UniqueViolation(Exception):
    """Kong's 409: {"message": "UNIQUE violation detected on '{name=\"x\"}'", "fields": {...}}."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = dict(fields)
        inner = ",".join(f'{k}="{v}"' for k, v in self.fields.items())
        super().__init__(f"UNIQUE violation detected on '{{{inner}}}'")


class ForeignKeyError(SchemaError):
    def __init__(self, field: str, kind: str, value: str) -> None:
        super().__init__({field: f"the foreign key '{value}' does not reference an existing '{kind}' entity."})


def stable_id(*parts: str) -> str:
    """Ids of declaratively managed entities: the same file yields the same ids (idempotent apply)."""
    return str(uuid.uuid5(NAMESPACE, "\0".join(parts)))


def new_id() -> str:
    return str(uuid.uuid4())


def dumps(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


# ---- field readers -----------------------------------------------------------------------------------------


class Fields:
    def __init__(self, body: Mapping[str, Any], known: set[str]) -> None:
        if not isinstance(body, Mapping):
            raise SchemaError({"@entity": "expected a record"})
        self.body = body
        self.errors: dict[str, str] = {}
        for name in body:
            if name not in known and name not in ("created_at", "updated_at"):
                self.errors[name] = "unknown field"

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.body.get(name)
        if value is None:
            if required:
                self.errors[name] = "required field missing"
            return default
        return value

    def string(self, name: str, default: str | None = None, *, required: bool = False,
               pattern: re.Pattern[str] | None = None) -> str | None:
        value = self.get(name, default, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.errors[name] = "expected a string"
            return default
        if pattern is not None and not pattern.match(value):
            self.errors[name] = "invalid value: " + value[:64]
        return value

    def integer(self, name: str, default: int, *, low: int = 0, high: int = 2**31 - 1) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.errors[name] = "expected an integer"
            return default
        if not low <= value <= high:
            self.errors[name] = f"value should be between {low} and {high}"
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            self.errors[name] = "expected a boolean"
            return default
        return value

    def strings(self, name: str, *, item: re.Pattern[str] | None = None) -> list[str]:
        value = self.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.errors[name] = "expected an array of strings"
            return []
        for v in value:
            if item is not None and not item.match(v):
                self.errors[name] = f"invalid value: {v[:64]}"
        return list(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, default)
        if value not in choices:
            self.errors[name] = f"expected one of: {', '.join(choices)}"
            return default
        return str(value)

    def check(self) -> None:
        if self.errors:
            raise SchemaError(self.errors)


def _ref(value: Any) -> str | None:
    """Kong lets a foreign key be "x" or {"id": "x"} or {"name": "x"}."""
    if isinstance(value, Mapping):
        value = value.get("id") or value.get("name") or value.get("username")
    return str(value) if value else None


# ---- normalisation (fills defaults; the same function serves the admin API and `gateway apply`) -----------


def normalize_service(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "name", "host", "port", "path", "protocol", "connect_timeout", "read_timeout",
                      "write_timeout", "retries", "tags", "url", "enabled", "tls_verify"})
    name = f.string("name", required=True, pattern=NAME_RE)
    record: dict[str, Any] = {"id": f.string("id") or "", "name": name}
    host, port, path, protocol = f.string("host"), f.get("port"), f.string("path"), f.get("protocol")
    url = f.string("url")
    if url:  # Kong's shorthand: url = protocol://host:port/path
        m = re.match(r"^(https?)://([^/:]+)(?::(\d+))?(/.*)?$", url)
        if not m:
            f.errors["url"] = "invalid url"
        else:
            protocol, host = m.group(1), m.group(2)
            port = int(m.group(3)) if m.group(3) else port
            path = m.group(4) or path
    record["host"] = host or name
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        f.errors["port"] = "value should be between 1 and 65535"
    if port is not None:
        record["port"] = port
    if path is not None:
        if not path.startswith("/"):
            f.errors["path"] = "should start with: /"
        record["path"] = path
    record["protocol"] = protocol if protocol in PROTOCOLS else "http"
    if protocol is not None and protocol not in PROTOCOLS:
        f.errors["protocol"] = "expected one of: http, https"
    for name_, default in (("connect_timeout", 60000), ("read_timeout", 60000), ("write_timeout", 60000)):
        record[name_] = f.integer(name_, default, low=1)
    record["retries"] = f.integer("retries", 5, high=32767)
    record["tags"] = f.strings("tags")
    record["enabled"] = f.boolean("enabled", True)
    if body.get("tls_verify") is not None:  # Kong's null: do not verify the instances' certificates
        record["tls_verify"] = f.boolean("tls_verify", False)
    f.check()
    return record


def normalize_route(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "name", "service", "hosts", "paths", "regex_paths", "methods", "headers",
                      "strip_path", "preserve_host", "tags", "protocols", "regex_priority",
                      "https_redirect_status_code"})
    record: dict[str, Any] = {"id": f.string("id") or "", "name": f.string("name", pattern=NAME_RE) or None}
    service = _ref(f.get("service", required=True))
    record["service"] = service
    record["hosts"] = [h.lower() for h in f.strings("hosts")]
    plain, regex_paths = _route_paths(f, body)
    regex_paths += _route_regex_paths(f)
    record["paths"] = plain
    record["regex_paths"] = regex_paths
    record["methods"] = _route_methods(f)
    record["headers"] = _route_headers(f)
    record["strip_path"] = f.boolean("strip_path", True)
    record["preserve_host"] = f.boolean("preserve_host", False)
    record["tags"] = f.strings("tags")
    record["protocols"] = _route_protocols(f)
    record["https_redirect_status_code"] = f.integer("https_redirect_status_code", 426, low=301, high=426)
    if record["https_redirect_status_code"] not in REDIRECT_STATUSES:
        f.errors["https_redirect_status_code"] = "expected one of: 426, 301, 302, 307, 308"
    if not (record["hosts"] or record["paths"] or record["regex_paths"] or record["methods"] or record["headers"]):
        f.errors["@entity"] = "must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"
    f.check()
    return record


def _route_paths(f: Fields, body: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """paths split into fixed paths and Kong 3's ~-marked regex paths (which take the route's regex_priority)."""
    regex_paths = []
    plain = []
    for p in f.strings("paths"):
        if p.startswith("~/"):  # Kong 3 marks regex paths with ~
            try:
                compile_route_regex(p[1:])
            except RegexError as exc:
                f.errors["paths"] = f"invalid regex '{p[1:]}': {regex_error_text(exc)}"
                continue
            regex_paths.append({"pattern": p[1:], "priority": int(body.get("regex_priority") or 0)})
        elif p.startswith("/"):
            plain.append(p)
        else:
            f.errors["paths"] = "should start with: / (fixed path) or ~/ (regex path)"
    return plain, regex_paths


def _route_regex_paths(f: Fields) -> list[dict[str, Any]]:
    """The regex_paths field ({pattern, priority} items, or bare patterns at priority 0), each pattern checked as
    the gateway will compile it."""
    raw_regex = f.get("regex_paths", [])
    if not isinstance(raw_regex, list):
        f.errors["regex_paths"] = "expected an array"
        raw_regex = []
    regex_paths = []
    for item in raw_regex:
        if isinstance(item, str):
            item = {"pattern": item, "priority": 0}
        if not isinstance(item, Mapping) or not isinstance(item.get("pattern"), str):
            f.errors["regex_paths"] = "expected {pattern, priority} items"
            continue
        try:
            compile_route_regex(item["pattern"])  # RE2, as the gateway matches it: no backreferences, no lookaround
        except RegexError as exc:
            f.errors["regex_paths"] = f"invalid regex '{item['pattern']}': {regex_error_text(exc)}"
            continue
        regex_paths.append({"pattern": item["pattern"], "priority": int(item.get("priority") or 0)})
    return regex_paths


def _route_methods(f: Fields) -> list[str]:
    """methods upper-cased, as the gateway compares them with the request's."""
    methods = [m.upper() for m in f.strings("methods")]
    for m in methods:
        if not METHODS_RE.match(m):
            f.errors["methods"] = f"invalid method: {m}"
    return methods


def _route_headers(f: Fields) -> dict[str, list[str]]:
    """headers as lower-cased names to lists of values (HTTP header names are case-insensitive)."""
    headers = f.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in headers.values()
    ):
        f.errors["headers"] = "expected a map of header names to arrays of values"
        headers = {}
    return {str(k).lower(): list(v) for k, v in headers.items()}


def _route_protocols(f: Fields) -> list[str]:
    """protocols, both http and https when unset (Kong's default)."""
    protocols = f.strings("protocols") or ["http", "https"]
    if any(p not in PROTOCOLS for p in protocols):
        f.errors["protocols"] = "expected one of: http, https"
    return protocols


def normalize_consumer(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "username", "custom_id", "tags"})
    record = {"id": f.string("id") or "", "username": f.string("username"), "custom_id": f.string("custom_id"),
              "tags": f.strings("tags")}
    if not record["username"] and not record["custom_id"]:
        f.errors["@entity"] = "at least one of these fields must be non-empty: 'custom_id', 'username'"
    f.check()
    return record


def normalize_credential(kind: str, body: Mapping[str, Any], *, existing: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    known = {"id", "consumer", "tags"} | {
        "key-auth": {"key", "ttl"}, "jwt": {"key", "algorithm", "secret", "rsa_public_key"},
        "basic-auth": {"username", "password"}, "acl": {"group"},
    }[kind]
    f = Fields(body, known)
    record: dict[str, Any] = {"id": f.string("id") or "", "kind": kind, "consumer": _ref(f.get("consumer")),
                              "tags": f.strings("tags")}
    if kind == "key-auth":
        _key_auth_fields(f, record, existing or {})
    elif kind == "jwt":
        _jwt_fields(f, record, existing or {})
    elif kind == "basic-auth":
        _basic_auth_fields(f, record, existing)
    else:
        record["group"] = f.string("group", required=True)
    f.check()
    return record


def _key_auth_fields(f: Fields, record: dict[str, Any], existing: Mapping[str, Any]) -> None:
    """A key-auth credential's key: the given one, else the existing one (or its hash), else a new random key."""
    # A new key is stored as its hash by the caller (credential_hash.seal_key); an unchanged one keeps its hash.
    key = f.string("key") or existing.get("key")
    if key is None and existing.get("key_hash"):
        record["key_hash"] = existing["key_hash"]
    else:
        record["key"] = key or secrets.token_urlsafe(24)


def _jwt_fields(f: Fields, record: dict[str, Any], existing: Mapping[str, Any]) -> None:
    """A jwt credential's key and algorithm, with an HMAC secret (kept or made) or an RSA/EC public key (required
    and parsed, so a bad PEM is a 400 now rather than every request failing later)."""
    record["key"] = f.string("key") or existing.get("key") or secrets.token_hex(16)
    algorithm = f.choice("algorithm", JWT_ALGORITHMS, "HS256")
    record["algorithm"] = algorithm
    if algorithm.startswith("HS"):
        record["secret"] = f.string("secret") or existing.get("secret") or secrets.token_hex(32)
        return
    pem = f.string("rsa_public_key", required=True)
    if pem:
        try:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            load_pem_public_key(pem.encode())
        except (ValueError, TypeError):
            f.errors["rsa_public_key"] = "invalid key"
    record["rsa_public_key"] = pem


def _basic_auth_fields(f: Fields, record: dict[str, Any], existing: Mapping[str, Any] | None) -> None:
    """A basic-auth credential's username and password hash; the password is required only on create, and one
    that is already a hash is stored as it is (never hashed twice)."""
    record["username"] = f.string("username", required=True)
    password = f.string("password", required=existing is None)
    if password is None:
        record["password"] = (existing or {}).get("password")
    else:
        record["password"] = password if is_password_hash(password) else hash_password(password)


def normalize_plugin(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "name", "config", "enabled", "service", "route", "consumer", "tags", "protocols"})
    name = f.string("name", required=True)
    config = f.get("config", {})
    if not isinstance(config, Mapping):
        f.errors["config"] = "expected a record"
        config = {}
    record: dict[str, Any] = {
        "id": f.string("id") or "", "name": name, "config": dict(config), "enabled": f.boolean("enabled", True),
        "service": _ref(f.get("service")), "route": _ref(f.get("route")), "consumer": _ref(f.get("consumer")),
        "tags": f.strings("tags"),
    }
    f.check()
    try:
        instantiate(record)
    except PluginConfigError as exc:
        field = "name" if str(exc).startswith("plugin '") else "config"
        raise SchemaError({field: str(exc)}) from None
    return record


def normalize_upstream(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "name", "algorithm", "hash_on", "hash_on_header", "hash_on_cookie", "healthchecks",
                      "tags", "slots"})
    record: dict[str, Any] = {
        "id": f.string("id") or "", "name": f.string("name", required=True, pattern=re.compile(r"^[A-Za-z0-9._-]+$")),
        "algorithm": f.choice("algorithm", ALGORITHMS, "round-robin"),
        "hash_on": f.choice("hash_on", HASH_ON, "none"),
        "hash_on_header": f.string("hash_on_header"), "hash_on_cookie": f.string("hash_on_cookie"),
        "tags": f.strings("tags"),
    }
    if record["hash_on"] == "header" and not record["hash_on_header"]:
        f.errors["hash_on_header"] = "required field missing"
    if record["hash_on"] == "cookie" and not record["hash_on_cookie"]:
        f.errors["hash_on_cookie"] = "required field missing"
    checks = f.get("healthchecks", {})
    if not isinstance(checks, Mapping):
        f.errors["healthchecks"] = "expected a record"
        checks = {}
    passive = checks.get("passive") or {}
    unhealthy = passive.get("unhealthy") or {} if isinstance(passive, Mapping) else {}
    try:
        record["healthchecks"] = {"passive": {
            "unhealthy": {"failures": int(unhealthy.get("failures", 3)), "timeouts": int(unhealthy.get("timeouts", 3))},
            "eject_seconds": float(passive.get("eject_seconds", 10)),
        }}
    except (TypeError, ValueError, AttributeError):
        f.errors["healthchecks"] = "invalid passive health check settings"
    f.check()
    return record


def normalize_target(body: Mapping[str, Any]) -> dict[str, Any]:
    f = Fields(body, {"id", "target", "weight", "upstream", "tags"})
    target = f.string("target", required=True)
    if target and not re.match(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$", target):
        if re.match(r"^[A-Za-z0-9._\-]+$", target):
            target += ":8000"  # Kong's default target port
        else:
            f.errors["target"] = "Invalid target; not a valid hostname or ip address"
    record = {"id": f.string("id") or "", "target": target, "weight": f.integer("weight", 100, high=65535),
              "upstream": _ref(f.get("upstream")), "tags": f.strings("tags")}
    f.check()
    return record


# ---- store keys and the unique index -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One entity collection: where records live, which field names them in keys, what must be unique."""

    name: str  # URL collection name
    prefix: str
    key_field: str  # "name" or "id"
    unique: tuple[str, ...]

    def key(self, record: Mapping[str, Any]) -> str:
        return self.prefix + quote(str(record[self.key_field]), safe="")


SERVICES = Kind("services", "gateway/services/", "name", ("id",))
ROUTES = Kind("routes", "gateway/routes/", "id", ("name",))
CONSUMERS = Kind("consumers", "gateway/consumers/", "id", ("username", "custom_id"))
PLUGINS = Kind("plugins", "gateway/plugins/", "id", ())
UPSTREAMS = Kind("upstreams", "gateway/upstreams/", "name", ("id",))
CREDENTIALS = {
    "key-auth": Kind("key-auth", "gateway/credentials/key-auth/", "id", ("key_hash",)),
    "jwt": Kind("jwt", "gateway/credentials/jwt/", "id", ("key",)),
    "basic-auth": Kind("basic-auth", "gateway/credentials/basic-auth/", "id", ("username",)),
    "acl": Kind("acl", "gateway/credentials/acl/", "id", ()),
}


def target_kind(upstream: str) -> Kind:
    return Kind("targets", f"gateway/targets/{quote(upstream, safe='')}/", "id", ())


def unique_keys(kind: Kind, record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Index keys that make a value unique: key -> the fields it guards (for the 409 message)."""
    out = {}
    for field in kind.unique:
        value = record.get(field)
        if value:
            out[f"{UNIQUE}{kind.prefix[len(ROOT):]}{field}/{quote(str(value), safe='')}"] = {field: value}
    if kind.prefix.startswith("gateway/credentials/acl/"):
        out[f"{UNIQUE}acl/{record['consumer']}/{quote(str(record['group']), safe='')}"] = {
            "consumer": record["consumer"], "group": record["group"]}
    if kind is PLUGINS:
        scope = "/".join(quote(str(record.get(s) or ""), safe="") for s in ("service", "route", "consumer"))
        out[f"{UNIQUE}plugins/{record['name']}/{scope}"] = {
            "name": record["name"], **{s: record[s] for s in ("service", "route", "consumer") if record.get(s)}}
    if kind.name == "targets":
        out[f"{UNIQUE}{kind.prefix[len(ROOT):]}target/{quote(str(record['target']), safe='')}"] = {
            "target": record["target"]}
    return out


def stamp(record: dict[str, Any], previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    now = int(time.time())
    record["created_at"] = (previous or {}).get("created_at", now)
    record["updated_at"] = now
    return record


def without_stamps(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("created_at", "updated_at")}
