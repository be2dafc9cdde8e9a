"""Declarative gateway config (gateway.yaml, decK's shape): the desired gateway/ store contents and the diff
(create/update/delete) against the current contents, applied as one guarded store txn.

Pure planning plus one txn; the file is the whole truth for gateway/ (entities it does not name are deleted).
Never hashes a password twice for the same value (an unchanged file yields "no changes").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from shipyard.gateway.credential_hash import (
    HASH_KEY_PATH,
    SETTINGS_PREFIX,
    KeyHasher,
    hasher_from_value,
    new_hash_key_value,
    seal_key,
)
from shipyard.gateway.entities import (
    CONSUMERS,
    CREDENTIALS,
    PLUGINS,
    ROUTES,
    SERVICES,
    UNIQUE,
    UPSTREAMS,
    Kind,
    SchemaError,
    dumps,
    normalize_consumer,
    normalize_credential,
    normalize_plugin,
    normalize_route,
    normalize_service,
    normalize_target,
    normalize_upstream,
    stable_id,
    stamp,
    target_kind,
    unique_keys,
    without_stamps,
)
from shipyard.gateway.plugins.basic_auth import is_password_hash, verify_password
from shipyard.store import Compare, Delete, Put

ROOT = "gateway/"
# Not entities of the file: settings, and the TLS port's certificates and SNIs (admin API only), kept by an apply.
NOT_DECLARED = (SETTINGS_PREFIX, "gateway/certificates/", "gateway/snis/")
CREDENTIAL_SECTIONS = {
    "keyauth_credentials": "key-auth", "key-auth": "key-auth", "key_auth": "key-auth",
    "jwt_secrets": "jwt", "jwt": "jwt",
    "basicauth_credentials": "basic-auth", "basic-auth": "basic-auth", "basic_auth": "basic-auth",
    "acls": "acl", "acl": "acl",
}
CREDENTIAL_NATURAL = {"key-auth": "key", "jwt": "key", "basic-auth": "username", "acl": "group"}


@dataclass
class Entry:
    kind: str  # service, route, consumer, key-auth, jwt, basic-auth, acl, plugin, upstream, target
    label: str
    entity: Kind
    record: dict[str, Any]
    plain_password: str | None = None

    @property
    def key(self) -> str:
        return self.entity.key(self.record)


@dataclass
class Change:
    action: str  # create | update | delete
    kind: str
    label: str
    fields: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "name": self.label, "fields": self.fields}


@dataclass
class Plan:
    changes: list[Change]
    puts: dict[str, bytes]
    deletes: list[str]
    guards: list[Compare]


def _list(config: Mapping[str, Any], name: str, where: str) -> list[Mapping[str, Any]]:
    value = config.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise SchemaError({f"{where}{name}": "expected a list of objects"})
    return value


def _strip(body: Mapping[str, Any], *nested: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in nested}


def _where(exc: SchemaError, where: str) -> SchemaError:
    return SchemaError({f"{where}.{k}": v for k, v in exc.fields.items()})


def _natural(kind: str, record: Mapping[str, Any]) -> str:
    if kind == "route":
        return str(record.get("name") or record["id"])
    if kind == "consumer":
        return str(record.get("username") or record.get("custom_id"))
    if kind == "key-auth":  # stored as its hash (credential_hash); a key stored in clear by an older version
        return f"/{record.get('key_hash') or record.get('key')}"
    if kind in CREDENTIAL_NATURAL:
        return f"{record.get('consumer') if kind == 'acl' else ''}/{record.get(CREDENTIAL_NATURAL[kind])}"
    if kind == "plugin":
        return "/".join(str(record.get(k) or "") for k in ("name", "service", "route", "consumer"))
    if kind == "target":
        return f"{record.get('upstream')}/{record.get('target')}"
    return str(record.get("name"))


async def desired_state(config: Mapping[str, Any]) -> list[Entry]:
    """Every entity the file describes, normalised exactly like the admin API would store it."""
    if not isinstance(config, Mapping):
        raise SchemaError({"@document": "expected a mapping at the top level"})
    unknown = set(config) - {"_format_version", "_transform", "services", "routes", "consumers", "plugins",
                             "upstreams"}
    if unknown:
        raise SchemaError({sorted(unknown)[0]: "unknown section"})
    entries: list[Entry] = []

    def plugin(body: Mapping[str, Any], where: str, **scope: str | None) -> None:
        merged = {**body, **{k: v for k, v in scope.items() if v}}
        try:
            record = normalize_plugin(merged)
        except SchemaError as exc:
            raise _where(exc, where) from None
        record["id"] = stable_id("plugin", _natural("plugin", record))
        entries.append(Entry("plugin", _plugin_label(record), PLUGINS, record))

    def route(body: Mapping[str, Any], where: str, service: str) -> None:
        try:
            record = normalize_route({**_strip(body, "plugins"), "service": service})
        except SchemaError as exc:
            raise _where(exc, where) from None
        if not record.get("name"):
            raise SchemaError({f"{where}.name": "required field missing (routes are named in gateway.yaml)"})
        record["id"] = stable_id("route", record["name"])
        entries.append(Entry("route", record["name"], ROUTES, record))
        for i, p in enumerate(_list(body, "plugins", where + ".")):
            plugin(p, f"{where}.plugins[{i}]", route=record["id"])

    for i, body in enumerate(_list(config, "services", "")):
        where = f"services[{i}]"
        try:
            record = normalize_service(_strip(body, "routes", "plugins"))
        except SchemaError as exc:
            raise _where(exc, where) from None
        record["id"] = stable_id("service", record["name"])
        entries.append(Entry("service", record["name"], SERVICES, record))
        for j, r in enumerate(_list(body, "routes", where + ".")):
            route(r, f"{where}.routes[{j}]", record["name"])
        for j, p in enumerate(_list(body, "plugins", where + ".")):
            plugin(p, f"{where}.plugins[{j}]", service=record["name"])
    for i, r in enumerate(_list(config, "routes", "")):
        service = r.get("service")
        if not service:
            raise SchemaError({f"routes[{i}].service": "required field missing"})
        route(_strip(r, "service"), f"routes[{i}]", str(service))
    for i, body in enumerate(_list(config, "consumers", "")):
        where = f"consumers[{i}]"
        nested = {k for k in body if k in CREDENTIAL_SECTIONS or k == "plugins"}
        try:
            record = normalize_consumer(_strip(body, *nested))
        except SchemaError as exc:
            raise _where(exc, where) from None
        record["id"] = stable_id("consumer", _natural("consumer", record))
        entries.append(Entry("consumer", _natural("consumer", record), CONSUMERS, record))
        for section in sorted(nested - {"plugins"}):
            kind = CREDENTIAL_SECTIONS[section]
            for j, c in enumerate(_list(body, section, where + ".")):
                cwhere = f"{where}.{section}[{j}]"
                plain = c.get("password") if kind == "basic-auth" else None
                # A plain password is hashed only if it differs from what is stored (see _settle_password).
                body_c = {**c, "consumer": record["id"]}
                if plain is not None and not is_password_hash(str(plain)):
                    body_c["password"] = "scrypt$0$0$0$$"  # placeholder hash, replaced before any write
                if kind in ("key-auth", "jwt") and not c.get("key"):
                    raise SchemaError({f"{cwhere}.key": "required field missing (keys are explicit in gateway.yaml)"})
                try:
                    cred = normalize_credential(kind, body_c)
                except SchemaError as exc:
                    raise _where(exc, cwhere) from None
                if kind == "jwt" and cred.get("algorithm", "").startswith("HS") and not c.get("secret"):
                    raise SchemaError({f"{cwhere}.secret": "required field missing (secrets are explicit in "
                                                           "gateway.yaml)"})
                cred["id"] = stable_id(kind, _natural(kind, cred))
                label = f"{_natural('consumer', record)}: {cred.get(CREDENTIAL_NATURAL[kind])}"
                if kind in ("key-auth", "jwt"):
                    label = f"{_natural('consumer', record)}: {str(cred['key'])[:6]}…"
                entries.append(Entry(kind, label, CREDENTIALS[kind], cred,
                                     plain_password=str(plain) if plain is not None and not is_password_hash(
                                         str(plain)) else None))
        for j, p in enumerate(_list(body, "plugins", where + ".")):
            plugin(p, f"{where}.plugins[{j}]", consumer=record["id"])
    for i, p in enumerate(_list(config, "plugins", "")):
        plugin(p, f"plugins[{i}]")
    for i, body in enumerate(_list(config, "upstreams", "")):
        where = f"upstreams[{i}]"
        try:
            record = normalize_upstream(_strip(body, "targets"))
        except SchemaError as exc:
            raise _where(exc, where) from None
        record["id"] = stable_id("upstream", record["name"])
        entries.append(Entry("upstream", record["name"], UPSTREAMS, record))
        for j, t in enumerate(_list(body, "targets", where + ".")):
            try:
                target = normalize_target({**t, "upstream": record["name"]})
            except SchemaError as exc:
                raise _where(exc, f"{where}.targets[{j}]") from None
            target["id"] = stable_id("target", _natural("target", target))
            entries.append(Entry("target", f"{record['name']}: {target['target']}", target_kind(record["name"]),
                                 target))
    _check_references(entries)
    return entries


def _plugin_label(record: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    """"rate-limiting (route=catalog-api)": ids shown by name where the file names them."""
    names = names or {}
    scope = [f"{k}={names.get(record[k], record[k])}" for k in ("service", "route", "consumer") if record.get(k)]
    return f"{record['name']} ({', '.join(scope) or 'global'})"


def _check_references(entries: list[Entry]) -> None:
    services = {e.record["name"] for e in entries if e.kind == "service"}
    routes = {e.record["id"] for e in entries if e.kind == "route"}
    route_names = {e.record["name"]: e.record["id"] for e in entries if e.kind == "route"}
    consumers = {e.record["id"] for e in entries if e.kind == "consumer"}
    consumer_names = {_natural("consumer", e.record): e.record["id"] for e in entries if e.kind == "consumer"}
    seen: dict[tuple[str, str], str] = {}
    for e in entries:
        r = e.record
        if e.kind == "route" and r["service"] not in services:
            raise SchemaError({f"routes.{r['name']}.service": f"service '{r['service']}' is not in the file"})
        if e.kind == "plugin":
            if r.get("service") and r["service"] not in services:
                raise SchemaError({f"plugins.{r['name']}.service": f"service '{r['service']}' is not in the file"})
            if r.get("route") and r["route"] not in routes:
                if r["route"] in route_names:
                    r["route"] = route_names[r["route"]]
                else:
                    raise SchemaError({f"plugins.{r['name']}.route": f"route '{r['route']}' is not in the file"})
            if r.get("consumer") and r["consumer"] not in consumers:
                if r["consumer"] in consumer_names:
                    r["consumer"] = consumer_names[r["consumer"]]
                else:
                    raise SchemaError({f"plugins.{r['name']}.consumer": f"consumer '{r['consumer']}' is not in "
                                                                        "the file"})
            r["id"] = stable_id("plugin", _natural("plugin", r))
            e.label = _plugin_label(r, {**{v: k for k, v in route_names.items()},
                                        **{v: k for k, v in consumer_names.items()}})
        natural = (e.kind, _natural(e.kind, r))
        if natural in seen:
            raise SchemaError({e.kind: f"'{e.label}' appears twice in the file"})
        seen[natural] = e.label


def _decode_current(kvs: Iterable[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for kv in kvs:
        if kv.key.startswith(UNIQUE):
            continue
        try:
            out[kv.key] = orjson.loads(kv.value)
        except orjson.JSONDecodeError:
            out[kv.key] = {}
    return out


def _kind_of_key(key: str) -> str:
    rest = key[len(ROOT):]
    head = rest.split("/", 1)[0]
    if head == "credentials":
        return rest.split("/")[1]
    return {"services": "service", "routes": "route", "consumers": "consumer", "plugins": "plugin",
            "upstreams": "upstream", "targets": "target"}.get(head, head)


def _seal_keys(entries: list[Entry], hasher: KeyHasher) -> bool:
    """key-auth keys of the file become their hashes (and their ids follow the hash, not the key)."""
    sealed = False
    for e in entries:
        if e.kind == "key-auth" and seal_key(e.record, hasher) is not None:
            e.record["id"] = stable_id("key-auth", _natural("key-auth", e.record))
            sealed = True
    return sealed


def _settings_apart_and_keys_sealed(kvs: list[Any], entries: list[Entry]) -> tuple[list[Any], bytes | None]:
    """The store's gateway/ contents without its settings (not entities of the file), and the file's key-auth keys
    sealed under the installation's hash key; that key is made here (to be written with the plan) if there is none."""
    hash_kv = next((kv for kv in kvs if kv.key == HASH_KEY_PATH), None)
    new_key = None if hash_kv is not None else new_hash_key_value()
    sealed = _seal_keys(entries, hasher_from_value(hash_kv.value if hash_kv is not None else new_key))
    return [kv for kv in kvs if not kv.key.startswith(NOT_DECLARED)], (new_key if sealed else None)


