"""What each route of the control API needs from a token: Consul's rules for /v1 (as Consul's endpoints ask them),
and Shipyard's own resources (job, bus, store, gateway; docs/acl.md) for the native API, Marathon /v2 and the
gateway admin API. One table, read by the one enforcement point (api/acl_guard.py).

It only says what is needed; it never answers a request. A route it does not know needs operator:write (fail
closed), so a new endpoint is denied to ordinary tokens until it gets its rule here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from shipyard.acl import READ, WRITE, Authorizer
from shipyard.api.acl_guard import Check, Need, Rule, body_json, buffered_body, keep
from shipyard.api.context import platform_of
from shipyard.errors import ShipyardError

Pairs = list[tuple[str, str]]


def _m(request: web.Request, name: str) -> str:
    return request.match_info.get(name, "")


def _node(request: web.Request) -> str:
    return platform_of(request).node.name


def fixed(*checks: Check) -> Rule:
    async def rule(request: web.Request) -> Need:
        return Need(list(checks))
    return rule


def named(resource: str, access: str, part: str, convert: Callable[[str], str] = str) -> Rule:
    async def rule(request: web.Request) -> Need:
        return Need([(resource, convert(_m(request, part)), access)])
    return rule


def filtered(checks_of: Callable[[Any], list[Check]], *, key: str = "", values: bool = False,
             keys: bool = False) -> Rule:
    """A list answer (or the list under `key`, or a dict's values/keys) cut down to what the token may read."""
    def cut(authorizer: Authorizer, data: Any) -> tuple[Any, bool]:
        if key:
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                return data, False
            kept, dropped = keep(authorizer, data[key], checks_of)
            return {**data, key: kept}, dropped
        if isinstance(data, dict) and (values or keys):
            kept_keys, dropped = keep(authorizer, data, checks_of) if keys else (
                [k for k, v in data.items() if all(authorizer.allows(*c) for c in checks_of(v))], False)
            dropped = dropped or len(kept_keys) != len(data)
            return {k: data[k] for k in kept_keys}, dropped
        if isinstance(data, list):
            return keep(authorizer, data, checks_of)
        return data, False

    async def rule(request: web.Request) -> Need:
        return Need(filter=cut)
    return rule


def both(first: Rule, second: Rule) -> Rule:
    async def rule(request: web.Request) -> Need:
        a, b = await first(request), await second(request)
        return Need(a.checks + b.checks, a.write_prefixes + b.write_prefixes, b.filter or a.filter)
    return rule


# ---- Consul /v1 ------------------------------------------------------------------------------------------------
def _svc_node(item: Any) -> list[Check]:
    """A catalog/health item: its node and its service must both be readable (Consul filters on both)."""
    if not isinstance(item, dict):
        return []
    checks: list[Check] = []
    node = item.get("Node")
    if isinstance(node, dict):
        node = node.get("Node")
    if isinstance(node, str):
        checks.append(("node", node, READ))
    service = item.get("ServiceName") or item.get("Service")
    if isinstance(service, dict):
        service = service.get("Service")
    if isinstance(service, str) and service:
        checks.append(("service", service, READ))
    return checks


async def kv_get(request: web.Request) -> Need:
    key = _m(request, "key")
    if "recurse" in request.query or "keys" in request.query:
        def of(item: Any) -> list[Check]:
            name = item.get("Key") if isinstance(item, dict) else item
            return [("key", str(name), READ)]
        return await filtered(of)(request)
    return Need([("key", key, READ)])


async def kv_delete(request: web.Request) -> Need:
    key = _m(request, "key")
    if "recurse" in request.query:
        return Need(write_prefixes=[("key", key)])
    return Need([("key", key, WRITE)])


_KV_READS = {"get", "get-tree", "check-index", "check-session", "check-not-exists"}


def _txn_op(op: dict[str, Any], node: str) -> Need:
    if isinstance(op.get("KV"), dict):
        kv = op["KV"]
        key, verb = str(kv.get("Key", "")), kv.get("Verb")
        if verb == "delete-tree":
            return Need(write_prefixes=[("key", key)])
        return Need([("key", key, READ if verb in _KV_READS else WRITE)])
    for kind in ("Node", "Service", "Check"):
        if isinstance(op.get(kind), dict):
            inner = op[kind]
            access = READ if inner.get("Verb") == "get" else WRITE
            target = inner.get(kind) if isinstance(inner.get(kind), dict) else inner
            if kind == "Service":
                return Need([("service", str(target.get("Service", "")), access)])
            return Need([("node", str(target.get("Node") or inner.get("Node") or node), access)])
    return Need()


async def txn(request: web.Request) -> Need:
    ops = await body_json(request)
    need = Need()
    for op in ops if isinstance(ops, list) else []:
        if isinstance(op, dict):
            one = _txn_op(op, _node(request))
            need.checks += one.checks
            need.write_prefixes += one.write_prefixes
    return need


async def _service_name(request: web.Request, service_id: str) -> str:
    service = await platform_of(request).catalog.get_service(_node(request), service_id)
    return str(service.get("Service", service_id)) if service else service_id


async def service_by_id(request: web.Request) -> Need:
    return Need([("service", await _service_name(request, _m(request, "service_id")), WRITE)])


async def service_read_by_id(request: web.Request) -> Need:
    return Need([("service", await _service_name(request, _m(request, "service_id")), READ)])


def _fold(body: Any) -> dict[str, Any]:
    """A JSON object's top-level fields by lower-case name: Consul (Go's encoding/json) matches them that way."""
    return {str(k).lower(): v for k, v in body.items()} if isinstance(body, dict) else {}


async def service_register(request: web.Request) -> Need:
    body = _fold(await body_json(request))
    return Need([("service", str(body.get("name") or ""), WRITE)])


async def check_register(request: web.Request) -> Need:
    service_id = _fold(await body_json(request)).get("serviceid")
    if service_id:
        return Need([("service", await _service_name(request, str(service_id)), WRITE)])
    return Need([("node", _node(request), WRITE)])


async def check_by_id(request: web.Request) -> Need:
    check = await platform_of(request).catalog.get_check(_node(request), _m(request, "check_id"))
    if check and check.get("ServiceID"):
        return Need([("service", str(check.get("ServiceName") or
                                     await _service_name(request, str(check["ServiceID"]))), WRITE)])
    return Need([("node", _node(request), WRITE)])


async def catalog_register(request: web.Request) -> Need:
    body = _fold(await body_json(request))
    checks: list[Check] = [("node", str(body.get("node", "")), WRITE)]
    service = _fold(body.get("service"))
    if service:
        checks.append(("service", str(service.get("service", "")), WRITE))
    return Need(checks)


async def catalog_deregister(request: web.Request) -> Need:
    body = _fold(await body_json(request))
    node, service_id = str(body.get("node", "")), body.get("serviceid")
    if service_id:
        service = await platform_of(request).catalog.get_service(node, str(service_id))
        return Need([("service", str(service.get("Service")) if service else str(service_id), WRITE)])
    return Need([("node", node, WRITE)])


async def session_create(request: web.Request) -> Need:
    node = _fold(await body_json(request)).get("node")
    return Need([("session", str(node or _node(request)), WRITE)])


async def session_by_id(request: web.Request) -> Need:
    records, _, _ = await platform_of(request).sessions.info(_m(request, "id"))
    return Need([("session", r.node, WRITE) for r in records])


def _session_node(item: Any) -> list[Check]:
    return [("session", str(item.get("Node", "")), READ)] if isinstance(item, dict) else []


async def catalog_node(request: web.Request) -> Need:
    def cut(authorizer: Authorizer, data: Any) -> tuple[Any, bool]:
        services = data.get("Services") if isinstance(data, dict) else None
        if not isinstance(services, dict):
            return data, False
        kept = {k: v for k, v in services.items() if all(authorizer.allows(*c) for c in _svc_node(v))}
        return {**data, "Services": kept}, len(kept) != len(services)
    return Need([("node", _m(request, "node"), READ)], filter=cut)


async def node_write(request: web.Request) -> Need:
    return Need([("node", _node(request), WRITE)])


async def agent_read(request: web.Request) -> Need:
    return Need([("agent", _node(request), READ)])


async def agent_write(request: web.Request) -> Need:
    return Need([("agent", _node(request), WRITE)])


CONSUL: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/kv/{key}"): kv_get,
    ("PUT", "/v1/kv/{key}"): named("key", WRITE, "key"),
    ("DELETE", "/v1/kv/{key}"): kv_delete,
    ("PUT", "/v1/txn"): txn,
    ("PUT", "/v1/agent/service/register"): service_register,
    ("PUT", "/v1/agent/service/deregister/{service_id}"): service_by_id,
    ("PUT", "/v1/agent/service/maintenance/{service_id}"): service_by_id,
    ("GET", "/v1/agent/service/{service_id}"): service_read_by_id,
    ("PUT", "/v1/agent/check/register"): check_register,
    **{("PUT", f"/v1/agent/check/{verb}/{{check_id}}"): check_by_id
       for verb in ("deregister", "pass", "warn", "fail", "update")},
    ("PUT", "/v1/agent/maintenance"): node_write,
    ("GET", "/v1/agent/services"): filtered(lambda s: [("service", str(s.get("Service", "")), READ)], values=True),
    ("GET", "/v1/agent/checks"): filtered(lambda c: _svc_node(c) or [], values=True),
    ("GET", "/v1/agent/self"): agent_read,
    ("GET", "/v1/agent/members"): filtered(lambda m: [("node", str(m.get("Name", "")), READ)]),
    ("GET", "/v1/catalog/datacenters"): fixed(),
    ("GET", "/v1/catalog/services"): filtered(lambda name: [("service", str(name), READ)], keys=True),
    ("GET", "/v1/catalog/service/{name}"): filtered(_svc_node),
    ("GET", "/v1/catalog/nodes"): filtered(_svc_node),
    ("GET", "/v1/catalog/node/{node}"): catalog_node,
    ("PUT", "/v1/catalog/register"): catalog_register,
    ("PUT", "/v1/catalog/deregister"): catalog_deregister,
    ("GET", "/v1/health/service/{name}"): filtered(_svc_node),
    ("GET", "/v1/health/checks/{name}"): filtered(_svc_node),
    ("GET", "/v1/health/state/{state}"): filtered(_svc_node),
    ("GET", "/v1/health/node/{node}"): filtered(_svc_node),
    ("PUT", "/v1/session/create"): session_create,
    ("PUT", "/v1/session/destroy/{id}"): session_by_id,
    ("PUT", "/v1/session/renew/{id}"): session_by_id,
    ("GET", "/v1/session/info/{id}"): filtered(_session_node),
    ("GET", "/v1/session/node/{node}"): filtered(_session_node),
    ("GET", "/v1/session/list"): filtered(_session_node),
    ("GET", "/v1/status/leader"): fixed(),
    ("GET", "/v1/status/peers"): fixed(),
    ("PUT", "/v1/event/fire/{name}"): named("event", WRITE, "name"),
    ("GET", "/v1/event/list"): filtered(lambda e: [("event", str(e.get("Name", "")), READ)]),
    # The ACL API: bootstrap needs no token; token/self needs only a valid one (resolving it is the check).
    ("PUT", "/v1/acl/bootstrap"): fixed(),
    ("GET", "/v1/acl/token/self"): fixed(),
    ("POST", "/v1/acl/login"): fixed(),  # the bearer JWT is the credential
    ("POST", "/v1/acl/logout"): fixed(),  # resolving the token is the check; only a login token may end itself
    ("POST", "/v1/acl/templated-policy/preview/{name}"): fixed(("acl", "", READ)),  # renders; writes nothing
}


