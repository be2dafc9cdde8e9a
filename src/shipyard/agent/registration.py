"""How a running instance appears in the service catalog: its service record and its health check, built from
the job spec and the ports the instance got. Pure functions; it must never write the catalog or run a check."""

from __future__ import annotations

from typing import Any

from shipyard.registry.catalog import CRITICAL
from shipyard.spec import HealthCheck
from shipyard.spec import TaskSpec as JobSpec

# Outputs the agent writes itself (instance exited, restarting...) start with this, so they are never
# mistaken for a probe result when counting failures.
AGENT_OUTPUT_PREFIX = "shipyard agent: "
MIN_TTL = 10.0


def check_id_for(alloc_id: str) -> str:
    """The id Consul gives a service's only check: service:<service id>."""
    return f"service:{alloc_id}"


INSTANCE_CHECK_NOTES = "shipyard: "


def is_instance_check(check: dict[str, Any]) -> bool:
    """Whether a check record is one a node agent registered for an instance it runs (check_record below), as
    opposed to one registered through the Consul API: a server whose node agent is its own process probes only the
    latter, that agent only the former."""
    service_id = check.get("ServiceID") or ""
    return (isinstance(service_id, str) and bool(service_id) and check.get("CheckID") == check_id_for(service_id)
            and str(check.get("Notes", "")).startswith(INSTANCE_CHECK_NOTES))


def _duration_text(seconds: float) -> str:
    if seconds <= 0:
        return ""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"


def service_record(
    spec: JobSpec, *, alloc_id: str, index: int, version: int, address: str, ports: dict[str, int]
) -> dict[str, Any]:
    """The instance as a Consul agent service: name = job id, ID = alloc id, the first port as Port."""
    meta = {str(k): str(v) for k, v in spec.meta.items()}
    # Platform keys win over the spec's: they are what the gateway and the CLI rely on.
    meta.update({"version": str(version), "shipyard-alloc": alloc_id, "shipyard-instance": str(index)})
    for name, port in ports.items():
        meta[f"port-{name}"] = str(port)
    port = next(iter(ports.values()), 0)
    return {
        "ID": alloc_id,
        "Service": spec.name,
        "Tags": list(spec.tags),
        "Meta": meta,
        "Port": port,
        "Address": address,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
    }


def check_record(
    health: HealthCheck, *, job: str, alloc_id: str, address: str, ports: dict[str, int]
) -> dict[str, Any]:
    """The instance's check in Consul's HealthCheck shape; it starts critical, as Consul's checks do.

    http and tcp checks are run by the health checker; a command check is a TTL check the agent feeds, because
    the command must run with the instance's environment and the checker runs scripts without it."""
    interval, timeout = health.interval, health.timeout
    definition: dict[str, Any] = {
        "Interval": _duration_text(interval),
        "Timeout": _duration_text(timeout),
        "DeregisterCriticalServiceAfter": "",
        "IntervalDuration": int(interval * 1e9),
        "TimeoutDuration": int(timeout * 1e9),
        "TTLDuration": 0,
        "DeregisterCriticalServiceAfterDuration": 0,
    }
    if health.kind == "http":
        port = ports.get(health.port or "", next(iter(ports.values()), 0))
        kind = "http"
        definition.update({
            "HTTP": f"http://{address}:{port}{health.target}", "Header": {}, "Method": "", "Body": "",
            "TLSServerName": "", "TLSSkipVerify": False, "DisableRedirects": False,
        })  # fmt: skip
    elif health.kind == "tcp":
        kind = "tcp"
        definition["TCP"] = f"{address}:{ports.get(health.target, 0)}"
    else:
        kind = "ttl"
        # Long enough that only an agent that stopped feeding it (not a slow command) lets it expire.
        ttl = max(MIN_TTL, 3 * interval + timeout)
        definition.update({"Interval": "", "IntervalDuration": 0, "TTL": _duration_text(ttl),
                           "TTLDuration": int(ttl * 1e9)})
        interval = 0.0
    return {
        "CheckID": check_id_for(alloc_id),
        "Name": f"Service '{job}' check",
        "Status": CRITICAL,
        "Notes": f"{INSTANCE_CHECK_NOTES}{health.kind} {health.target}",
        "Output": "",
        "ServiceID": alloc_id,
        "ServiceName": job,
        "ServiceTags": [],
        "Type": kind,
        "Interval": _duration_text(interval),
        "Timeout": _duration_text(timeout),
        "ExposedPort": 0,
        "Definition": definition,
    }
