"""What each console page shows, gathered from the platform's parts (catalog, jobs, KV, bus, gateway records) into
plain dicts for the templates, filtered by what the viewer's ACL token may read.

It reads through the same service objects the API handlers use; it never writes and never renders HTML.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict
from typing import Any

import orjson
import yaml

from shipyard.acl import Authorizer
from shipyard.agent.logfiles import read_tail_lines
from shipyard.agent.node_agent import NodeAgent
from shipyard.api.context import Platform
from shipyard.api.native.agent_logs import agent_log_lines, logs_agent_of
from shipyard.api.native.usage_relay import instances_usage
from shipyard.bus import Bus
from shipyard.errors import ShipyardError
from shipyard.gateway.entities import CONSUMERS, PLUGINS, ROUTES, SERVICES, Kind
from shipyard.gateway.plugins.prometheus import LATENCY, REQUESTS
from shipyard.gateway.supervisor import GatewaySupervisor
from shipyard.registry.catalog import CatalogSnapshot
from shipyard.scheduler.jobs import JobService
from shipyard.scheduler.model import Allocation
from shipyard.scheduler.records import AllocStatus

READ = "read"
BAD_ALLOC_STATES = ("failed", "unhealthy", "lost")
STATUS_RANK = {"critical": 0, "warning": 1, "passing": 2}


def can(auth: Authorizer | None, resource: str, name: str, access: str = READ) -> bool:
    """No authorizer means ACLs are off: everything is visible."""
    return auth is None or auth.allows(resource, name, access)


def worst(statuses: list[str]) -> str:
    return min(statuses, key=lambda s: STATUS_RANK.get(s, 0)) if statuses else "passing"


def when(ts: float | None) -> str:
    """An absolute time (UTC): a relative one would change the page every second and wake every live view."""
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _check_row(node: str, check: dict[str, Any]) -> dict[str, Any]:
    return {"node": node, "id": check.get("CheckID", ""), "name": check.get("Name", ""),
            "status": check.get("Status", ""), "output": check.get("Output", ""),
            "service": check.get("ServiceName", ""), "service_id": check.get("ServiceID", "")}


def _service_summary(snap: CatalogSnapshot, name: str) -> dict[str, Any]:
    entries = snap.health_entries(name)
    states = [worst([c.get("Status", "critical") for c in e["Checks"]]) for e in entries]
    tags = sorted({t for e in entries for t in (e["Service"].get("Tags") or [])})
    return {"name": name, "instances": len(entries), "passing": states.count("passing"),
            "warning": states.count("warning"), "critical": states.count("critical"),
            "status": worst(states), "tags": tags}


def _failing_checks(snap: CatalogSnapshot, auth: Authorizer | None) -> list[dict[str, Any]]:
    out = []
    for (node, _), entry in snap.checks.items():
        row = _check_row(node, entry.data)
        if row["status"] == "passing" or not can(auth, "node", node):
            continue
        if row["service"] and not can(auth, "service", row["service"]):
            continue
        out.append(row)
    return sorted(out, key=lambda r: (STATUS_RANK.get(r["status"], 0), r["service"], r["node"]))


def _alloc_problem(alloc: Allocation, status: AllocStatus | None) -> dict[str, Any] | None:
    if alloc.desired != "run":
        return None
    state = status.client if status is not None else alloc.client
    looping = status is not None and status.crash_looping
    if state not in BAD_ALLOC_STATES and not looping:
        return None
    last = (status.last_exit or {}) if status is not None else {}
    # The exit and its stderr say why; the agent's message ("restarting in 2.1s") changes every report.
    why = str(last.get("description") or "") or (status.message if status is not None else "")
    return {"job": alloc.job, "alloc": alloc.id, "index": alloc.index, "node": alloc.node,
            "state": "crash-looping" if looping else state, "why": why, "stderr": _stderr(last)}


def _stderr(last_exit: dict[str, Any] | None) -> list[str]:
    tail = (last_exit or {}).get("stderr_tail") or []
    return [str(line) for line in tail[-3:]]


async def overview(platform: Platform, auth: Authorizer | None) -> dict[str, Any]:
    snap = await platform.catalog.snapshot()
    names = sorted({e.data.get("Service", "") for e in snap.services.values()} - {""})
    services = [_service_summary(snap, n) for n in names if can(auth, "service", n)]
    services.sort(key=lambda s: (STATUS_RANK.get(s["status"], 0), s["name"]))
    nodes = [{"name": n, "address": e.data.get("Address", ""),
              "status": worst([c.data.get("Status", "critical") for c in snap.node_checks(n)]),
              "services": len(snap.services_of_node(n))}
             for n, e in sorted(snap.nodes.items()) if can(auth, "node", n)]
    problems: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    if isinstance(platform.jobs, JobService):
        allocs = await platform.jobs.allocations()
        problems = [p for a, s in allocs if (p := _alloc_problem(a, s)) and can(auth, "job", a.job)]
        jobs = await _job_rows(platform.jobs, auth, allocs)
    return {"services": services, "nodes": nodes, "failing": _failing_checks(snap, auth), "problems": problems,
            "jobs": jobs, "instances": sum(s["instances"] for s in services)}


async def _job_rows(jobs: JobService, auth: Authorizer | None,
                    allocs: list[tuple[Allocation, AllocStatus | None]]) -> list[dict[str, Any]]:
    deployments = {d.job: d for d in await jobs.deployments()}
    rows = []
    for job in await jobs.list():
        if not can(auth, "job", job.id):
            continue
        live = [a for a, _ in allocs if a.job == job.id and a.desired == "run"]
        dep = deployments.get(job.id)
        rows.append({"id": job.id, "kind": job.spec.kind, "version": job.version, "status": job.status,
                     "desired": job.spec.instances if job.status == "running" else 0,
                     "healthy": sum(1 for a in live if a.client == "healthy"), "running": len(live),
                     "deployment": asdict(dep) if dep is not None and dep.active else None})
    return rows


def _usage_cells(usage: dict[str, Any] | None) -> dict[str, str] | None:
    """CPU as a share of one core and RSS, rounded so that an idle instance's row (and so the live view) stays put."""
    if usage is None:
        return None
    cpu = float(usage["cpu_percent"])
    mib = int(usage["rss_bytes"]) / (1 << 20)
    return {"cpu": "<1%" if cpu < 1 else f"{cpu:.0f}%",  # idle: 0 or 1 clock tick a reading, not worth a wake-up
            "memory": f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"}


def _instance_row(alloc: Allocation, status: AllocStatus | None, snap: CatalogSnapshot,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
    entry = snap.services.get((alloc.node, alloc.id))
    checks = [_check_row(alloc.node, c.data) for c in snap.service_checks(alloc.node, alloc.id)] if entry else []
    st = status or AllocStatus(client=alloc.client)
    return {
        "id": alloc.id, "short": alloc.id, "index": alloc.index, "node": alloc.node, "version": alloc.version,
        "desired": alloc.desired, "state": "crash-looping" if st.crash_looping else st.client,
        "address": entry.data.get("Address", st.address) if entry else st.address,
        "port": entry.data.get("Port", "") if entry else next(iter(st.ports.values()), ""),
        "ports": st.ports, "restarts": st.restarts, "message": "" if st.crash_looping else st.message,
        "last_exit": (st.last_exit or {}).get("description", ""), "stderr": _stderr(st.last_exit),
        "pid": st.pid, "cpu": alloc.cpu, "memory": alloc.memory, "limits": st.limits, "usage": _usage_cells(usage),
        "healthy_since": when(st.healthy_since), "canary": alloc.canary, "checks": checks,
        "check_status": worst([c["status"] for c in checks]) if checks else "",
    }


async def service(platform: Platform, auth: Authorizer | None, name: str) -> dict[str, Any]:
    """One service or worker: its job (when the scheduler runs it), instances with checks, routes, versions."""
    snap = await platform.catalog.snapshot()
    out: dict[str, Any] = {"name": name, "job": None, "instances": [], "deployment": None, "versions": [],
                           "routes": await _routes_of(platform, name)}
    jobs = platform.jobs
    known = {j.id for j in await jobs.list()} if isinstance(jobs, JobService) else set()
    if isinstance(jobs, JobService) and name in known and can(auth, "job", name):
        job = await jobs.get(name)
        allocs = await jobs.allocations(name)
        allocs.sort(key=lambda pair: (pair[0].desired != "run", pair[0].index, -pair[0].version))
        dep = await jobs.deployment(name)
        # One reading per node for every instance of the view (this server's own node, each agent's asked once).
        usage = await instances_usage(platform, [a for a, _ in allocs])
        out.update(
            job={"id": job.id, "kind": job.spec.kind, "version": job.version, "status": job.status,
                 "instances": job.spec.instances, "cmd": job.spec.cmd, "stable": job.stable_version},
            instances=[_instance_row(a, s, snap, usage.get(a.id)) for a, s in allocs],
            deployment=asdict(dep) | {"active": dep.active} if dep is not None else None,
            versions=[{"version": v.version, "created": when(v.created_at), "reason": v.reason}
                      for v in reversed(await jobs.versions(name))][:10],
        )
    else:  # registered straight into the catalog (an external service): instances are catalog entries
        out["instances"] = [_catalog_instance(node, e.data, snap) for node, e in snap.services_named(name)]
    return out


def _catalog_instance(node: str, data: dict[str, Any], snap: CatalogSnapshot) -> dict[str, Any]:
    checks = [_check_row(node, c.data) for c in snap.service_checks(node, data.get("ID", ""))]
    return {"id": data.get("ID", ""), "short": data.get("ID", ""), "index": "", "node": node, "version": "",
            "desired": "run", "state": "registered", "address": data.get("Address", ""), "port": data.get("Port", ""),
            "ports": {}, "restarts": "", "last_exit": "", "stderr": [], "message": "", "pid": None, "cpu": "",
            "memory": "", "limits": "", "usage": None, "healthy_since": "", "canary": False, "checks": checks,
            "check_status": worst([c["status"] for c in checks]) if checks else ""}


async def _routes_of(platform: Platform, name: str) -> list[dict[str, Any]]:
    """Gateway routes that reach this service: its urlprefix- tags and admin-API routes to a service of its name."""
    snap = await platform.catalog.snapshot()
    prefixes = sorted({t.removeprefix("urlprefix-") for _, e in snap.services_named(name)
                       for t in (e.data.get("Tags") or []) if t.startswith("urlprefix-")})
    rows = [{"source": "tag", "paths": [p], "name": f"urlprefix-{p}", "hosts": []} for p in prefixes]
    gw_services = _by_id_or_name(await _records(platform, SERVICES))
    for route in await _records(platform, ROUTES):
        target = gw_services.get(_ref_id(route.get("service")))
        if target is not None and name in (target.get("name"), target.get("host")):
            rows.append({"source": "admin", "paths": route.get("paths") or [], "name": route.get("name") or "",
                         "hosts": route.get("hosts") or []})
    rows += [{"source": "job", "paths": r.get("paths") or [], "name": r.get("name") or "",
              "hosts": r.get("hosts") or []} for r in await _job_routes(platform, name)]
    return rows


async def _job_routes(platform: Platform, only: str = "") -> list[dict[str, Any]]:
    """Routes a service declares in its shipyard.yaml (`routes:`), which the gateway builds from the job records of
    jobs that are not stopped (gateway/table.py)."""
    if not isinstance(platform.jobs, JobService):
        return []
    return [{**r, "service_name": job.id} for job in await platform.jobs.list()
            if job.status != "stopped" and only in ("", job.id) for r in job.spec.routes]


def _by_id_or_name(services: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Services by id and by name: a route keeps the reference it was given (POST /services/<name>/routes keeps
    the name)."""
    return {**{s.get("name"): s for s in services if s.get("name")}, **{s.get("id"): s for s in services}}


def _ref_id(ref: Any) -> str:
    """A stored reference to another entity: its id (as the store keeps it) or Kong's {"id": ...} shape."""
    return str(ref.get("id") or "") if isinstance(ref, dict) else str(ref or "")


async def _records(platform: Platform, kind: Kind) -> list[dict[str, Any]]:
    result = await platform.store.range(kind.prefix, prefix=True)
    return [orjson.loads(kv.value) for kv in result.kvs if "/" not in kv.key[len(kind.prefix):]]


async def gateway(platform: Platform, auth: Authorizer | None) -> dict[str, Any]:
    if not can(auth, "gateway", ""):
        return {"denied": True, "metrics": None}
    services = await _records(platform, SERVICES)
    by_id = {ref: s.get("name") for ref, s in _by_id_or_name(services).items()}
    routes = await _records(platform, ROUTES)
    for r in routes:
        r["service_name"] = by_id.get(_ref_id(r.get("service")), "")
    routes += await _job_routes(platform)
    snap = await platform.catalog.snapshot()
    tagged = sorted({(t.removeprefix("urlprefix-"), e.data.get("Service", "")) for e in snap.services.values()
                     for t in (e.data.get("Tags") or []) if t.startswith("urlprefix-")})
    return {"services": services, "routes": routes, "consumers": await _records(platform, CONSUMERS),
            "plugins": await _records(platform, PLUGINS), "tagged": tagged, "denied": False,
            "metrics": await route_metrics(platform)}


def _labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text))


def _percentile(buckets: list[tuple[float, float]], count: float, q: float) -> str:
    """The upper bound of the histogram bucket holding the q-quantile (what Prometheus' histogram_quantile
    interpolates within)."""
    below = 0.0
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return f"> {below * 1000:g} ms" if bound == float("inf") else f"≤ {bound * 1000:g} ms"
        below = bound
    return ""


async def route_metrics(platform: Platform) -> list[dict[str, Any]] | None:
    """Per service and route: requests, error rate and latency percentiles, from the prometheus plugin's series
    (the same text GET /api/gateway/metrics serves); None when the gateway does not run here."""
    supervisor = platform.extras.get("gateway")
    if not isinstance(supervisor, GatewaySupervisor):
        return None
    text = await asyncio.to_thread(supervisor.metrics_text)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if match is None:
            continue
        name, labels, value = match.group(1), _labels(match.group(2)), float(match.group(3))
        row = rows.setdefault((labels.get("service", ""), labels.get("route", "")),
                              {"requests": 0.0, "errors": 0.0, "buckets": {}})
        if name == REQUESTS:
            row["requests"] += value
            row["errors"] += value if labels.get("status_class") == "5xx" else 0.0
        elif name == LATENCY + "_bucket":  # summed over consumers when the plugin labels them
            bound = float(labels.get("le", "inf").replace("+Inf", "inf"))
            row["buckets"][bound] = row["buckets"].get(bound, 0.0) + value
    out = []
    for (service_name, route), row in sorted(rows.items()):
        count = row["requests"]
        if not count:
            continue
        buckets = sorted(row["buckets"].items())
        out.append({"service": service_name, "route": route, "requests": int(count),
                    "error_pct": round(100 * row["errors"] / count, 1),
                    "p50": _percentile(buckets, count, 0.5), "p95": _percentile(buckets, count, 0.95),
                    "p99": _percentile(buckets, count, 0.99)})
    return out


async def bus(platform: Platform, auth: Authorizer | None, selected: str = "") -> dict[str, Any]:
    broker = platform.extras.get("bus")
    if not isinstance(broker, Bus):
        return {"queues": [], "status": {}, "selected": "", "dead": []}
    queues = [asdict(s) for s in await broker.stats() if can(auth, "bus", s.queue)]
    dead: list[dict[str, Any]] = []
    if selected and can(auth, "bus", selected):
        dead = [{"id": m.id, "body": m.body.decode(errors="replace")[:500], "attempts": m.attempts,
                 "error": m.error, "failed": when(m.failed_at), "topic": m.topic}
                for m in await broker.dead_letters(selected, 50)]
    return {"queues": queues, "status": broker.status(), "selected": selected, "dead": dead}


def render_value(raw: bytes) -> tuple[str, str]:
    """(kind, text): JSON pretty-printed, YAML mappings as YAML, else text (or a note for binary)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", f"<{len(raw)} bytes of binary data>"
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return "json", orjson.dumps(orjson.loads(stripped), option=orjson.OPT_INDENT_2).decode()
        except orjson.JSONDecodeError:
            pass
    if "\n" in stripped and ":" in stripped:
        try:
            if isinstance(yaml.safe_load(stripped), dict):
                return "yaml", text
        except yaml.YAMLError:
            pass
    return "text", text


async def kv_list(platform: Platform, auth: Authorizer | None, prefix: str) -> dict[str, Any]:
    keys, _, _ = await platform.kv.keys(prefix, "/")
    visible = [k for k in keys if can(auth, "key", k)]
    crumbs, acc = [], ""
    for part in [p for p in prefix.split("/") if p]:
        acc += part + "/"
        crumbs.append({"name": part, "prefix": acc})
    return {"prefix": prefix, "crumbs": crumbs,
            "folders": [k for k in visible if k.endswith("/")], "keys": [k for k in visible if not k.endswith("/")]}


async def kv_entry(platform: Platform, key: str) -> dict[str, Any] | None:
    entry, _, _ = await platform.kv.get(key)
    if entry is None:
        return None
    kind, shown = render_value(entry.value)
    return {"key": entry.key, "value": entry.value.decode(errors="replace"), "kind": kind, "shown": shown,
            "flags": entry.flags, "modify_index": entry.modify_index, "session": entry.session}


async def logs(platform: Platform, alloc_id: str, stream: str, lines: int = 80, grep: str = "") -> list[str]:
    """The last `lines` of an instance's stream (those holding `grep`, among the last 5,000, when given)."""
    wanted = lines if not grep else 5000
    agent = platform.agent
    if agent is None:  # this server's node agent is its own process, as on every other node: ask it
        found = await _agent_logs(platform, alloc_id, stream, wanted)
    else:
        found = await _own_logs(agent, alloc_id, stream, wanted)
    if grep:
        found = [line for line in found if grep.lower() in line.lower()][-lines:]
    return found


async def _own_logs(agent: NodeAgent, alloc_id: str, stream: str, wanted: int) -> list[str]:
    try:
        path = agent.log_file(alloc_id, stream)
    except ShipyardError:  # an instance that never ran on this node, or a stream name not offered
        return []
    if not path.exists():
        return []
    return await asyncio.to_thread(read_tail_lines, path, wanted)


async def _agent_logs(platform: Platform, alloc_id: str, stream: str, wanted: int) -> list[str]:
    remote = await logs_agent_of(platform.store, alloc_id, platform.node.name)
    if remote is None:
        return []
    return await agent_log_lines(remote, alloc_id, stream, wanted, platform.config.tls)