# ---- Shipyard's native API -------------------------------------------------------------------------------------
def _job_item(field: str) -> Callable[[Any], list[Check]]:
    return lambda item: [("job", str(item.get(field, "")), READ)] if isinstance(item, dict) else []


async def deploy(request: web.Request) -> Need:
    from shipyard.api.native.jobs_api import parse_deploy_body

    raw = await buffered_body(request)
    try:
        parsed = parse_deploy_body(raw, request.content_type)
    except ShipyardError:
        return Need([("job", "", WRITE)])  # unparseable: the handler's 400 is for writers only
    specs = [parsed] if not hasattr(parsed, "tasks") else list(parsed.tasks.values())
    return Need([("job", str(getattr(s, "name", "")), WRITE) for s in specs])


async def alloc_logs(request: web.Request) -> Need:
    jobs = platform_of(request).jobs
    if jobs is None:
        return Need()
    alloc, _ = await jobs.allocation(_m(request, "id"))
    return Need([("job", alloc.job, READ)])


def _alloc_read(authorizer: Authorizer, data: Any) -> tuple[Any, bool]:
    alloc = data.get("allocation") if isinstance(data, dict) else None
    if isinstance(alloc, dict):
        authorizer.require("job", str(alloc.get("job", "")), READ)
    return data, False


