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
class DnsConfig:
    """Consul's `domain`, `alt_domain`, `recursors` and `dns_config` keys, with durations in seconds.

    One place for them, so that flags and a Consul config file fill the same fields.
    """

    domain: str = "consul."
    alt_domain: str = ""  # "": none
    recursors: list[str] = field(default_factory=list)  # "host", "host:port", "[v6]:port"
    recursor_strategy: str = "sequential"  # or "random"
    recursor_timeout: float = 2.0
    only_passing: bool = False
    node_ttl: float = 0.0
    service_ttl: dict[str, float] = field(default_factory=dict)  # name, or prefix ending in "*"
    a_record_limit: int = 0  # 0: no limit
    udp_answer_limit: int = 3
    enable_truncate: bool = False
    allow_stale: bool = True
    max_stale: float = 87600 * 3600.0
    enable_additional_node_meta_txt: bool = True
    soa_refresh: int = 3600
    soa_retry: int = 600
    soa_expire: int = 86400
    soa_min_ttl: int = 0


@dataclass
class TlsConfig:
    """Consul's `tls { defaults { ca_file, cert_file, key_file, verify_incoming } }` and `ports { https }`, plus the
    gateway's TLS listener; flags and a Consul config file fill the same fields. No cert_file: no TLS."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    verify_incoming: bool = False
    https_port: int = 8501
    gateway_port: int = 0  # --gateway-tls-port; 0: the gateway serves plain HTTP only
    gateway_cert_file: str = ""  # default certificate of the gateway's TLS port ("": a self-signed one)
    gateway_key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass
class ServerConfig:
    data_dir: str | None  # None: --dev, state in memory only
    bind: str = "127.0.0.1"
    http_port: int = 8500
    dns_port: int = 8600  # 0: no DNS interface
    node_name: str = ""
    datacenter: str = "dc1"
    enable_script_checks: bool = False
    http_check_output: bool = False  # HTTP checks record the response body (Consul does; an SSRF read-back)
    insecure_bind: bool = False
    store_url: str = ""  # "": embedded SQLite in data_dir; "etcd://host:port[/namespace]": an etcd cluster
    drain_delay: float = 1.0  # seconds between deregistering an instance and signalling it
    gateway_port: int = 0  # 0: no gateway workers (the CLI defaults to 8080; --no-gateway gives 0)
    gateway_workers: int = 0  # 0: one per core
    bus_url: str = ""  # "": the embedded broker; "rabbitmq://user:pass@host:port/vhost" (or amqp://): RabbitMQ
    single_server: bool = False  # on etcd: this is the only server (allows the embedded bus)
    leader_ttl: int = 3  # on etcd: seconds of the leadership lease (a dead leader is replaced within about this)
    node_lost_after: float = 15.0  # in a cluster: seconds a server may be gone before its instances are replaced
    reconnect_timeout: float = 72 * 3600.0  # Consul's: a member failed or left this long is reaped (0: never)
    etcd_compaction_interval: float = 300.0  # on etcd: the leader compacts history this often (0: never)
    # "process": the server starts `shipyard agent` for its own node (api/local_agent.py); "embedded": the same
    # NodeAgent inside the server process (the way before; kept for a machine that cannot spare the process).
    node_agent: str = "process"
    node_meta: dict[str, str] = field(default_factory=dict)  # this server's node: catalog NodeMeta, ${meta.*}
    node_class: str = ""  # this server's node: ${node.class} in placement constraints
    gateway_sync: float = 0.1  # in a cluster: seconds between syncs of the gateway's rate-limit counts via etcd
    dns: DnsConfig = field(default_factory=DnsConfig)
    vault_port: int = 8200  # the Vault-compatible secrets engine's listener; 0: none
    vault_port_required: bool = False  # given explicitly: taken is an error (the default 8200 taken is a warning)
    vault_dev: bool = False  # the secrets engine initialises and unseals itself (--dev, `shipyard up`)
    vault_dev_root_token: str = ""  # dev mode: this root token instead of a random one
    allowed_hosts: tuple[str, ...] = ()  # Host names the control API answers besides loopback and its own addresses
    tls: TlsConfig = field(default_factory=TlsConfig)
    acl: bool = False  # --acl: Consul's ACL system guards every API (docs/acl.md)
    acl_default_policy: str = "deny"  # what a token may do that no rule of it names: "allow" or "deny"
    acl_initial_management: str = ""  # a SecretID made a global-management token at start (Consul's initial_management)
    acl_default_token: str = ""  # Consul's acl.tokens.default: the token of requests that send none
    acl_agent_token: str = ""  # Consul's acl.tokens.agent (kept; this server's own processes get their own tokens)
    acl_dns_token: str = ""  # Consul's acl.tokens.dns: the token DNS answers as (else the default token)
    # Consul's acl.enable_token_persistence: tokens set through /v1/agent/token/* kept in data_dir/acl-tokens.json
    acl_token_persistence: bool = False


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
