"""Entry point of the `shipyard` command and its top-level options.

Sub-commands live in sibling modules; this file only assembles them and maps errors to one line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from shipyard import __version__
from shipyard.cli.dns_options import Duration, dns_config, dns_options
from shipyard.cli.options import HTTP_ADDR_ENV, HTTP_ADDR_HELP, add_http_addr
from shipyard.cli.tls_commands import tls_config, tls_options
from shipyard.cli.vault_options import vault_options, vault_settings
from shipyard.errors import ShipyardError

err_console = Console(stderr=True)
# -h as well as --help everywhere; env vars in help text (click shows them with show_envvar).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class ShipyardGroup(click.Group):
    """Turns any ShipyardError (and connection failures) into one red line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShipyardError as exc:
            err_console.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=ShipyardGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="shipyard", message="%(prog)s %(version)s")
@click.option(
    "--http-addr",
    envvar=HTTP_ADDR_ENV,
    show_envvar=True,
    default="127.0.0.1:8500",
    show_default=True,
    metavar="HOST:PORT",
    help=HTTP_ADDR_HELP + " Every sub-command that talks to a server also takes it after its name.",
)
@click.pass_context
def cli(ctx: click.Context, http_addr: str) -> None:
    """Shipyard: registry, config, gateway, scheduler and bus for your microservices."""
    ctx.obj = {"http_addr": http_addr}