async def plan_changes(entries: list[Entry], current_kvs: Iterable[Any]) -> Plan:
    """The diff between the file and the store, and the writes that make the store equal the file."""
    kvs, new_hash_key = _settings_apart_and_keys_sealed(list(current_kvs), entries)
    current = _decode_current(kvs)
    revisions = {kv.key: kv.mod_revision for kv in kvs}
    _keep_existing_ids(entries, current)
    changes, puts, wanted_keys = await _entity_writes(entries, current)
    deletes = _entity_deletes(current, wanted_keys, changes)
    _rebuild_unique_index(entries, kvs, puts, deletes)
    if new_hash_key is not None:
        puts[HASH_KEY_PATH] = new_hash_key  # guarded below like any new key: whoever makes it first wins
    guards = [Compare(k, "mod", "=", revisions[k]) for k in set(puts) | set(deletes) if k in revisions]
    guards += [Compare(k, "version", "=", 0) for k in puts if k not in revisions]
    order = {"service": 0, "upstream": 1, "target": 2, "route": 3, "consumer": 4, "plugin": 9}
    changes.sort(key=lambda c: ({"delete": 1}.get(c.action, 0), order.get(c.kind, 5), c.label))
    return Plan(changes=changes if any(c for c in changes) else [], puts=puts, deletes=deletes, guards=guards)


