"""Composition root of `shipyard agent`: a node without a server. It reaches the servers' store over HTTP
(RemoteStore, failing over between --server URLs), registers its node, heartbeats on a lease, runs the instances the
scheduler places on its node (the same NodeAgent a server runs for itself), probes their checks locally, serves
their logs to the servers on a small listener, serves the HTTP API to its instances on 127.0.0.1 by forwarding to
the servers (api/agent_forward.py), answers Consul DNS and, with --gateway, runs gateway workers
(api/agent_entry.py).

It wires parts together and runs them; it never decides placement, and it never stops an instance because the
servers cannot be reached (only because its allocations are gone, once it sees that they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import ssl
import sys
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web

from shipyard.acl.state import ACLState, derived_secret, internal_key
from shipyard.agent.node_agent import DEFAULT_DRAIN_DELAY, NodeAgent
from shipyard.agent.registration import is_instance_check
from shipyard.api.agent_entry import (
    DEFAULT_DNS_PORT,
    AgentEntry,
    EntryConfig,
    acls_on,
    check_entry_ports,
    check_gateway_bind,
)
from shipyard.api.agent_forward import DEFAULT_HTTP_PORT, Forwarder
from shipyard.api.agent_metrics import METRICS_PATH, MetricsSource, add_metrics_route
from shipyard.api.agent_secrets import AgentSecrets
from shipyard.api.errors import error_middleware
from shipyard.api.machine import is_loopback, lock_data_dir
from shipyard.api.native.agent_logs import AGENT_LOGS, secret_middleware
from shipyard.api.native.logs_api import routes as log_routes
from shipyard.api.native.usage_relay import routes as usage_routes
from shipyard.api.ports import check_ports_free
from shipyard.api.vault.delivery import files_root_for
from shipyard.errors import ShipyardError
from shipyard.private_files import make_data_dir_private, make_process_private
from shipyard.registry.agents import DEFAULT_AGENT_TTL, AgentHeartbeat, AgentInfo
from shipyard.registry.catalog import Catalog
from shipyard.registry.health import HealthChecker
from shipyard.registry.node import NodeIdentity
from shipyard.scheduler.model import Allocation
from shipyard.spec import TaskSpec
from shipyard.store import StoreError
from shipyard.store.remote import RemoteStore
from shipyard.tasks import cancel_and_wait
from shipyard.tls.contexts import client_context, server_context
from shipyard.tokens import TOKEN_VARIABLES

log = logging.getLogger("shipyard.agent")

DEFAULT_AGENT_PORT = 8510
# Calls to a server give up quickly, so a cut link is noticed within a heartbeat or two (watches have their own).
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=3)
FIRST_CONTACT_RETRY = 1.0
TOKEN_SWEEP_EVERY = 5.0  # how soon the token of a service that left this node is deleted


@dataclass
class AgentConfig:
    servers: list[str]  # control API URLs of the cluster's servers, tried in order
    node_name: str
    advertise: str  # this machine's address: instances, checks and the logs listener use it
    data_dir: str
    meta: dict[str, str] = field(default_factory=dict)
    node_class: str = ""
    port: int = DEFAULT_AGENT_PORT  # the logs listener (0: an ephemeral port)
    datacenter: str = "dc1"
    token: str | None = None  # ACL token for the servers (None: SHIPYARD_HTTP_TOKEN / CONSUL_HTTP_TOKEN)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    cpu_mhz: int | None = None
    memory_mb: int | None = None
    ttl: int = DEFAULT_AGENT_TTL
    drain_delay: float = DEFAULT_DRAIN_DELAY
    enable_script_checks: bool = False
    dns_port: int = DEFAULT_DNS_PORT  # 0: no DNS
    dns_token: str = ""
    gateway_port: int = 0  # 0: no gateway workers
    gateway_workers: int = 1
    gateway_tls_port: int = 0  # the gateway's HTTPS port (0: none)
    gateway_tls_cert: str = ""  # its default certificate ("": self-signed); the admin API's certificates by SNI
    gateway_tls_key: str = ""
    insecure_bind: bool = False  # DNS and the gateway may face the network without TLS and ACLs
    http_port: int = DEFAULT_HTTP_PORT  # the local API on 127.0.0.1, forwarded to the servers (0: none)
    # Set when a server starts this agent as its own node's (api/local_agent.py): the server's pid (the agent dies
    # with it, takes no lock on the data dir the server holds, probes only its instances' checks), the node's id,
    # what instances are told about the platform (the server's own env), and whether instances stop with it (--dev).
    server_pid: int = 0
    node_id: str = ""
    instance_env: dict[str, str] = field(default_factory=dict)
    stop_instances_on_exit: bool = False

    def entry(self) -> EntryConfig:
        return EntryConfig(address=self.advertise, servers=self.servers, token=self.token, ca_file=self.ca_file,
                           cert_file=self.cert_file, key_file=self.key_file, dns_port=self.dns_port,
                           dns_token=self.dns_token, gateway_port=self.gateway_port,
                           gateway_workers=self.gateway_workers, gateway_tls_port=self.gateway_tls_port,
                           gateway_tls_cert=self.gateway_tls_cert, gateway_tls_key=self.gateway_tls_key,
                           insecure_bind=self.insecure_bind)


def server_url(raw: str) -> str:
    """host:port, or a full http(s) URL, as a URL (a bare address means plain HTTP, as --http-addr does)."""
    url = raw.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ShipyardError(f"--server {raw!r}: give host:port or http(s)://host:port", status=2)
    return url


def instance_env(config: AgentConfig, url: str, local_port: int = 0) -> dict[str, str]:
    """What every instance is told: where it calls the catalog and KV (the agent's local API when it has one, so a
    server failover needs nothing from it; else `url`, the server that answers the agent now), the bus (a server:
    the embedded bus is a WebSocket the local API does not forward), the CA when that is HTTPS, and the platform's
    own python/shipyard on PATH (as a server does)."""
    api = f"127.0.0.1:{local_port}" if local_port else url.removeprefix("http://")
    env = {"SHIPYARD_HTTP_ADDR": api, "CONSUL_HTTP_ADDR": api, "SHIPYARD_BUS_URL": url}
    if url.startswith("https://") and config.ca_file:
        env["SHIPYARD_CACERT"] = os.path.abspath(config.ca_file)
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), os.environ.get("PATH", "")) if p)
    return env


class ServiceTokens:
    """With ACLs on at the servers, each instance's SHIPYARD_HTTP_TOKEN / CONSUL_HTTP_TOKEN: its service's token for
    this node, whose SecretID the agent derives from its own key (<data dir>/acl-internal.key) and has a server store
    (api/native/service_tokens_api.py) once per service, and delete once it runs no instance of that service.
    Delivered as secret env (memory only, over the shim's pipe), never written to disk or logged."""

    def __init__(self, store: RemoteStore, agent: NodeAgent, key: bytes) -> None:
        self.store = store
        self.agent = agent
        self.key = key
        self.made: dict[str, str] = {}  # service -> SecretID a server has stored

    def _path(self, service: str) -> str:
        return f"/api/v1/nodes/{quote(self.agent.node.name, safe='')}/service-tokens/{quote(service, safe='')}"

    async def _make(self, service: str) -> str | None:
        secret = derived_secret(self.key, f"service:{service}@{self.agent.node.name}")
        try:
            await self.store._call("PUT", self._path(service), json_body={"SecretID": secret})  # its failover
        except StoreError as exc:
            log.warning("%s: no ACL token for its instances (%s)", service, exc.message)
            return None
        self.made[service] = secret
        return secret

    async def env_for(self, spec: TaskSpec, alloc: Allocation) -> dict[str, str]:
        secret = self.made.get(spec.name) or await self._make(spec.name)
        return dict.fromkeys(TOKEN_VARIABLES, secret) if secret else {}

    def _running(self) -> set[str]:
        return {runner.alloc.job for runner in self.agent.runners.values()}

    async def sweep(self) -> None:
        """Deletes the tokens of services this node runs no instance of any more (one started meanwhile gets its
        token made again)."""
        for service in [s for s in self.made if s not in self._running()]:
            del self.made[service]
            try:
                await self.store._call("DELETE", self._path(service))
            except StoreError as exc:
                log.warning("%s: its ACL token stays for now (%s)", service, exc.message)
                self.made.setdefault(service, "")  # tried again at the next sweep
                continue
            if service in self.made or service in self._running():
                await self._make(service)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_SWEEP_EVERY)
            try:
                await self.sweep()
            except Exception:  # the next sweep tries again; the agent goes on
                log.exception("sweeping the tokens of services that left this node")


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    if not any(url.startswith("https://") for url in config.servers):
        return None
    return client_context(config.ca_file, config.cert_file, config.key_file)