async def alloc_get(request: web.Request) -> Need:
    return Need(filter=_alloc_read)


NATIVE: dict[tuple[str, str], Rule] = {
    ("GET", "/api/v1/jobs"): filtered(_job_item("id"), key="jobs"),
    ("POST", "/api/v1/jobs"): deploy,
    ("GET", "/api/v1/jobs/{id}"): named("job", READ, "id"),
    ("GET", "/api/v1/jobs/{id}/versions"): named("job", READ, "id"),
    ("DELETE", "/api/v1/jobs/{id}"): named("job", WRITE, "id"),
    **{("POST", f"/api/v1/jobs/{{id}}/{verb}"): named("job", WRITE, "id")
       for verb in ("scale", "restart", "promote", "stop", "rollback")},
    ("GET", "/api/v1/deployments"): filtered(_job_item("job"), key="deployments"),
    ("GET", "/api/v1/allocs"): filtered(_job_item("job"), key="allocations"),
    ("GET", "/api/v1/allocs/{id}"): alloc_get,
    ("GET", "/api/v1/allocs/{id}/logs"): alloc_logs,
    ("GET", "/api/v1/health"): fixed(),
    ("GET", "/api/v1/nodes"): filtered(lambda n: [("node", str(n.get("name", "")), READ)]
                                       if isinstance(n, dict) else [], key="nodes"),
    ("GET", "/api/v1/nodes/{node}"): named("node", READ, "node"),
    ("POST", "/api/v1/nodes/{node}/eligibility"): named("node", WRITE, "node"),
    ("POST", "/api/v1/nodes/{node}/drain"): named("node", WRITE, "node"),
    # An agent making its instances' token (api/native/service_tokens_api.py): its own node and its store access.
    ("PUT", "/api/v1/nodes/{node}/service-tokens/{service}"): both(named("node", WRITE, "node"),
                                                                   fixed(("store", "", WRITE))),
    ("DELETE", "/api/v1/nodes/{node}/service-tokens/{service}"): both(named("node", WRITE, "node"),
                                                                      fixed(("store", "", WRITE))),
    # An agent making its gateway workers' read-only token (the same module): the same rule, its own node only.
    ("PUT", "/api/v1/nodes/{node}/gateway-token"): both(named("node", WRITE, "node"), fixed(("store", "", WRITE))),
    # An agent getting its instances' secrets (api/native/node_secrets_api.py): the same rule, its own node only.
    ("POST", "/api/v1/nodes/{node}/secrets"): both(named("node", WRITE, "node"), fixed(("store", "", WRITE))),
    ("GET", "/api/v1/bus/queues"): filtered(lambda q: [("bus", str(q.get("name", "")), READ)]
                                            if isinstance(q, dict) else []),
    ("GET", "/api/v1/bus/status"): fixed(("bus", "", READ)),
    ("GET", "/api/v1/bus/metrics"): fixed(("bus", "", READ)),
    ("GET", "/api/v1/bus/queues/{queue}"): named("bus", READ, "queue"),
    ("GET", "/api/v1/bus/queues/{queue}/dead-letters"): named("bus", READ, "queue"),
    ("GET", "/api/v1/bus/queues/{queue}/dead-letters/{id}"): named("bus", READ, "queue"),
    # Consuming takes messages off the queue: a write.
    ("GET", "/api/v1/bus/queues/{queue}/consume"): named("bus", WRITE, "queue"),
}


