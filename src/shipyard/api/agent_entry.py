"""An agent as an entry point of its cluster: Consul DNS and (with --gateway) gateway workers on the agent's machine,
plain HTTP and, with --gateway-tls-port, HTTPS with the cluster's gateway certificates, all reading the servers'
store over HTTP (DNS through the agent's RemoteStore, each worker through its own).

It decides where they listen and starts and stops them; it never writes routes or catalog entries, never answers a
name from anything but the servers' catalog, and never listens beyond loopback unless the cluster is locked down
(servers over HTTPS, ACLs on, a token) or the operator said --insecure-bind.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from urllib.parse import quote

from shipyard.acl.authorizer import ANONYMOUS_TOKEN_ID
from shipyard.acl.state import TOKENS, ACLState, derived_secret, gateway_token_name, internal_key
from shipyard.api.acl_guard import dns_restriction
from shipyard.api.context import DnsConfig
from shipyard.api.dns import DnsServer
from shipyard.api.machine import gateway_certificate_files, is_loopback
from shipyard.api.ports import check_ports_free
from shipyard.errors import ShipyardError
from shipyard.gateway.cluster_counters import DEFAULT_INTERVAL, ClusterCounters
from shipyard.gateway.counters import shared_counters
from shipyard.gateway.supervisor import GatewaySupervisor
from shipyard.registry.catalog import Catalog
from shipyard.store import StoreError
from shipyard.store.follow import follow_prefix
from shipyard.store.remote import RemoteStore
from shipyard.tasks import cancel_and_wait
from shipyard.tls.contexts import server_context
from shipyard.tokens import TOKEN_VARIABLES

log = logging.getLogger("shipyard.agent")

DEFAULT_DNS_PORT = 8600
DEFAULT_GATEWAY_PORT = 8080


@dataclass
class EntryConfig:
    """What an agent serves besides its node: DNS (port 0: none) and gateway workers (port 0: none)."""

    address: str  # the agent's --advertise address
    servers: list[str]
    token: str | None = None
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    dns_port: int = DEFAULT_DNS_PORT
    dns_token: str = ""  # with ACLs: the token DNS answers as ("": anonymous)
    gateway_port: int = 0
    gateway_workers: int = 1
    gateway_tls_port: int = 0  # 0: the gateway serves plain HTTP only
    gateway_tls_cert: str = ""  # the TLS port's default certificate ("": a self-signed one kept in the data dir)
    gateway_tls_key: str = ""
    insecure_bind: bool = False

    @property
    def tls_port(self) -> int:
        """The gateway's TLS port, when there is a gateway at all."""
        return self.gateway_tls_port if self.gateway_port else 0


def check_entry_ports(config: EntryConfig, logs_port: int) -> None:
    """The gateway and DNS ports are free and distinct from the logs port (one line and exit, not a traceback or
    workers crash-looping)."""
    dns_host = config.address if may_face_network(config) else "127.0.0.1"
    check_ports_free(config.address, [(logs_port, "--port", False), (config.gateway_port, "--gateway-port", False),
                                      (config.tls_port, "--gateway-tls-port", False)])
    if config.tls_port and config.gateway_tls_cert:  # one line now, rather than every worker exiting at start
        server_context(config.gateway_tls_cert, config.gateway_tls_key or config.gateway_tls_cert,
                       what="--gateway-tls-cert")
    check_ports_free(dns_host, [(config.dns_port, "--dns-port", True)])


def may_face_network(config: EntryConfig) -> bool:
    """Whether the agent's listeners may bind --advertise: loopback anyway; beyond it, only with --insecure-bind or
    with every server on HTTPS and a token (whether ACLs are on is checked once a server answers)."""
    if is_loopback(config.address) or config.insecure_bind:
        return True
    return bool(config.token) and all(url.startswith("https://") for url in config.servers)


def check_gateway_bind(config: EntryConfig) -> None:
    """The server's rule (check_bind) for the gateway, which the operator asked for explicitly: refused at start."""
    if config.gateway_port and not may_face_network(config):
        raise ShipyardError(
            f"refusing to run the gateway on non-loopback address {config.address}: that needs servers over HTTPS "
            "(--server https://...) with ACLs and a token, or --insecure-bind to do it anyway", status=2)


async def acls_on(store: RemoteStore) -> bool:
    """The servers run ACLs: their anonymous token exists (every server with --acl writes it at start)."""
    return await store.get(TOKENS + ANONYMOUS_TOKEN_ID) is not None