def _keep_existing_ids(entries: list[Entry], current: Mapping[str, dict[str, Any]]) -> None:
    """Entities that already exist under the same natural key keep their ids (created by the admin API or
    earlier), so an apply updates them in place instead of deleting and re-creating them. A route's or consumer's
    id is also a foreign key of plugins and credentials, so those references follow the remapped id."""
    by_natural = {(_kind_of_key(k), _natural(_kind_of_key(k), r)): r for k, r in current.items() if r}
    remap: dict[str, str] = {}
    for e in entries:
        if e.kind in ("route", "consumer"):
            old = by_natural.get((e.kind, _natural(e.kind, e.record)))
            if old and old.get("id") and old["id"] != e.record["id"]:
                remap[e.record["id"]] = old["id"]
    for e in entries:
        r = e.record
        for f in ("route", "consumer"):
            if r.get(f) in remap:
                r[f] = remap[r[f]]
        if e.kind in ("route", "consumer") and r["id"] in remap:
            r["id"] = remap[r["id"]]
        elif e.kind not in ("route", "consumer"):
            old = by_natural.get((e.kind, _natural(e.kind, r)))
            if old and old.get("id"):
                r["id"] = old["id"]


async def _settle_password(record: dict[str, Any], plain: str, old: Mapping[str, Any] | None) -> None:
    """A basic-auth password from the file: the stored hash when it still matches (so an unchanged file is "no
    changes" and nothing is hashed twice), else a new hash. Both run in a thread: hashing is deliberately slow."""
    stored = str((old or {}).get("password") or "")
    same = bool(stored) and await asyncio.to_thread(verify_password, plain, stored)
    if same:
        record["password"] = stored
    else:
        from shipyard.gateway.plugins.basic_auth import hash_password

        record["password"] = await asyncio.to_thread(hash_password, plain)