async def publish(request: web.Request) -> Need:
    body = await body_json(request)
    events = body.get("events") if isinstance(body, dict) and "events" in body else [body]
    topics = [str(e.get("topic", "")) for e in events if isinstance(e, dict)] if isinstance(events, list) else []
    return Need([("bus", t, WRITE) for t in topics] or [("bus", "", WRITE)])


NATIVE[("POST", "/api/v1/bus/publish")] = publish
NATIVE[("POST", "/api/v1/bus/publish/batch")] = publish


# ---- Marathon /v2 ----------------------------------------------------------------------------------------------
def _app_job(app_id: str) -> str:
    from shipyard.api.marathon.apps import job_id_of

    return job_id_of(app_id)


def _app_item(item: Any) -> list[Check]:
    if not isinstance(item, dict):
        return []
    app_id = item.get("id") or item.get("appId") or ""
    return [("job", _app_job(str(app_id)), READ)]


async def apps_write(request: web.Request) -> Need:
    body = await body_json(request)
    apps = body if isinstance(body, list) else [body]
    ids = [str(a.get("id", "")) for a in apps if isinstance(a, dict)]
    return Need([("job", _app_job(i), WRITE) for i in ids] or [("job", "", WRITE)])


async def group_delete(request: web.Request) -> Need:
    return Need(write_prefixes=[("job", _app_job(_m(request, "group_id")))])


