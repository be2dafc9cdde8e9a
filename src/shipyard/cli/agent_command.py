"""`shipyard agent`: run this machine as a node of a cluster whose servers run elsewhere.

It parses flags into an AgentConfig and runs the agent (api/agent_process.py); it holds no behaviour of its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click
import uvloop

from shipyard.errors import ShipyardError
from shipyard.tokens import token_from_env


def parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: give key=value", param_hint="--meta")
        meta[key.strip()] = value.strip()
    return meta


def server_instance_env() -> dict[str, str]:
    """What a server tells its node agent to give every instance (JSON in the environment, not on the command
    line: it may hold the bus's credentials)."""
    from shipyard.api.local_agent import SERVER_INSTANCE_ENV

    raw = os.environ.pop(SERVER_INSTANCE_ENV, "")
    data = json.loads(raw) if raw else {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


@click.command()
@click.option("--server", "servers", multiple=True, required=True, metavar="URL",
              help="A server's control API, host:port or http(s)://host:port (repeatable: the next one is used when "
                   "one cannot be reached).")
@click.option("--node", "node_name", default="", help="Node name (default: the host name).")
@click.option("--advertise", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="This machine's address as the others reach it: its instances, their checks, its logs port.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Node metadata (repeatable), for placement.")
@click.option("--node-class", default="", metavar="CLASS", help="Node class, for placement constraints.")
@click.option("--data-dir", default="./shipyard-agent", show_default=True,
              help="Where its instances' state and logs are kept (instances outlive the agent and are adopted).")
@click.option("--port", default=8510, show_default=True, type=click.IntRange(0, 65535),
              help="Port (on --advertise) where the servers fetch its instances' logs and usage and Prometheus "
                   "scrapes its gateway (HTTPS with --client-cert).")
@click.option("--datacenter", default="dc1", show_default=True,
              help="The datacenter this node is in (as Consul's; the servers' own).")
@click.option("--token", default="", envvar="SHIPYARD_HTTP_TOKEN", show_envvar=True, metavar="TOKEN",
              help="ACL token for the servers (better through the environment: flags show in ps; "
                   "CONSUL_HTTP_TOKEN works too).")
@click.option("--ca-file", default="", envvar="CONSUL_CACERT", show_envvar=True,
              help="CA of https:// servers.")
@click.option("--client-cert", default="", envvar="CONSUL_CLIENT_CERT", show_envvar=True,
              help="This agent's certificate (`shipyard tls cert create --client --ip ADDR`): presented to servers "
                   "that verify incoming connections, and served on --port, which is then HTTPS.")
@click.option("--client-key", default="", envvar="CONSUL_CLIENT_KEY", show_envvar=True, help="Key of --client-cert.")
@click.option("--cpu-mhz", type=click.IntRange(1, None), default=None, help="CPU to offer (default: detected).")
@click.option("--memory-mb", type=click.IntRange(1, None), default=None, help="Memory to offer (default: detected).")
@click.option("--heartbeat-ttl", default=3, show_default=True, type=click.IntRange(2, 300),
              help="Seconds of its liveness lease: cut off longer, its node turns critical.")
@click.option("--drain-delay", default=1.0, show_default=True, type=click.FloatRange(0, 600),
              help="Seconds between deregistering an instance and sending it SIGTERM.")
@click.option("--enable-script-checks", is_flag=True, help="Allow health checks that run commands.")
@click.option("--http-port", default=8500, show_default=True, type=click.IntRange(0, 65535),
              help="The HTTP API for this machine's instances and tools, on 127.0.0.1 only, forwarded to the servers "
                   "(0: none); its instances are told SHIPYARD_HTTP_ADDR / CONSUL_HTTP_ADDR = this address.")
@click.option("--dns-port", default=8600, show_default=True, type=click.IntRange(0, 65535),
              help="Consul DNS for the cluster, UDP and TCP (0: none); on --advertise when it may face the network "
                   "(see --insecure-bind), else on 127.0.0.1.")
@click.option("--dns-token", default="", envvar="SHIPYARD_DNS_TOKEN", show_envvar=True, metavar="TOKEN",
              help="With ACLs: the token DNS answers as (default: anonymous).")
@click.option("--gateway", is_flag=True, help="Run gateway workers here: this machine becomes an entry point.")
@click.option("--gateway-port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="Port (on --advertise) of the gateway.")
@click.option("--gateway-workers", default=1, show_default=True, type=click.IntRange(0, 256),
              help="Gateway worker processes (0: the number of cores).")
@click.option("--gateway-tls-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              envvar="SHIPYARD_GATEWAY_TLS_PORT",
              help="Port (on --advertise) where the gateway also terminates TLS (e.g. 8443; 0: none), as a server's: "
                   "the certificates and snis of the gateway admin API, --gateway-tls-cert otherwise.")
@click.option("--gateway-tls-cert", default="", metavar="FILE", envvar="SHIPYARD_GATEWAY_TLS_CERT",
              help="Default certificate of --gateway-tls-port (default: a self-signed one kept in --data-dir).")
@click.option("--gateway-tls-key", default="", metavar="FILE", envvar="SHIPYARD_GATEWAY_TLS_KEY",
              help="Key of --gateway-tls-cert.")
@click.option("--insecure-bind", is_flag=True,
              help="Let DNS and the gateway listen on a non-loopback --advertise without HTTPS servers and ACLs.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="How much the agent logs to stderr.")
@click.option("--server-pid", default=0, hidden=True, type=click.IntRange(0, None),
              help="Set by a server starting its own node's agent: the server's pid (api/local_agent.py).")
@click.option("--node-id", default="", hidden=True, help="Set by a server: its node's id.")
@click.option("--stop-instances-on-exit", is_flag=True, hidden=True, help="Set by a --dev server.")
def agent(servers: tuple[str, ...], node_name: str, advertise: str, meta: tuple[str, ...], node_class: str,
          data_dir: str, port: int,
          datacenter: str, token: str, ca_file: str, client_cert: str, client_key: str, cpu_mhz: int | None,
          memory_mb: int | None, heartbeat_ttl: int, drain_delay: float, enable_script_checks: bool,
          http_port: int, dns_port: int, dns_token: str, gateway: bool, gateway_port: int, gateway_workers: int,
          gateway_tls_port: int, gateway_tls_cert: str, gateway_tls_key: str, insecure_bind: bool,
          log_level: str, server_pid: int, node_id: str, stop_instances_on_exit: bool) -> None:
    """Run this machine as a node of a cluster: register it, heartbeat, run what the servers place here."""
    from shipyard.api.agent_process import AgentConfig, run_agent, server_url

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = AgentConfig(
        servers=[server_url(s) for s in servers], node_name=node_name, advertise=advertise,
        data_dir=os.path.abspath(data_dir), meta=parse_meta(meta), node_class=node_class, port=port,
        datacenter=datacenter,
        token=token or token_from_env() or None,
        ca_file=ca_file, cert_file=client_cert, key_file=client_key, cpu_mhz=cpu_mhz, memory_mb=memory_mb,
        ttl=heartbeat_ttl, drain_delay=drain_delay, enable_script_checks=enable_script_checks,
        http_port=http_port, dns_port=dns_port, dns_token=dns_token, gateway_port=gateway_port if gateway else 0,
        gateway_workers=gateway_workers, gateway_tls_port=gateway_tls_port, gateway_tls_cert=gateway_tls_cert,
        gateway_tls_key=gateway_tls_key, insecure_bind=insecure_bind,
        server_pid=server_pid, node_id=node_id, stop_instances_on_exit=stop_instances_on_exit,
        instance_env=server_instance_env() if server_pid else {},
    )
    if advertise in ("", "0.0.0.0", "::"):
        raise ShipyardError("--advertise must be an address the servers and other nodes can reach", status=2)
    uvloop.run(run_agent(config))


def register(cli: click.Group) -> None:
    cli.add_command(agent)