class RemoteAgent:
    """The parts of one agent process and their order of start, return and stop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = RemoteStore(config.servers, ssl_context=tls_context(config), token=config.token,
                                 timeout=CALL_TIMEOUT)
        self.node = NodeIdentity.load(config.data_dir, name=config.node_name, address=config.advertise,
                                      datacenter=config.datacenter)
        if config.node_id:
            self.node = replace(self.node, id=config.node_id)
        self.catalog = Catalog(self.store, self.node, node_meta=config.meta)
        self.health = HealthChecker(self.store, self.catalog, self.node,
                                    enable_script_checks=config.enable_script_checks,
                                    runs=is_instance_check if config.server_pid else None)
        capacity = (config.cpu_mhz, config.memory_mb) if config.cpu_mhz and config.memory_mb else None
        self.agent = NodeAgent(self.store, self.catalog, self.node, os.path.join(config.data_dir, "agent"),
                               config.drain_delay, health=self.health, capacity=capacity,
                               keep_instances_on_stop=not config.stop_instances_on_exit,
                               platform_env=dict(config.instance_env) or instance_env(config, config.servers[0]))
        self.agent.meta = dict(config.meta)
        self.agent.node_class = config.node_class
        self.secret = secrets.token_urlsafe(32)
        self.runner: web.AppRunner | None = None
        self.heartbeat: AgentHeartbeat | None = None
        self.entry = AgentEntry(config.entry(), self.store, self.catalog, config.data_dir)
        self.forwarder = Forwarder(config.servers, tls_context(config)) if config.http_port else None
        self.local_port = 0
        self.acl: ACLState | None = None  # with ACLs on at the servers: what the local /v1/agent/* routes enforce
        self.sweeping: asyncio.Task[None] | None = None
        self.secrets: AgentSecrets | None = None

    async def _partial_capacity(self) -> None:
        """Only one of --cpu-mhz / --memory-mb given: the other is detected."""
        if self.agent.capacity is None and (self.config.cpu_mhz or self.config.memory_mb):
            from shipyard.agent.node_agent import machine_capacity

            cpu, memory = await asyncio.to_thread(machine_capacity)
            self.agent.capacity = (self.config.cpu_mhz or cpu, self.config.memory_mb or memory)

    async def start(self) -> None:
        await self._partial_capacity()
        port = await self._listen()
        await self._first_contact()
        if await acls_on(self.store):
            tokens = ServiceTokens(self.store, self.agent, internal_key(self.config.data_dir))
            self.agent.instance_env = tokens.env_for
            self.sweeping = asyncio.create_task(tokens.sweep_forever(), name="service token sweep")
            # Fail closed, as the agent's DNS: the servers' default policy is not in the store.
            self.acl = ACLState(self.store, default_allow=False)
            await self.acl.start()
        # Instances with secrets get them from a server at each start (after their ACL token).
        self.secrets = AgentSecrets(self.store, self.agent, files_root_for(self.config.data_dir))
        self.secrets.attach()
        if self.forwarder is not None:
            from shipyard.api.agent_local import add_local_routes, local_platform  # the Consul API: not for all

            platform = local_platform(self.store, self.node, self.catalog, self.health)
            self.local_port = await self.forwarder.start(
                self.config.http_port, lambda app: add_local_routes(app, platform, self.acl))
        self._follow_server()
        info = AgentInfo(self.node.name, self.node.id, self.agent.address, port, self.node.datacenter,
                         dict(self.config.meta), self.secret, self.config.ttl, self.serves_tls)
        self.heartbeat = AgentHeartbeat(self.store, info, ttl=self.config.ttl, on_rejoined=self.rejoin,
                                        on_beat=self._follow_server)
        await self.heartbeat.start()
        await self.catalog.start()  # its node, with its meta and a passing serfHealth
        # Adoption first: what was replaced while this agent was down is deregistered and stopped before its checker
        # could probe it passing again.
        await self.agent.start()  # its node record for placement, adoption, then its allocations
        await self.health.start()
        await self.entry.start(port)  # DNS and gateway workers: this machine as an entry point of the cluster
        log.info("shipyard agent ready: node %s at %s (logs on port %d, %s), servers %s, %s", self.node.name,
                 self.agent.address, port, "https" if self.serves_tls else "http", ", ".join(self.config.servers),
                 _capacity_summary(self.agent))

    def _follow_server(self) -> None:
        """Instances started from now on are told the server that answers now (the store moved on to the next
        --server when one stopped answering); running ones keep what they were given. A server's own node agent
        tells them what the server said."""
        if not self.config.instance_env:
            self.agent.platform_env.update(instance_env(self.config, self.store.base_url, self.local_port))

    async def _first_contact(self) -> None:
        """Waits for some server to answer (an agent may well start before them); a refused token is fatal."""
        said = False
        while True:
            try:
                await self.store.range("nodes/", prefix=True)
                return
            except StoreError as exc:
                if exc.status in (401, 403):
                    raise ShipyardError(f"the server at {self.store.base_url} refuses this agent's token "
                                        f"({exc.message}): give SHIPYARD_HTTP_TOKEN a token whose policy has "
                                        'store = "write"') from None
                if not said:
                    log.warning("no server answers yet (%s); trying every %.0fs", exc.message, FIRST_CONTACT_RETRY)
                    said = True
                await asyncio.sleep(FIRST_CONTACT_RETRY)

    async def _listen(self) -> int:
        guard = secret_middleware(self.secret, own_guard=frozenset({METRICS_PATH}))
        app = web.Application(middlewares=[error_middleware, guard])
        app[AGENT_LOGS] = self.agent
        app.add_routes(log_routes)
        app.add_routes(usage_routes)  # its instances' CPU and memory, for the servers' views
        # Its gateway's metrics, for Prometheus to scrape here (api/agent_metrics.py says why here).
        add_metrics_route(app, MetricsSource(lambda: self.entry.gateway, lambda: self.acl,
                                             open_without_acl=self.config.insecure_bind
                                             or is_loopback(self.config.advertise)))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.agent.address, self.config.port, reuse_address=True,
                           ssl_context=self._listener_tls())
        try:
            await site.start()
        except OSError as exc:
            raise ShipyardError(f"cannot listen on {self.agent.address}:{self.config.port} (--port): "
                                f"{exc.strerror}") from None
        server = site._server  # the port actually bound (--port 0)
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    @property
    def serves_tls(self) -> bool:
        return bool(self.config.cert_file and self.config.key_file)

    def _listener_tls(self) -> ssl.SSLContext | None:
        """With a certificate (--client-cert, as a Consul agent's one cert_file serves both ways), the listener the
        servers fetch logs and usage from and Prometheus scrapes is HTTPS: the secret and the scrape's token do
        not cross the network in clear. Its certificate must name --advertise (`shipyard tls cert create --client
        --ip ADDR`): the servers check it as any HTTPS client would."""
        if not self.serves_tls:
            return None
        return server_context(self.config.cert_file, self.config.key_file, what="--client-cert")

    async def rejoin(self) -> None:
        """Back after its lease expired: first stop what was replaced meanwhile (it deregisters first), then say
        the node is live and placeable again, so a superseded instance is never counted as passing."""
        await self.agent.settle()
        await self.catalog.start()
        await self.agent.write_node()
        log.info("agent %s: live again (what was replaced while it was cut off is stopped)", self.node.name)

    async def stop(self) -> None:
        """Leaves (members show 3); instances keep running under their shims for the next agent on this data dir."""
        with contextlib.suppress(Exception):
            await self.entry.stop()  # the gateway first: its workers finish their requests while the node is live
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        with contextlib.suppress(Exception):
            await self.agent.stop()
        for part in (self.health, self.catalog):
            with contextlib.suppress(Exception):
                await part.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self.acl is not None:
            await self.acl.stop()
        if self.secrets is not None:
            await self.secrets.stop()
        await cancel_and_wait(self.sweeping)
        await self.store.close()


def _capacity_summary(agent: NodeAgent) -> str:
    if agent.capacity is None:
        return "capacity detected"
    return f"capacity {agent.capacity[0]} MHz, {agent.capacity[1]} MB"


async def run_agent(config: AgentConfig) -> None:
    """Runs an agent until SIGINT/SIGTERM."""
    check_gateway_bind(config.entry())
    check_entry_ports(config.entry(), config.port)
    check_ports_free("127.0.0.1", [(config.http_port, "--http-port", False)])
    make_process_private()
    make_data_dir_private(config.data_dir)
    # A server's own node agent shares the server's data dir, which the server has locked; it dies with the server.
    lock_fd = die_with(config.server_pid) if config.server_pid else lock_data_dir(config.data_dir)
    agent = RemoteAgent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(agent.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stop.wait()
        else:
            await cancel_and_wait(starting)
        stopped.cancel()
        log.info("shipyard agent stopping")
    finally:
        kept = len(agent.agent.runners) if not config.server_pid else 0  # its server says what keeps running
        await agent.stop()
        if kept:
            what = "1 instance keeps" if kept == 1 else f"{kept} instances keep"
            print(f"{what} running and will be adopted by the next agent started with --data-dir {config.data_dir}",
                  file=sys.stderr, flush=True)
        if lock_fd >= 0:
            os.close(lock_fd)


def die_with(server_pid: int) -> int:
    """Linux: SIGKILL this agent when the server that started it dies, even by kill -9, so that the server's next
    start finds no agent of the old one still at work on its data dir (instances live on under their shims and are
    adopted by the next agent). Exits now if that server is already gone. Returns -1: no lock is held."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != server_pid:
        raise ShipyardError(f"the server (pid {server_pid}) that started this node agent is gone", status=1)
    return -1