def _deployment_item(item: Any) -> list[Check]:
    apps = item.get("affectedApps") if isinstance(item, dict) else None
    return [("job", _app_job(str(a)), READ) for a in apps] if isinstance(apps, list) else []


MARATHON: dict[tuple[str, str], Rule] = {
    ("GET", "/v2/apps"): filtered(_app_item, key="apps"),
    ("GET", "/v2/apps/"): filtered(_app_item, key="apps"),
    ("POST", "/v2/apps"): apps_write,
    ("POST", "/v2/apps/"): apps_write,
    ("PUT", "/v2/apps"): apps_write,
    ("PUT", "/v2/apps/"): apps_write,
    ("GET", "/v2/tasks"): filtered(_app_item, key="tasks"),
    ("POST", "/v2/tasks/delete"): fixed(("job", "", WRITE)),
    ("GET", "/v2/deployments"): filtered(_deployment_item),
    ("DELETE", "/v2/deployments/{deployment_id}"): fixed(("job", "", WRITE)),
    ("GET", "/v2/groups"): fixed(("job", "", READ)),
    ("GET", "/v2/groups/"): fixed(("job", "", READ)),
    ("GET", "/v2/groups/{group_id}"): fixed(("job", "", READ)),
    ("DELETE", "/v2/groups/{group_id}"): group_delete,
    ("GET", "/v2/queue"): fixed(("job", "", READ)),
    ("GET", "/v2/events"): fixed(("job", "", READ)),
    ("GET", "/v2/info"): fixed(("operator", "", READ)),
    ("GET", "/v2/leader"): fixed(),
    ("GET", "/ping"): fixed(),
    ("GET", "/metrics"): fixed(("operator", "", READ)),
}
for _path in ("/v2/apps/{app_id}", "/v2/apps/{app_id}/tasks", "/v2/apps/{app_id}/versions",
              "/v2/apps/{app_id}/versions/{version}"):
    MARATHON[("GET", _path)] = named("job", READ, "app_id", _app_job)
