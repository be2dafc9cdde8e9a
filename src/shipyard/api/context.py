"""The running platform as the HTTP edges see it: the store, this node, and the registry parts.

Built once by the server and shared read-only through the aiohttp app; it owns no logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from shipyard.agent.node_agent import NodeAgent
    from shipyard.registry.catalog import Catalog
    from shipyard.registry.health import HealthChecker
    from shipyard.registry.kv import ConsulKV
    from shipyard.registry.node import NodeIdentity
    from shipyard.registry.sessions import SessionManager
    from shipyard.scheduler.jobs import JobService
    from shipyard.scheduler.loop import SchedulerLoop
    from shipyard.store import Store


@dataclass
class ServerConfig:
    data_dir: str | None  # None: --dev, state in memory only
    bind: str = "127.0.0.1"
    http_port: int = 8500
    dns_port: int = 8600  # 0: no DNS interface
    node_name: str = ""
    datacenter: str = "dc1"
    enable_script_checks: bool = False
    insecure_bind: bool = False
    store_url: str = ""  # "": embedded SQLite in data_dir; "etcd://host:port[/namespace]": an etcd cluster
    drain_delay: float = 1.0  # seconds between deregistering an instance and signalling it
    gateway_port: int = 0  # 0: no gateway workers (the CLI defaults to 8080; --no-gateway gives 0)
    gateway_workers: int = 0  # 0: one per core
    bus_url: str = ""  # "": the embedded broker; "rabbitmq://user:pass@host:port/vhost" (or amqp://): RabbitMQ
    allowed_hosts: tuple[str, ...] = ()  # Host names the control API answers besides loopback and its own addresses


@dataclass
class Platform:
    config: ServerConfig
    store: Store
    node: NodeIdentity
    catalog: Catalog
    health: HealthChecker
    kv: ConsulKV
    sessions: SessionManager
    started_at: float = 0.0
    jobs: JobService | None = None
    scheduler: SchedulerLoop | None = None
    agent: NodeAgent | None = None
    extras: dict[str, object] = field(default_factory=dict)


PLATFORM: web.AppKey[Platform] = web.AppKey("platform", Platform)


def platform_of(request: web.Request) -> Platform:
    return request.app[PLATFORM]