class AgentEntry:
    """The DNS listener and gateway workers of one agent, started after it reached a server."""

    def __init__(self, config: EntryConfig, store: RemoteStore, catalog: Catalog, data_dir: str) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.data_dir = data_dir
        self.acl: ACLState | None = None
        self.dns: DnsServer | None = None
        self.gateway: GatewaySupervisor | None = None
        self.counters: ClusterCounters | None = None
        self._fresh: asyncio.Task[None] | None = None

    async def start(self, logs_port: int) -> None:
        facing = may_face_network(self.config)
        if await acls_on(self.store):
            # Fail closed: the servers' default policy is not in the store, so DNS answers only what the dns
            # token (else anonymous) may read, as a server on default deny does.
            self.acl = ACLState(self.store, default_allow=False)
            await self.acl.start()
            self.acl.set_agent_token("dns", self.config.dns_token, from_api=False)
        elif facing and not self.config.insecure_bind and not is_loopback(self.config.address):
            facing = False  # HTTPS and a token, but the servers run without ACLs: not locked down after all
            if self.config.gateway_port:
                raise ShipyardError(f"refusing to run the gateway on {self.config.address}: the servers run without "
                                    "ACLs (--acl); give --insecure-bind to do it anyway", status=2)
        if self.config.dns_port:
            await self._start_dns(self.config.address if facing else "127.0.0.1")
        if self.config.gateway_port:
            await self._start_gateway(logs_port)

    async def _start_dns(self, host: str) -> None:
        self.dns = DnsServer(self.catalog, self.catalog.node.datacenter, host, self.config.dns_port, DnsConfig())
        if self.acl is not None:
            self.dns.responder.restrict = dns_restriction(self.acl)
        # DNS answers from a view kept while no newer store revision was seen: following catalog/ makes every
        # change the servers commit a newer revision here (the RemoteStore counts what its watches see).
        self._fresh = asyncio.create_task(follow_prefix(
            self.store, "catalog/", lambda _events: None, self._catalog_revision, name="agent DNS freshness"))
        try:
            await self.dns.start()
        except OSError as exc:
            raise ShipyardError(f"cannot serve DNS on {host}:{self.config.dns_port} (--dns-port): "
                                f"{exc.strerror}") from None
        where = "" if host == self.config.address else " (loopback only: give --insecure-bind to answer the network)"
        log.info("DNS on %s:%d%s", host, self.config.dns_port, where)

    async def _catalog_revision(self) -> int:
        return (await self.store.range("catalog/nodes/" + self.catalog.node.name)).revision

    def supervisor(self, logs_port: int) -> GatewaySupervisor:
        """Workers bound on --advertise that follow the servers' routes and catalog (with the agent's token until
        _start_gateway gives them their own); the agent's own ports are never a catalog target."""
        config = self.config
        extra: list[str] = []
        for url in config.servers[1:]:
            extra += ["--control", url]
        for port in (config.dns_port, logs_port):
            extra += ["--server-port", str(port)] if port else []
        extra += self._tls_args()
        if any(url.startswith("https://") for url in config.servers):
            extra += ["--control-ca", os.path.abspath(config.ca_file)] if config.ca_file else []
            if config.cert_file:
                extra += ["--control-cert", os.path.abspath(config.cert_file),
                          "--control-key", os.path.abspath(config.key_file or config.cert_file)]
        gateway = GatewaySupervisor(config.servers[0], bind=config.address, port=config.gateway_port,
                                    workers=config.gateway_workers,
                                    shared_path=os.path.join(self.data_dir, "gateway-counters"),
                                    extra_args=tuple(extra))
        if config.token:
            gateway.extra_env[TOKEN_VARIABLES[0]] = config.token
        return gateway

    def _tls_args(self) -> list[str]:
        """The workers' TLS port, as a server's: its default certificate (--gateway-tls-cert, else a self-signed
        one made once in the agent's data dir), and the certificates and SNIs of the gateway admin API, which each
        worker follows from the servers' store: a certificate added through any server reaches this gateway too."""
        config = self.config
        if not config.tls_port:
            return []
        cert, key = gateway_certificate_files(config.gateway_tls_cert, config.gateway_tls_key, self.data_dir)
        return ["--tls-port", str(config.tls_port), "--server-port", str(config.tls_port), "--tls-cert", cert,
                "--tls-key", key]

    async def _workers_token(self) -> str | None:
        """With ACLs on, the workers get a read-only token of their own (a server's workers' rules, GATEWAY_RULES),
        made through a server from a secret derived from this agent's key: the processes that face the network
        never hold the agent's token, which writes the store. Should no server make it, they get the agent's
        (said in the log)."""
        if self.acl is None:
            return self.config.token
        node = self.catalog.node.name
        secret = derived_secret(internal_key(self.data_dir), gateway_token_name(node))
        try:
            await self.store._call("PUT", f"/api/v1/nodes/{quote(node, safe='')}/gateway-token",
                                   json_body={"SecretID": secret})
        except StoreError as exc:
            log.warning("gateway workers: no read-only token of their own (%s); they hold the agent's", exc.message)
            return self.config.token
        return secret

    async def _start_gateway(self, logs_port: int) -> None:
        self.gateway = self.supervisor(logs_port)
        token = await self._workers_token()
        if token:
            self.gateway.extra_env[TOKEN_VARIABLES[0]] = token
        await self.gateway.start()
        await self.gateway.wait_listening()
        # Rate limits hold across the cluster's gateways: this machine's counts are published under
        # gateway-counters/<node id>, the others' added to its counters file (as a server on etcd does).
        self.counters = ClusterCounters(self.store, shared_counters(self.gateway.shared_path), self.catalog.node.id,
                                        interval=DEFAULT_INTERVAL)
        await self.counters.start()
        https = f" and https://{self.config.address}:{self.config.tls_port}" if self.config.tls_port else ""
        log.info("gateway on http://%s:%d%s (%d workers)", self.config.address, self.config.gateway_port, https,
                 self.gateway.workers)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.counters is not None:
            await self.counters.stop()  # the workers' last counts, published while the store is still open
        await cancel_and_wait(self._fresh)
        if self.dns is not None:
            await self.dns.stop()
        if self.acl is not None:
            await self.acl.stop()