for _method, _path in (("PUT", "/v2/apps/{app_id}"), ("PATCH", "/v2/apps/{app_id}"), ("DELETE", "/v2/apps/{app_id}"),
                       ("POST", "/v2/apps/{app_id}/restart"), ("DELETE", "/v2/apps/{app_id}/tasks"),
                       ("DELETE", "/v2/apps/{app_id}/tasks/{task_id}")):
    MARATHON[(_method, _path)] = named("job", WRITE, "app_id", _app_job)

TABLE: dict[tuple[str, str], Rule] = {**CONSUL, **NATIVE, **MARATHON}


def _by_method(resource: str, name: str = "") -> Rule:
    async def rule(request: web.Request) -> Need:
        return Need([(resource, name, READ if request.method in ("GET", "HEAD") else WRITE)])
    return rule


TABLE.update({
    ("GET", "/v1/agent/metrics"): agent_read,
    ("GET", "/v1/agent/monitor"): agent_read,
    ("PUT", "/v1/agent/reload"): agent_write,
    ("PUT", "/v1/agent/leave"): agent_write,
    ("PUT", "/v1/agent/force-leave/{node}"): fixed(("operator", "", WRITE)),
    ("GET", "/v1/catalog/connect/{name}"): filtered(_svc_node),
    ("GET", "/v1/health/connect/{name}"): filtered(_svc_node),
    ("GET", "/v1/health/ingress/{name}"): filtered(_svc_node),
    ("GET", "/v1/catalog/gateway-services/{gateway}"): named("service", READ, "gateway"),
    ("GET", "/v1/discovery-chain/{service}"): named("service", READ, "service"),
    ("POST", "/v1/discovery-chain/{service}"): named("service", READ, "service"),
    ("GET", "/v1/agent/connect/ca/roots"): fixed(),
    ("GET", "/v1/connect/ca/roots"): fixed(),
    ("GET", "/v1/agent/connect/ca/leaf/{service}"): named("service", WRITE, "service"),
    ("GET", "/v1/coordinate/nodes"): filtered(_svc_node),
    ("GET", "/v1/coordinate/node/{node}"): named("node", READ, "node"),
    ("GET", "/v1/coordinate/datacenters"): fixed(),
})

# Whole APIs guarded by one resource, read for GET and write otherwise; then everything else under the control API.
PREFIXES: list[tuple[str, Rule]] = [
    ("/v1/acl/", _by_method("acl")),
    ("/v1/snapshot", fixed(("acl", "", WRITE))),  # Consul: a snapshot holds every secret, management only
    ("/v1/operator/keyring", _by_method("keyring")),
    ("/v1/operator/", _by_method("operator")),
    ("/v1/query", _by_method("query")),
    ("/v1/config", _by_method("mesh")),
    ("/v1/connect/", _by_method("mesh")),
    ("/v1/agent/connect/", _by_method("mesh")),
    ("/v1/coordinate/", _by_method("node")),
    ("/v1/agent/token/", fixed(("acl", "", WRITE))),
    ("/api/v1/store/", _by_method("store")),
    ("/api/gateway/", _by_method("gateway")),
    ("/api/v1/bus/queues/", named("bus", WRITE, "queue")),
    ("/api/v1/bus/subscriptions/", named("bus", WRITE, "queue")),
    ("/v1/", fixed(("operator", "", WRITE))),
    ("/v2/", fixed(("operator", "", WRITE))),
    ("/api/", fixed(("operator", "", WRITE))),
]


def rule_for(request: web.Request) -> Rule | None:
    """The route's rule; None for what needs no token (unrouted paths, the web UI's static files)."""
    if request.match_info.http_exception is not None:
        return None
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    return lookup(request.method, canonical, request.path)


def lookup(method: str, canonical: str, path: str) -> Rule | None:
    rule = TABLE.get(("GET" if method == "HEAD" else method, canonical))
    if rule is not None:
        return rule
    for prefix, fallback in PREFIXES:
        if path.startswith(prefix):
            return fallback
    return None
