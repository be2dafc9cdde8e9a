"""`shipyard server` options for the DNS interface: Consul's -domain, -alt-domain, -recursor and dns_config keys.

Owns turning flags into one DnsConfig (the same dataclass a Consul config file fills); it never starts anything
and imports nothing heavy at module level (every `shipyard` command loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from shipyard.api.context import DnsConfig

F = TypeVar("F", bound=Callable[..., Any])

# DnsConfig's defaults, repeated so that the options need not import the API layer (a test compares them).
RECURSOR_TIMEOUT, NODE_TTL, UDP_ANSWER_LIMIT, MAX_STALE = "2s", "0s", 3, "87600h"


class Duration(click.ParamType):
    """A Go duration ("30s", "1m30s", "500ms") or a number of seconds, as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return float(value)  # plain seconds
        except ValueError:
            pass
        from shipyard.spec import parse_duration

        try:
            return parse_duration(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a duration (like 30s, 1m30s or 500ms)", param, ctx)


class ServiceTtl(click.ParamType):
    """NAME=DURATION, where NAME may end in * to match every service with that prefix."""

    name = "name=duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        name, sep, ttl = str(value).partition("=")
        if not sep or not name.strip():
            self.fail(f"{value!r} is not NAME=DURATION (e.g. 'web=30s' or 'db-*=5s')", param, ctx)
        return name.strip(), Duration().convert(ttl, param, ctx)


class Recursor(click.ParamType):
    name = "host[:port]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from shipyard.api.dns.recursor import parse_recursor

        try:
            host, port = parse_recursor(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DomainName(click.ParamType):
    name = "domain"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().strip(".").lower()
        labels = text.split(".") if text else []
        if any(not label or len(label) > 63 for label in labels) or len(text) > 253:
            self.fail(f"{value!r} is not a domain name", param, ctx)
        return text + "." if text else ""


_OPTIONS: list[Callable[[F], F]] = [
    click.option("--domain", default="consul", show_default=True, type=DomainName(),
                 help="DNS domain the interface answers for, as Consul's -domain."),
    click.option("--alt-domain", default="", type=DomainName(),
                 help="A second domain answered like --domain (Consul's alt_domain)."),
    click.option("--recursor", "recursors", multiple=True, type=Recursor(),
                 help="Upstream resolver for names outside the domain (repeatable, tried in order)."),
    click.option("--dns-recursor-timeout", default=RECURSOR_TIMEOUT, show_default=True, type=Duration(),
                 help="How long each recursor gets before the next one is tried."),
    click.option("--dns-recursor-strategy", default="sequential", show_default=True,
                 type=click.Choice(["sequential", "random"]), help="Order in which recursors are tried."),
    click.option("--dns-only-passing", is_flag=True,
                 help="Answer only instances whose checks all pass (default: warning ones too)."),
    click.option("--dns-node-ttl", default=NODE_TTL, show_default=True, type=Duration(),
                 help="TTL of node and address answers."),
    click.option("--dns-service-ttl", "dns_service_ttls", multiple=True, type=ServiceTtl(),
                 help="TTL of a service's answers: NAME=DURATION, NAME may end in * (repeatable)."),
    click.option("--dns-a-record-limit", default=0, show_default=True,
                 type=click.IntRange(0, 65535), help="At most this many A/AAAA answers (0: no limit)."),
    click.option("--dns-udp-answer-limit", default=UDP_ANSWER_LIMIT, show_default=True,
                 type=click.IntRange(1, 8), help="Answers to a UDP question without EDNS0."),
    click.option("--dns-enable-truncate", is_flag=True,
                 help="Set the TC bit when answers were left out, so clients retry over TCP."),
    click.option("--dns-allow-stale/--dns-no-allow-stale", default=True, show_default=True,
                 help="Answer from the catalog as this server last saw it (no read of the store per question)."),
    click.option("--dns-max-stale", default=MAX_STALE, type=Duration(),
                 show_default=True, help="With --dns-allow-stale: re-read the catalog at least this often."),
    click.option("--dns-node-meta-txt/--dns-no-node-meta-txt", "dns_node_meta_txt",
                 default=True, show_default=True,
                 help="Node meta as TXT records in the additional section (enable_additional_node_meta_txt)."),
]


def dns_options(function: F) -> F:
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


def dns_config(flags: dict[str, Any]) -> DnsConfig:
    """The DnsConfig the options given to `shipyard server` describe."""
    from shipyard.api.context import DnsConfig

    return DnsConfig(
        domain=flags["domain"] or "consul.",
        alt_domain=flags["alt_domain"],
        recursors=list(flags["recursors"]),
        recursor_timeout=flags["dns_recursor_timeout"],
        recursor_strategy=flags["dns_recursor_strategy"],
        only_passing=flags["dns_only_passing"],
        node_ttl=flags["dns_node_ttl"],
        service_ttl=dict(flags["dns_service_ttls"]),
        a_record_limit=flags["dns_a_record_limit"],
        udp_answer_limit=flags["dns_udp_answer_limit"],
        enable_truncate=flags["dns_enable_truncate"],
        allow_stale=flags["dns_allow_stale"],
        max_stale=flags["dns_max_stale"],
        enable_additional_node_meta_txt=flags["dns_node_meta_txt"],
    )
