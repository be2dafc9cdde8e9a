"""`shipyard tls ca create` and `shipyard tls cert create` (Consul's `consul tls`), and the `shipyard server`
options that turn TLS on (--tls-cert, --tls-key, --tls-ca, --verify-incoming, --https-port, --gateway-tls-port).

Owns the command line only: certificates are made by shipyard.tls, listeners by the server; it never talks to a
server and imports nothing heavy at module level (every `shipyard` command loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from shipyard.api.context import TlsConfig

F = TypeVar("F", bound=Callable[..., Any])


@click.group("tls")
def tls_group() -> None:
    """Make a certificate authority and the certificates of servers, clients and the CLI (as `consul tls`)."""


@tls_group.group("ca")
def ca_group() -> None:
    """The certificate authority every certificate is signed by."""


@ca_group.command("create")
@click.option("--days", default=1825, show_default=True, type=click.IntRange(1, 36500),
              help="Days the CA is valid.")
@click.option("--domain", default="consul", show_default=True, help="Domain of the agents' names.")
@click.option("--common-name", default="", help="The CA's common name (default: Consul Agent CA <serial>).")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write consul-agent-ca.pem and consul-agent-ca-key.pem.")
def ca_create(days: int, domain: str, common_name: str, directory: str) -> None:
    """Write consul-agent-ca.pem and consul-agent-ca-key.pem (the key 0600)."""
    from shipyard.tls import create_ca_files

    cert, key = create_ca_files(directory, days=days, domain=domain, common_name=common_name)
    click.echo(f"==> Saved {cert}")
    click.echo(f"==> Saved {key}")


@tls_group.group("cert")
def cert_group() -> None:
    """Certificates signed by the CA."""


@cert_group.command("create")
@click.option("--server", "kind", flag_value="server", help="A server's certificate (serves and calls).")
@click.option("--client", "kind", flag_value="client", help="A client agent's certificate (serves and calls).")
@click.option("--cli", "kind", flag_value="cli", help="The CLI's certificate (calls only).")
@click.option("--dns", "--additional-dnsname", "dns_names", multiple=True, metavar="NAME",
              help="Another DNS name the certificate is valid for (repeatable).")
@click.option("--ip", "--additional-ipaddress", "ips", multiple=True, metavar="ADDR",
              help="Another IP address the certificate is valid for (repeatable; 127.0.0.1 always is).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 36500),
              help="Days the certificate is valid.")
@click.option("--dc", "datacenter", default="dc1", show_default=True, help="Datacenter in the names.")
@click.option("--domain", default="consul", show_default=True, help="Domain in the names.")
@click.option("--node", default="", help="Server node name (adds <node>.server.<dc>.<domain>).")
@click.option("--ca", "ca_file", default="consul-agent-ca.pem", show_default=True, help="The CA certificate.")
@click.option("--key", "ca_key_file", default="consul-agent-ca-key.pem", show_default=True, help="The CA's key.")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where the CA is and the certificate goes.")
def cert_create(kind: str | None, dns_names: tuple[str, ...], ips: tuple[str, ...], days: int, datacenter: str,
                domain: str, node: str, ca_file: str, ca_key_file: str, directory: str) -> None:
    """Write <dc>-<kind>-<domain>-<n>.pem and its -key.pem (0600), e.g. dc1-server-consul-0.pem."""
    from shipyard.errors import BadRequest
    from shipyard.tls import CertRequest, create_cert_files

    if kind is None:
        raise BadRequest("say which certificate: --server, --client or --cli")
    request = CertRequest(kind=kind, datacenter=datacenter, domain=domain, days=days,
                          dns_names=list(dns_names), ip_addresses=list(ips), node=node)
    cert, key = create_cert_files(directory, request, ca_file=ca_file, ca_key_file=ca_key_file)
    click.echo(f"==> Using {ca_file} and {ca_key_file}")
    click.echo(f"==> Saved {cert}")
    click.echo(f"==> Saved {key}")


def register(cli: click.Group) -> None:
    cli.add_command(tls_group)


_SERVER_OPTIONS: list[Callable[[F], F]] = [
    click.option("--tls-cert", default="", envvar="SHIPYARD_TLS_CERT", metavar="FILE",
                 help="Certificate of the control API's HTTPS port (e.g. dc1-server-consul-0.pem); turns TLS on."),
    click.option("--tls-key", default="", envvar="SHIPYARD_TLS_KEY", metavar="FILE",
                 help="Key of --tls-cert."),
    click.option("--tls-ca", default="", envvar="SHIPYARD_TLS_CA", metavar="FILE",
                 help="CA that signs client certificates (and that internal callers trust)."),
    click.option("--verify-incoming", is_flag=True, envvar="SHIPYARD_VERIFY_INCOMING",
                 help="HTTPS clients must present a certificate signed by --tls-ca (refused at the handshake)."),
    click.option("--https-port", default=8501, show_default=True, type=click.IntRange(0, 65535),
                 envvar="SHIPYARD_HTTPS_PORT",
                 help="Port of the control API over HTTPS (with --tls-cert). Plain HTTP then listens on "
                      "loopback only; --http-port 0 turns it off."),
    click.option("--gateway-tls-port", default=0, show_default=True, type=click.IntRange(0, 65535),
                 envvar="SHIPYARD_GATEWAY_TLS_PORT",
                 help="Port where the gateway terminates TLS (e.g. 8443; 0: none). Certificates: the gateway's "
                      "certificates and snis entities; --gateway-tls-cert otherwise."),
    click.option("--gateway-tls-cert", default="", metavar="FILE", envvar="SHIPYARD_GATEWAY_TLS_CERT",
                 help="Default certificate of --gateway-tls-port (default: a self-signed one made at start)."),
    click.option("--gateway-tls-key", default="", metavar="FILE", envvar="SHIPYARD_GATEWAY_TLS_KEY",
                 help="Key of --gateway-tls-cert."),
]


def tls_options(function: F) -> F:
    for option in reversed(_SERVER_OPTIONS):
        function = option(function)
    return function


def tls_config(flags: dict[str, Any]) -> TlsConfig:
    """The TlsConfig the options given to `shipyard server` describe."""
    from shipyard.api.context import TlsConfig

    return TlsConfig(cert_file=flags["tls_cert"], key_file=flags["tls_key"], ca_file=flags["tls_ca"],
                     verify_incoming=flags["verify_incoming"], https_port=flags["https_port"],
                     gateway_port=flags["gateway_tls_port"], gateway_cert_file=flags["gateway_tls_cert"],
                     gateway_key_file=flags["gateway_tls_key"])