async def _entity_writes(entries: list[Entry], current: Mapping[str, dict[str, Any]]
                         ) -> tuple[list[Change], dict[str, bytes], set[str]]:
    """The creates and updates of the file's entities (with the fields an update changes), their puts, and the
    keys the file wants (everything else under gateway/ is to be deleted)."""
    changes: list[Change] = []
    puts: dict[str, bytes] = {}
    wanted_keys: set[str] = set()
    for e in entries:
        key = e.key
        wanted_keys.add(key)
        old = current.get(key)
        if e.plain_password is not None:
            await _settle_password(e.record, e.plain_password, old)
        if old is None:
            changes.append(Change("create", e.kind, e.label))
            puts[key] = dumps(stamp(e.record))
            continue
        before, after = without_stamps(old), without_stamps(e.record)
        if before != after:
            fields = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            changes.append(Change("update", e.kind, e.label, fields))
            puts[key] = dumps(stamp(e.record, old))
    return changes, puts, wanted_keys


def _entity_deletes(current: Mapping[str, dict[str, Any]], wanted_keys: set[str], changes: list[Change]
                    ) -> list[str]:
    """The stored entities the file does not name (the file is the whole truth for gateway/): their keys, and a
    delete change for each appended to changes."""
    deletes = []
    for key, record in sorted(current.items()):
        if key not in wanted_keys:
            kind = _kind_of_key(key)
            deletes.append(key)
            label = _plugin_label(record) if kind == "plugin" and record.get("name") else _natural(kind, record)
            changes.append(Change("delete", kind, label))
    return deletes


def _rebuild_unique_index(entries: list[Entry], kvs: list[Any], puts: dict[str, bytes], deletes: list[str]
                          ) -> None:
    """The unique index is rebuilt from the desired records, in the same txn: entries that differ are added to
    puts, entries no desired record claims to deletes."""
    wanted_unique = {k: e.key.encode() for e in entries for k in unique_keys(e.entity, e.record)}
    current_unique = {kv.key: kv.value for kv in kvs if kv.key.startswith(UNIQUE)}
    for k, v in wanted_unique.items():
        if current_unique.get(k) != v:
            puts[k] = v
    deletes += [k for k in current_unique if k not in wanted_unique]


async def apply_plan(store: Any, plan: Plan, revision: int) -> bool:
    """One txn: every write of the plan, guarded so a concurrent admin write makes it fail instead of mixing."""
    ops: list[Any] = [Delete(k) for k in plan.deletes] + [Put(k, v) for k, v in plan.puts.items()]
    result = await store.txn(plan.guards, ops, [])
    return bool(result.succeeded)
