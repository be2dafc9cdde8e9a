"""Marathon's whole-deployment endpoints: /v2/groups (the app tree), /v2/queue, /v2/eventSubscriptions, /metrics.

Views over the same JobService state the /v2/apps endpoints read; it must never write the store itself.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from shipyard.api.context import platform_of
from shipyard.api.marathon.apps import app_id_of, job_id_of
from shipyard.api.marathon.endpoints import app_states, jobs_of, marathon_json
from shipyard.api.marathon.views import AppState, app_json, iso, task_state
from shipyard.errors import BadRequest, NotFound

routes = web.RouteTableDef()

DROPWIZARD_VERSION = "4.0.0"  # the metrics JSON format Marathon 1.7+ serves at /metrics
# What Marathon answers when it runs without `--event_subscriber http_callback`, as this deployment does:
# its events are served as a stream at /v2/events instead (marathon-python's event_stream()).
NO_CALLBACKS = ('http event callback system is not running on this Marathon instance. Please re-start this '
                'instance with "--event_subscriber http_callback". (Shipyard serves events as a stream: '
                'GET /v2/events)')


# ---- /v2/groups ---------------------------------------------------------------------------------------------


def group_tree(apps: list[dict[str, Any]]) -> dict[str, Any]:
    """The root group with every app under the group its id names ("/shop/web" is app web in group /shop)."""
    version = max((a["version"] for a in apps if a.get("version")), default=iso(0.0))
    root = _new_group("/", version)
    index = {"/": root}
    for app in sorted(apps, key=lambda a: str(a["id"])):
        parent = str(app["id"]).rsplit("/", 1)[0] or "/"
        _group(index, parent, version)["apps"].append(app)
    return root


def _new_group(group_id: str, version: str | None) -> dict[str, Any]:
    # No enforceRole (Marathon 1.9+): marathon-python 0.13 builds groups with keyword arguments and refuses it.
    return {"id": group_id, "apps": [], "groups": [], "pods": [], "dependencies": [], "version": version}


def _group(index: dict[str, dict[str, Any]], group_id: str, version: str | None) -> dict[str, Any]:
    if group_id not in index:
        parent = _group(index, group_id.rsplit("/", 1)[0] or "/", version)
        index[group_id] = _new_group(group_id, version)
        parent["groups"].append(index[group_id])
    return index[group_id]


def find_group(root: dict[str, Any], group_id: str) -> dict[str, Any] | None:
    if root["id"] == group_id:
        return root
    for child in root["groups"]:
        found = find_group(child, group_id)
        if found is not None:
            return found
    return None


async def current_tree(request: web.Request) -> dict[str, Any]:
    jobs = jobs_of(request)
    states = await app_states(jobs, await jobs.list())
    return group_tree([app_json(s, embed_tasks=False) for s in states])


def group_path(request: web.Request) -> str:
    return "/" + request.match_info.get("group_id", "").strip("/")


@routes.get("/groups")
@routes.get("/groups/")
@routes.get("/groups/{group_id:.+}")
async def get_group(request: web.Request) -> web.Response:
    wanted = group_path(request)
    group = find_group(await current_tree(request), wanted)
    if group is None:
        raise NotFound(f"Group '{wanted}' does not exist")
    return marathon_json(group)


@routes.delete("/groups/{group_id:.+}")
async def delete_group(request: web.Request) -> web.Response:
    """Deletes every app in the group and its subgroups (a group is only the common prefix of app ids here)."""
    wanted = group_path(request)
    group = find_group(await current_tree(request), wanted)
    if group is None:
        raise NotFound(f"Group '{wanted}' does not exist")
    jobs = jobs_of(request)
    for app_id in _app_ids(group):
        try:
            await jobs.delete(job_id_of(app_id))
        except NotFound:
            pass  # deleted meanwhile
    now = iso(time.time())
    return marathon_json({"deploymentId": f"group{wanted.replace('/', '--')}.deleted.{now}", "version": now})


def _app_ids(group: dict[str, Any]) -> list[str]:
    return [a["id"] for a in group["apps"]] + [i for g in group["groups"] for i in _app_ids(g)]


# ---- /v2/queue ----------------------------------------------------------------------------------------------


# The scheduler's reasons for leaving a node out, as Marathon's offer reject reasons, in the order it applies them.
REJECT_REASONS = (("ineligible", "AgentMaintenance"), ("constraint", "UnfulfilledConstraint"),
                  ("distinct", "UnfulfilledConstraint"), ("memory", "InsufficientMemory"), ("cpu", "InsufficientCpus"))


def offers_summary(unplaceable: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """Marathon's processedOffersSummary from the scheduler's last try: each node is an offer, and the reject
    summary is a funnel (each reason's `processed` is what was left after the reasons before it)."""
    nodes = (unplaceable or {}).get("nodes")
    if not isinstance(nodes, dict):
        return None
    processed = int(nodes.get("nodes", 0))
    declined_by: dict[str, int] = {}
    for key, reason in REJECT_REASONS:
        declined_by[reason] = declined_by.get(reason, 0) + int(nodes.get(key, 0))
    summary = []
    for reason, declined in declined_by.items():
        summary.append({"reason": reason, "declined": declined, "processed": processed})
        processed -= declined
    assert unplaceable is not None
    return {"processedOffersCount": int(nodes.get("nodes", 0)), "unusedOffersCount": int(nodes.get("nodes", 0)),
            "lastUnusedOfferAt": iso(float(unplaceable.get("since", now))), "lastUsedOfferAt": None,
            "rejectSummaryLastOffers": summary, "rejectSummaryLaunchAttempt": summary}


def queue_item(state: AppState, now: float, unplaceable: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An app with instances still to launch: how many, how long its restart backoff still holds them, and (when the
    scheduler could not place some) why, as Marathon's offer summary plus the scheduler's own sentence."""
    if state.job.status != "running":
        return None
    wanted = [(a, s) for a, s in state.tasks if a.desired == "run"]
    # A process that runs is launched; one waiting for its start or in restart backoff (shown as a running task
    # whose process is gone, as a Marathon task being relaunched) is still to launch.
    waiting = [(a, s) for a, s in wanted if s is None or s.pid is None]
    count = state.job.spec.instances - (len(wanted) - len(waiting))
    if count <= 0:
        return None
    waits = [s.next_restart_at - now for _, s in waiting if s is not None and s.next_restart_at is not None]
    left = max(0, round(max(waits, default=0.0)))
    since = min((a.created_at for a, _ in waiting), default=now)
    item = {"app": app_json(state, embed_tasks=False), "count": count, "since": iso(since), "overdue": False,
            "delay": {"timeLeftSeconds": left, "overdue": False}}
    summary = offers_summary(unplaceable, now)
    if summary is not None and unplaceable is not None:
        item["processedOffersSummary"] = summary
        item["unplaceable"] = {"count": unplaceable.get("count"), "reason": unplaceable.get("reason")}
    return item


@routes.get("/queue")
async def list_queue(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    now = time.time()
    unplaceable = await jobs.unplaceables()
    items = [queue_item(s, now, unplaceable.get(s.job.id)) for s in await app_states(jobs, await jobs.list())]
    return marathon_json({"queue": [i for i in items if i is not None]})


# ---- /v2/eventSubscriptions ---------------------------------------------------------------------------------


@routes.route("*", "/eventSubscriptions")
async def event_subscriptions(request: web.Request) -> web.Response:
    raise BadRequest(NO_CALLBACKS)


# ---- /metrics -----------------------------------------------------------------------------------------------


async def metrics(request: web.Request) -> web.Response:
    """Marathon's /metrics: Dropwizard metrics JSON, with the gauges Marathon keeps about apps and instances."""
    platform = platform_of(request)
    jobs = jobs_of(request)
    states = await app_states(jobs, await jobs.list())
    live = [task_state(a, s) for st in states for a, s in st.tasks if a.desired == "run"]
    gauges = {
        "marathon.apps.active.gauge": len(states),
        "marathon.groups.active.gauge": _count_groups(group_tree([{"id": app_id_of(st.job.id)} for st in states])),
        "marathon.pods.active.gauge": 0,
        "marathon.deployments.active.gauge": sum(len(st.deployments) for st in states),
        "marathon.instances.running.gauge": live.count("TASK_RUNNING"),
        "marathon.instances.staged.gauge": live.count("TASK_STAGING"),
        "marathon.instances.launch-overdue.gauge": 0,
        "marathon.uptime.gauge": round((time.time() - platform.started_at) * 1000),
        "marathon.leadership.duration.gauge": round((time.time() - platform.started_at) * 1000),
    }
    return marathon_json({"version": DROPWIZARD_VERSION, "gauges": {k: {"value": v} for k, v in gauges.items()},
                          "counters": {}, "histograms": {}, "meters": {}, "timers": {}})


def _count_groups(group: dict[str, Any]) -> int:
    return sum(1 + _count_groups(g) for g in group["groups"])