@cli.command()
@click.option("--data-dir", default="./shipyard-data", show_default=True,
              help="Where state is kept (store, bus, instances' logs); relative to the current directory.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", default=8500, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the control API (Consul /v1, Marathon /v2, native /api, web UI).")
@click.option("--dns-port", default=8600, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the DNS interface, UDP and TCP (0: no DNS).")
@click.option("--node", "node_name", default="", help="Node name (default: the host name).")
@click.option("--datacenter", default="dc1", show_default=True, help="Datacenter name, as in Consul.")
@click.option("--node-meta", "node_meta", multiple=True, metavar="KEY=VALUE",
              help="Metadata of this server's node (repeatable; KEY:VALUE as Consul's -node-meta works too): its "
                   "catalog NodeMeta and ${meta.KEY} in placement constraints.")
@click.option("--node-class", default="", metavar="CLASS", help="This server's node class (${node.class}).")
@click.option("--dev", is_flag=True, help="Keep all state in memory only (nothing on disk).")
@click.option(
    "--store", "store_url", default="", envvar="SHIPYARD_STORE",
    show_envvar=True, help="Keep state in etcd instead: etcd://host:port[,host:port...][/namespace].",
)
@click.option(
    "--bus", "bus_url", default="embedded", show_default=True, envvar="SHIPYARD_BUS", show_envvar=True,
    help="Message bus: `embedded`, or RabbitMQ at amqp://user:pass@host:port/vhost "
         "(amqps:// for TLS; rabbitmq:// is accepted as a synonym of amqp://).",
)
@click.option("--single-server", is_flag=True,
              help="With --store etcd: this is the only server on that etcd (allows the embedded bus).")
@click.option("--leader-ttl", default=3, show_default=True, type=click.IntRange(2, 60),
              help="With --store etcd: seconds of the leadership lease; a dead leader is replaced within about this.")
@click.option("--node-lost-after", default=15.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds a server (with --store etcd) or an agent may be silent (counted from its last possible "
                   "heartbeat: its lease's expiry minus its TTL) before the instances on its node are replaced.")
@click.option("--reconnect-timeout", default="72h", show_default=True, type=Duration(), metavar="DURATION",
              help="An agent or server failed (or left) this long is removed from the members, the catalog and "
                   "placement, as Consul's reconnect_timeout (0: never). `shipyard node force-leave` does it now.")
@click.option("--etcd-compaction-interval", default=300.0, show_default=True, type=click.FloatRange(0, 86400),
              help="With --store etcd: every this many seconds the leader compacts etcd's history to the revision "
                   "of the interval before, as Kubernetes' API server does (0: never, e.g. if etcd compacts itself).")
@click.option("--node-agent", default="process", show_default=True, type=click.Choice(["process", "embedded"]),
              help="How this server runs its own node's instances: `shipyard agent` as a process of its own (as "
                   "on every other machine), or the same agent code inside the server.")
@click.option("--gateway-sync", default=0.1, show_default=True, type=click.FloatRange(0.01, 10),
              help="With --store etcd (several servers): seconds between syncs of the gateways' rate-limit counts "
                   "(docs/cluster.md: the tolerance of a limit grows with it).")
@click.option("--enable-script-checks", is_flag=True, help="Allow health checks that run commands.")
@click.option("--http-check-output", is_flag=True,
              help="Record HTTP checks' response bodies in their output (as Consul does); off: status line only.")
@click.option("--insecure-bind", is_flag=True, help="Allow binding to a non-loopback address.")
@click.option("--acl", is_flag=True, help="Turn on Consul's ACL system for every API (tokens; docs/acl.md).")
@click.option("--acl-default-policy", default="deny", show_default=True, type=click.Choice(["allow", "deny"]),
              help="With --acl: what a token may do that none of its rules name.")
@click.option("--acl-initial-management", default="", envvar="SHIPYARD_ACL_INITIAL_MANAGEMENT", metavar="TOKEN",
              help="With --acl: a SecretID (a UUID) that is made a global-management token at start.")
@click.option("--config-file", "config_file", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A Consul agent configuration file (JSON or HCL; repeatable): acl, ports, tls, datacenter, "
                   "node_name, client_addr, data_dir, enable_script_checks. Flags given here win.")
@click.option("--config-dir", "config_dir", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="A directory of Consul configuration files (*.json, *.hcl, read in name order; repeatable).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another name clients use for this server (repeatable); other Host headers get 421.")
@click.option(
    "--drain-delay", default=1.0, show_default=True, type=click.FloatRange(0, 600),
    help="Seconds between deregistering an instance and sending it SIGTERM (lets the gateway drain it).",
)
@click.option("--gateway-port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              envvar="SHIPYARD_GATEWAY_PORT", show_envvar=True, help="Port of the API gateway's workers.")
@click.option("--gateway-workers", default=0, type=click.IntRange(0, 256),
              help="Gateway worker processes (default: the number of cores).")
@click.option("--no-gateway", is_flag=True, help="Do not run the API gateway.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="How much the server logs to stderr.")
@dns_options
@tls_options
@vault_options
def server(
    data_dir: str,
    bind: str,
    http_port: int,
    dns_port: int,
    node_name: str,
    datacenter: str,
    node_meta: tuple[str, ...],
    node_class: str,
    dev: bool,
    store_url: str,
    bus_url: str,
    single_server: bool,
    leader_ttl: int,
    node_lost_after: float,
    reconnect_timeout: float,
    etcd_compaction_interval: float,
    node_agent: str,
    gateway_sync: float,
    enable_script_checks: bool,
    http_check_output: bool,
    insecure_bind: bool,
    acl: bool,
    acl_default_policy: str,
    acl_initial_management: str,
    config_file: tuple[str, ...],
    config_dir: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    drain_delay: float,
    gateway_port: int,
    gateway_workers: int,
    no_gateway: bool,
    log_level: str,
    **dns_flags: Any,
) -> None:
    """Run the Shipyard server (control API on --http-port)."""
    import uvloop

    from shipyard.api.context import ServerConfig
    from shipyard.api.server import serve

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    config = ServerConfig(
        data_dir=None if dev else os.path.abspath(data_dir),  # the caller's cwd, not the agent's or a shim's
        bind=bind,
        http_port=http_port,
        dns_port=dns_port,
        node_name=node_name,
        datacenter=datacenter,
        enable_script_checks=enable_script_checks,
        http_check_output=http_check_output,
        insecure_bind=insecure_bind,
        acl=acl,
        acl_default_policy=acl_default_policy,
        acl_initial_management=acl_initial_management,
        allowed_hosts=tuple(allowed_hosts),
        store_url=store_url,
        drain_delay=drain_delay,
        gateway_port=0 if no_gateway else gateway_port,
        gateway_workers=gateway_workers,
        bus_url="" if bus_url in ("", "embedded") else bus_url,
        single_server=single_server,
        leader_ttl=leader_ttl,
        node_lost_after=node_lost_after,
        reconnect_timeout=reconnect_timeout,
        etcd_compaction_interval=etcd_compaction_interval,
        node_agent=node_agent,
        node_meta=_node_meta(node_meta),
        node_class=node_class,
        gateway_sync=gateway_sync,
        dns=dns_config(dns_flags),
        tls=tls_config(dns_flags),
        **vault_settings(dns_flags, dev=dev),
    )
    if config_file or config_dir:
        from shipyard.cli.consul_config import apply_config_files, config_files

        ctx = click.get_current_context()
        given = {name for name in ctx.params if ctx.get_parameter_source(name) in (
            click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
        apply_config_files(config, config_files(config_file, config_dir), given)
    uvloop.run(serve(config))


def _node_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        sep = "=" if "=" in pair else ":"
        key, found, value = pair.partition(sep)
        if not found or not key.strip():
            raise click.BadParameter(f"{pair!r}: give KEY=VALUE", param_hint="--node-meta")
        out[key.strip()] = value.strip()
    return out


def _register_subcommands() -> None:
    from shipyard.cli import (
        agent_command,
        bus_commands,
        gateway_commands,
        jobs_commands,
        node_commands,
        registry_commands,
        tls_commands,
    )

    registry_commands.register(cli)
    jobs_commands.register(cli)
    bus_commands.register(cli)
    gateway_commands.register(cli)
    from shipyard.cli import snapshot_commands
    snapshot_commands.register(cli)
    tls_commands.register(cli)
    agent_command.register(cli)
    node_commands.register(cli)
    for name, command in cli.commands.items():
        if name not in ("server", "agent"):  # the server listens, an agent has its --server; the others talk to one
            add_http_addr(command)


def main() -> None:
    _register_subcommands()
    try:
        cli(prog_name="shipyard")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
