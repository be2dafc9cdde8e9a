"""Composition root of `shipyard server`: opens the store, builds the registry, serves the APIs.

It wires parts together and runs them; the behaviour lives in the parts, never here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from shipyard.acl.state import GATEWAY_RULES, ACLState, internal_key, service_rules
from shipyard.agent.adopt import count_live_instances
from shipyard.agent.node_agent import NodeAgent
from shipyard.agent.ports import port_is_free
from shipyard.agent.registration import is_instance_check
from shipyard.api.acl_guard import acl_middleware, dns_restriction
from shipyard.api.acl_table import rule_for as acl_rule_for
from shipyard.api.cluster import attach_cluster, check_cluster_bus, cluster_of, start_cluster, stop_cluster
from shipyard.api.cluster_gateway import start_gateway_counters, stop_gateway_counters
from shipyard.api.consul import add_consul_routes
from shipyard.api.consul.acl_api import ACL_STATE
from shipyard.api.context import PLATFORM, Platform, ServerConfig
from shipyard.api.dns import DnsServer
from shipyard.api.errors import error_middleware
from shipyard.api.guard import RequestGuard
from shipyard.api.https import HttpsListener
from shipyard.api.local_agent import NODE_AGENT, LocalNodeAgent, node_agent_rules
from shipyard.api.machine import gateway_certificate_files, is_loopback, lock_data_dir
from shipyard.api.marathon import add_marathon_routes
from shipyard.api.native import add_native_routes
from shipyard.api.native.gateway_api import seal_stored_keys
from shipyard.api.ports import check_ports_free
from shipyard.api.vault import VaultService
from shipyard.bus import Bus
from shipyard.bus.autoscaler import BusAutoscaler
from shipyard.bus.directory import DirectoryBus, QueueDirectory
from shipyard.bus.embedded import EmbeddedBroker
from shipyard.errors import ShipyardError
from shipyard.gateway.supervisor import GatewaySupervisor
from shipyard.private_files import make_data_dir_private, make_process_private
from shipyard.registry.catalog import Catalog
from shipyard.registry.health import HealthChecker
from shipyard.registry.kv import ConsulKV
from shipyard.registry.node import NodeIdentity, reachable_address
from shipyard.registry.sessions import SessionManager
from shipyard.scheduler.jobs import JobService
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.scheduler.model import Allocation
from shipyard.spec import TaskSpec
from shipyard.store import SqliteStore, Store, StoreError
from shipyard.store.etcd import EtcdStore
from shipyard.tls import server_context
from shipyard.tokens import TOKEN_VARIABLES
from shipyard.ui import add_ui_routes

log = logging.getLogger("shipyard.server")

# Consul's agent accepts bodies this large on its HTTP API; KV values are capped lower (512 KiB).
MAX_REQUEST_BODY = 8 << 20


async def open_store(config: ServerConfig) -> Store:
    """The embedded SQLite store by default; etcd when --store etcd://host:port[,host:port...][/namespace] is
    given (several members: one that cannot be reached is skipped)."""
    if config.store_url:
        parsed = urlsplit(config.store_url)
        if parsed.scheme not in ("etcd", "etcd+http") or not parsed.netloc:
            raise ShipyardError(f"unsupported --store {config.store_url!r}: use etcd://host:port[/namespace]")
        namespace = parsed.path.strip("/") + "/" if parsed.path.strip("/") else "shipyard/"
        members = ",".join(f"http://{member}" for member in parsed.netloc.split(",") if member)
        try:
            return await EtcdStore.open(members, namespace=namespace)
        except (StoreError, OSError, TimeoutError) as exc:
            raise ShipyardError(f"cannot use etcd at {parsed.netloc}: {exc}") from None
    db_path = None if config.data_dir is None else os.path.join(config.data_dir, "store.db")
    return await SqliteStore.open(db_path)


def check_bus_url(config: ServerConfig) -> None:
    if config.bus_url and urlsplit(config.bus_url).scheme not in ("rabbitmq", "amqp", "amqps"):
        raise ShipyardError(f"unsupported --bus {config.bus_url!r}: use amqp://user:pass@host:port/vhost "
                            "(amqps:// for TLS, rabbitmq:// means amqp://; or leave it out for the embedded bus)")


def local_control_url(config: ServerConfig) -> str:
    """How processes on this machine reach the control API: plain HTTP where it listens (on loopback once TLS is
    on), else the HTTPS port (they then need the CA: SHIPYARD_CACERT)."""
    tls = config.tls
    host = reachable_address(config.bind)
    if tls.enabled and not is_loopback(host):
        host = "127.0.0.1"  # plain HTTP is on loopback only; the certificates name 127.0.0.1 too
    scheme, port = ("http", config.http_port) if config.http_port or not tls.enabled else ("https", tls.https_port)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def platform_env(config: ServerConfig) -> dict[str, str]:
    """What every instance the agent starts is told about the platform: the control API and the bus."""
    url = local_control_url(config)
    http_addr = url.removeprefix("http://")
    env = {"SHIPYARD_HTTP_ADDR": http_addr, "SHIPYARD_BUS_URL": config.bus_url or url}
    if url.startswith("https://") and config.tls.ca_file:
        env["SHIPYARD_CACERT"] = os.path.abspath(config.tls.ca_file)
    # `python` and `shipyard` in a spec's cmd mean the platform's own (its venv), so services can use the
    # SDK and `shipyard worker` without knowing where Shipyard is installed.
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), os.environ.get("PATH", "")) if p)
    if config.bus_url:
        from shipyard.bus.rabbitmq import RabbitBus

        # Teams who bring their own Celery point it at the same broker (Celery wants amqp://).
        env["CELERY_BROKER_URL"] = RabbitBus(config.bus_url).amqp_url
    return env


async def open_bus(config: ServerConfig, store: Store) -> Bus:
    """The embedded broker (own SQLite file), or a RabbitMQ client whose queues the server lists from the store."""
    if config.bus_url:
        from shipyard.bus.rabbitmq import RabbitBus

        return DirectoryBus(RabbitBus(config.bus_url), QueueDirectory(store))
    # The bus keeps its own SQLite file: message traffic must not churn the revisioned store.
    return await EmbeddedBroker.open(None if config.data_dir is None else os.path.join(config.data_dir, "bus.db"))


async def build_platform(config: ServerConfig) -> Platform:
    check_bus_url(config)
    check_cluster_bus(config)
    store = await open_store(config)
    node = NodeIdentity.load(
        config.data_dir, name=config.node_name, address=config.bind, datacenter=config.datacenter
    )
    catalog = Catalog(store, node, node_meta=config.node_meta)
    own_process = config.node_agent == "process"
    # With its node agent a process of its own, the server probes only the checks registered through its API; the
    # agent probes its instances' (registration.is_instance_check).
    health = HealthChecker(store, catalog, node, enable_script_checks=config.enable_script_checks,
                           http_check_output=config.http_check_output,
                           runs=(lambda check: not is_instance_check(check)) if own_process else None)
    kv = ConsulKV(store)
    sessions = SessionManager(store, catalog, kv, node)
    platform = Platform(config, store, node, catalog, health, kv, sessions, started_at=time.time())
    platform.jobs = JobService(store, script_checks=health.scripts)
    platform.scheduler = SchedulerLoop(store)
    # Instances outlive the server under their shims; a --dev server has no data dir to adopt them from.
    if own_process:
        platform.extras[NODE_AGENT] = LocalNodeAgent(
            config, node, config.data_dir or tempfile.mkdtemp(prefix="shipyard-agent-"),
            control_url=local_control_url(config), instance_env=platform_env(config),
            stop_instances=config.data_dir is None)
    else:
        agent_dir = (
            os.path.join(config.data_dir, "agent") if config.data_dir is not None
            else tempfile.mkdtemp(prefix="shipyard-agent-")
        )
        platform.agent = NodeAgent(
            store, catalog, node, agent_dir, config.drain_delay,
            health=health, keep_instances_on_stop=config.data_dir is not None, platform_env=platform_env(config),
        )  # fmt: skip
        platform.agent.meta, platform.agent.node_class = dict(config.node_meta), config.node_class  # placement
    platform.extras["bus"] = bus = await open_bus(config, store)
    platform.extras["autoscaler"] = BusAutoscaler(platform.jobs, bus)
    if config.acl:
        platform.extras[ACL_STATE] = ACLState(store, default_allow=config.acl_default_policy == "allow")
    attach_cluster(platform)  # on etcd: the leader's loops run only while this server leads
    return platform


async def start_platform(platform: Platform) -> None:
    if sealed := await seal_stored_keys(platform.store):
        log.info("stored %d key-auth key(s) of an older version as hashes", sealed)
    acl = platform.extras.get(ACL_STATE)
    if isinstance(acl, ACLState):
        await acl.start(platform.config.acl_initial_management)
        acl.default_token = platform.config.acl_default_token
        if platform.config.acl_agent_token:
            acl.agent_tokens["agent"] = platform.config.acl_agent_token
        if platform.config.acl_dns_token:
            acl.set_agent_token("dns", platform.config.acl_dns_token, from_api=False)
        if platform.agent is not None:
            platform.agent.instance_env = service_token_env(acl, internal_key(platform.config.data_dir))
        local = platform.extras.get(NODE_AGENT)
        if isinstance(local, LocalNodeAgent):
            local.token = await acl.internal_token(internal_key(platform.config.data_dir), "node-agent",
                                                   node_agent_rules(platform.node.name))
    await platform.catalog.start()
    await platform.sessions.start()
    vault = platform.extras.get("vault")
    if isinstance(vault, VaultService):
        await attach_vault(vault, platform)
    if platform.agent is not None:
        await platform.agent.start()
    # Probing starts once the agent has deregistered what it ran for allocations replaced while this server was
    # down: probed first, a superseded instance still running would pass and be counted next to its replacement.
    await platform.health.start()
    bus = platform.extras.get("bus")
    if isinstance(bus, Bus):
        await bus.start()  # RabbitMQ: says now if it is unreachable, then keeps trying in the background
    await start_cluster(platform)  # the scheduler and the autoscaler: at once alone, once elected in a cluster


async def stop_platform(platform: Platform) -> None:
    await stop_cluster(platform)  # steps down first, so another server takes over while this one stops
    if platform.agent is not None:
        with contextlib.suppress(Exception):
            await platform.agent.stop()
        if platform.config.data_dir is None:
            shutil.rmtree(platform.agent.data_dir, ignore_errors=True)
    local = platform.extras.get(NODE_AGENT)
    if isinstance(local, LocalNodeAgent) and platform.config.data_dir is None:
        shutil.rmtree(local.data_dir, ignore_errors=True)  # a --dev server's: its agent has stopped
    for part in (platform.health, platform.sessions, platform.catalog):
        with contextlib.suppress(Exception):
            await part.stop()
    acl = platform.extras.get(ACL_STATE)
    if isinstance(acl, ACLState):
        await acl.stop()
    bus = platform.extras.get("bus")
    if isinstance(bus, Bus):
        with contextlib.suppress(Exception):
            await bus.close()
    await platform.store.close()


def service_token_env(acl: ACLState, key: bytes) -> Callable[[TaskSpec, Allocation], Awaitable[dict[str, str]]]:
    """With --acl, each instance gets its service's own token (SHIPYARD_HTTP_TOKEN): its service identity (register
    itself, read the catalog), its KV prefix, the bus (one token per service: the allocation does not matter)."""
    async def env_for(spec: TaskSpec, alloc: Allocation) -> dict[str, str]:
        try:
            secret = await acl.internal_token(key, f"service:{spec.name}", service_rules(spec.name),
                                              service=spec.name)
        except ShipyardError as exc:
            log.warning("%s: no ACL token for its instances (%s)", spec.name, exc.message)
            return {}
        return {TOKEN_VARIABLES[0]: secret}
    return env_for


def instances_left_running(platform: Platform) -> str:
    """What a stopping server says about the instances it leaves behind (they outlive it on purpose when there is
    a data dir, so that the next server adopts them); empty when it leaves none. Called once its node agent
    stopped."""
    agent, data_dir = platform.agent, platform.config.data_dir
    if data_dir is None:
        return ""
    if agent is None:
        count = count_live_instances(os.path.join(data_dir, "agent"))
    else:
        count = len(agent.runners) if agent.keep_instances_on_stop else 0
    if not count:
        return ""
    return (f"{count} instance{'s' if count != 1 else ''} keep running and will be adopted by the next server "
            f"started with --data-dir {data_dir}; `shipyard down --data-dir {data_dir}` stops them")


def bus_summary(platform: Platform) -> str:
    bus = platform.extras.get("bus")
    if not isinstance(bus, Bus):
        return "none"
    state = bus.status()
    where = f" at {state['address']}" if state.get("address") else ""
    return f"{state['backend']}{where}: {state['state']}" + (" (retrying)" if state["state"] != "up" else "")


def build_app(platform: Platform) -> web.Application:
    config = platform.config
    # The guard sits inside error_middleware so that its refusals take each API's error shape.
    guard = RequestGuard([config.bind, platform.node.address, platform.node.name, *config.allowed_hosts])
    app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=[error_middleware, guard.middleware()])
    app[PLATFORM] = platform
    acl = platform.extras.get(ACL_STATE)
    if isinstance(acl, ACLState):
        # Inside the guard: a foreign Origin is refused before any token is looked at.
        app.middlewares.append(acl_middleware(acl, acl_rule_for))
    add_consul_routes(app)
    add_native_routes(app)
    add_marathon_routes(app)
    add_ui_routes(app)  # the web console at /ui/, and / redirecting there
    return app


def gateway_supervisor(config: ServerConfig) -> GatewaySupervisor | None:
    """The gateway workers as a system job of this server (None with --no-gateway)."""
    if not config.gateway_port:
        return None
    control = local_control_url(config)
    if config.data_dir is not None:
        shared = os.path.join(config.data_dir, "gateway-counters")
    else:
        shared = os.path.join(tempfile.gettempdir(), f"shipyard-gateway-{os.getpid()}-{config.gateway_port}")
    # The workers know the control and gateway ports; the DNS port too, so no catalog entry routes to any of them.
    own_ports = ("--server-port", str(config.dns_port)) if config.dns_port else ()
    return GatewaySupervisor(control, bind=config.bind, port=config.gateway_port, workers=config.gateway_workers,
                             shared_path=shared, extra_args=own_ports + gateway_tls_args(config, control))


def gateway_tls_args(config: ServerConfig, control: str) -> tuple[str, ...]:
    """The workers' TLS: the CA and a certificate to reach an https control API (the server's own: Consul's server
    certificates are client certificates too), and the port and default certificate where they terminate TLS."""
    tls = config.tls
    args: list[str] = []
    if control.startswith("https://"):
        args += ["--control-ca", os.path.abspath(tls.ca_file)] if tls.ca_file else []
        args += ["--control-cert", os.path.abspath(tls.cert_file), "--control-key", os.path.abspath(tls.key_file)]
    if tls.gateway_port:
        cert, key = gateway_default_certificate(config)
        args += ["--tls-port", str(tls.gateway_port), "--server-port", str(tls.gateway_port),
                 "--tls-cert", cert, "--tls-key", key]
    if tls.enabled:
        args += ["--server-port", str(tls.https_port)]
    return tuple(args)


def control_summary(config: ServerConfig, tls: bool) -> str:
    if not tls:
        return f"http://{config.bind}:{config.http_port}"
    plain = f"http://{config.bind if is_loopback(config.bind) else '127.0.0.1'}:{config.http_port}"
    https = f"https://{config.bind}:{config.tls.https_port}"
    verify = " (client certificates required)" if config.tls.verify_incoming else ""
    return f"{https}{verify}" + (f" and {plain}" if config.http_port else " (plain HTTP off)")


def gateway_default_certificate(config: ServerConfig) -> tuple[str, str]:
    """--gateway-tls-cert, else one self-signed certificate for every worker (Kong's default certificate), made once
    in the data dir (a temporary directory under --dev)."""
    tls = config.tls
    return gateway_certificate_files(tls.gateway_cert_file, tls.gateway_key_file, config.data_dir)


def listener_ports(config: ServerConfig, tls: bool) -> list[tuple[int, str, bool]]:
    """(port, option, UDP too) of every listener this server opens (0: that one is off)."""
    return [(config.http_port, "--http-port", False), (config.dns_port, "--dns-port", True),
            (config.gateway_port, "--gateway-port", False),
            (config.tls.https_port if tls else 0, "--https-port", False),
            (config.tls.gateway_port if config.gateway_port else 0, "--gateway-tls-port", False)]


def locked_down(config: ServerConfig) -> bool:
    """ACLs on with default deny and TLS configured: the control plane may face a network."""
    acl_on = bool(getattr(config, "acl", False))  # --acl (the ACL system's flags live beside this one)
    default = str(getattr(config, "acl_default_policy", "allow"))
    return config.tls.enabled and acl_on and default == "deny"


def check_bind(config: ServerConfig) -> None:
    if is_loopback(config.bind) or locked_down(config):
        return
    if not config.insecure_bind:
        raise ShipyardError(
            f"refusing to bind to non-loopback address {config.bind}: that needs ACLs with default deny (--acl) "
            "and TLS (--tls-cert, --tls-key), or --insecure-bind to do it anyway",
            status=2,
        )
    log.warning("binding to %s without ACLs on default deny and TLS; anyone who can reach it may control it",
                config.bind)


def check_gateway_certificate(config: ServerConfig) -> None:
    """--gateway-tls-cert loads (one line now, rather than every gateway worker exiting at start)."""
    tls = config.tls
    if config.gateway_port and tls.gateway_port and tls.gateway_cert_file:
        server_context(tls.gateway_cert_file, tls.gateway_key_file or tls.gateway_cert_file, what="--gateway-tls-cert")


def https_context(config: ServerConfig) -> ssl.SSLContext | None:
    check_gateway_certificate(config)
    tls = config.tls
    if not tls.enabled:
        return None
    if not tls.key_file:
        raise ShipyardError("--tls-cert needs --tls-key (the certificate's private key)", status=2)
    return server_context(tls.cert_file, tls.key_file, tls.ca_file, verify_incoming=tls.verify_incoming)


async def start_control_listeners(config: ServerConfig, runner: web.AppRunner,
                                  context: ssl.SSLContext | None) -> HttpsListener | None:
    """Plain HTTP on --http-port (loopback only once TLS is on; none with --http-port 0 and TLS), HTTPS on
    --https-port."""
    if config.http_port or context is None:
        host = config.bind if context is None or is_loopback(config.bind) else "127.0.0.1"
        await web.TCPSite(runner, host, config.http_port, backlog=1024, reuse_address=True).start()
    if context is None:
        return None
    listener = HttpsListener(runner.server, config.bind, config.tls.https_port, context)  # type: ignore[arg-type]
    await listener.start()
    return listener


def prepare_vault(config: ServerConfig, platform: Platform, tls_context: ssl.SSLContext | None) -> None:
    """The secrets engine exists before the agent starts, so that instances started then get their secrets."""
    if config.vault_port:
        platform.extras["vault"] = vault = VaultService(
            platform.store, config.bind, vault_port_for(config), dev=config.vault_dev, data_dir=config.data_dir,
            dev_root_token=config.vault_dev_root_token, ssl_context=tls_context)
        vault.core.address = vault.address
        cluster = cluster_of(platform)
        if cluster is not None:  # on etcd: the leading server is the engine's active node, the others standbys
            vault.core.ha_enabled = True
            vault.core.standby = lambda: not cluster.leading


def vault_port_for(config: ServerConfig) -> int:
    """--vault-port as given; the default (8200), when another process holds it, becomes a free port, said in the
    log: this server's instances get VAULT_ADDR, and it must be their own engine, never another server's."""
    if config.vault_port_required or port_is_free(config.vault_port, config.bind):
        return config.vault_port
    with socket.socket() as sock:
        sock.bind((config.bind, 0))
        port = int(sock.getsockname()[1])
    log.warning("secrets engine: port %d is taken; it listens on %d instead (give --vault-port)",
                config.vault_port, port)
    return port


async def attach_vault(vault: VaultService, platform: Platform) -> None:
    """Dev mode unseals now; each instance start gets its own engine token and its job's secrets (after the ACL
    token hook); an unseal starts the instances that waited for it; a changed secret restarts or signals the
    instances that read it (their change_mode)."""
    await vault.unseal_if_dev()
    vault.attach(platform.agent, platform.jobs)


async def start_vault(config: ServerConfig, platform: Platform,
                      tls_context: ssl.SSLContext | None) -> VaultService | None:
    """The secrets engine's listener on --vault-port (HTTPS with the control API's certificate when TLS is
    configured): sealed until unsealed, unless in dev mode (which says so, with its root token, as vault -dev)."""
    vault = platform.extras.get("vault")
    if not isinstance(vault, VaultService):
        return None
    try:
        await vault.listen()
    except OSError as exc:
        if config.vault_port_required:
            raise ShipyardError(f"cannot listen on {config.bind}:{config.vault_port} (--vault-port): "
                                f"{exc.strerror}") from None
        log.warning("secrets engine not served: port %d is taken (give --vault-port)", config.vault_port)
        return vault  # still delivers secrets to this server's instances
    state = "dev mode: initialised and unsealed, NOT for production" if vault.root_token else "sealed until unsealed"
    log.info("secrets engine (Vault API) on %s (%s)", vault.address, state)
    if vault.root_token:
        print(f"secrets engine in dev mode (in memory unless a data dir; never for production). "
              f"VAULT_ADDR={vault.address} root token: {vault.root_token}", file=sys.stderr, flush=True)
    return vault


def claim_data_dir_and_ports(config: ServerConfig, https: bool) -> int | None:
    """Locks the data dir (held for the process's life: the returned fd) and checks every listener's port.

    A data dir some server already used is locked first: a second server on it is told so, not that a port (likely
    the first one's) is taken. A new one is made only once the ports are known to be free."""
    in_use = config.data_dir is not None and (Path(config.data_dir) / "LOCK").exists()
    lock_fd = lock_data_dir(config.data_dir) if config.data_dir is not None and in_use else None
    # A taken port is one line and exit 1 now, not a traceback (control, DNS) or workers crash-looping (gateway).
    check_ports_free(config.bind, listener_ports(config, https))
    make_process_private()  # store, bus, logs, counters: 0600 files in 0700 dirs, whatever the operator's umask
    if config.data_dir is not None:
        make_data_dir_private(config.data_dir)
        if lock_fd is None:
            lock_fd = lock_data_dir(config.data_dir)
    return lock_fd


async def start_dns(config: ServerConfig, platform: Platform) -> DnsServer | None:
    if not config.dns_port:
        return None
    dns_server = DnsServer(platform.catalog, config.datacenter, config.bind, config.dns_port, config.dns)
    acl = platform.extras.get(ACL_STATE)
    if isinstance(acl, ACLState):
        dns_server.responder.restrict = dns_restriction(acl)
    await dns_server.start()
    return dns_server


async def start_gateway(config: ServerConfig, platform: Platform) -> GatewaySupervisor | None:
    """The gateway workers (with a read-only token of their own under ACLs), once they listen."""
    gateway = gateway_supervisor(config)
    if gateway is None:
        return None
    platform.extras["gateway"] = gateway
    acl = platform.extras.get(ACL_STATE)
    if isinstance(acl, ACLState):
        secret = await acl.internal_token(internal_key(config.data_dir), "gateway", GATEWAY_RULES)
        gateway.extra_env[TOKEN_VARIABLES[0]] = secret
    await gateway.start()
    await gateway.wait_listening()
    await start_gateway_counters(platform, gateway.shared_path)  # several servers: counts shared via etcd
    return gateway


async def stop_gateway_and_agent(config: ServerConfig, platform: Platform, gateway: GatewaySupervisor | None) -> None:
    """The gateway workers, then the node agent while the API still answers it (it leaves; a --dev server's stops
    its instances), then the workers' last counts, published while the store is still open."""
    if gateway is not None:
        await gateway.stop()
    local_agent = platform.extras.get(NODE_AGENT)
    if isinstance(local_agent, LocalNodeAgent):
        await local_agent.stop()
    await stop_gateway_counters(platform)
    if gateway is not None and config.data_dir is None:
        for path in gateway.shared_files:
            with contextlib.suppress(OSError):
                os.unlink(path)


async def serve(config: ServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Runs the server until SIGINT/SIGTERM."""
    check_bind(config)
    tls_context = https_context(config)  # a missing or unreadable certificate is one line before anything listens
    lock_fd = claim_data_dir_and_ports(config, tls_context is not None)
    # Handlers first: the API answers before "ready", and a SIGTERM in between must still stop what was started
    # (a --dev server's instances, the gateway workers) rather than kill the process with no cleanup.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    platform = await build_platform(config)
    prepare_vault(config, platform, tls_context)
    runner: web.AppRunner | None = None
    dns_server: DnsServer | None = None
    gateway: GatewaySupervisor | None = None
    https: HttpsListener | None = None
    vault: VaultService | None = None
    try:
        await start_platform(platform)
        app = build_app(platform)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        https = await start_control_listeners(config, runner, tls_context)
        dns_server = await start_dns(config, platform)
        local_agent = platform.extras.get(NODE_AGENT)
        if isinstance(local_agent, LocalNodeAgent):
            await local_agent.start()  # it reaches the API that listens now; the gateway starts meanwhile
        gateway = await start_gateway(config, platform)
        vault = await start_vault(config, platform, tls_context)
        if isinstance(local_agent, LocalNodeAgent):
            await local_agent.wait_registered(platform.store)
        log.info(
            "shipyard server ready: %s, DNS on port %s (node %s, data dir %s, bus %s)",
            control_summary(config, tls_context is not None),
            config.dns_port or "off",
            platform.node.name,
            config.data_dir or "in memory (--dev)",
            bus_summary(platform),
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shipyard server stopping")
    finally:
        await stop_gateway_and_agent(config, platform, gateway)
        if dns_server is not None:
            await dns_server.stop()
        if https is not None:
            await https.stop()
        if vault is not None:
            await vault.stop()
        if runner is not None:
            await runner.cleanup()
        left_running = instances_left_running(platform)
        await stop_platform(platform)
        if left_running:
            print(left_running, file=sys.stderr, flush=True)
        if lock_fd is not None:
            os.close(lock_fd)
