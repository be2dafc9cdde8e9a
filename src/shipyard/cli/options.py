"""Options several `shipyard` sub-commands share: where the server is (--http-addr, also accepted after the
sub-command) and the ports of a server that `up` starts (--http-port, --gateway-port, --dns-port).

Option callbacks only record values in the click context object; they never talk to a server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

HTTP_ADDR_ENV = ["SHIPYARD_HTTP_ADDR", "CONSUL_HTTP_ADDR"]
HTTP_ADDR_HELP = "Address of the server's control API (host:port or a URL)."


def _set_http_addr(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["http_addr"] = value


def http_addr_option() -> click.Option:
    """`--http-addr` for a sub-command: `shipyard ps --http-addr X` means the same as `shipyard --http-addr X ps`.
    No default and no envvar here: those belong to the top-level option, which this one overrides when given."""
    return click.Option(["--http-addr"], default=None, expose_value=False, callback=_set_http_addr,
                        is_eager=True, metavar="HOST:PORT",
                        help=HTTP_ADDR_HELP + " Same as the top-level option; env: " + ", ".join(HTTP_ADDR_ENV) + ".")


def add_http_addr(command: click.Command) -> None:
    """Adds --http-addr to `command` and, for a group, to every sub-command under it."""
    if not any(isinstance(p, click.Option) and "--http-addr" in p.opts for p in command.params):
        command.params.append(http_addr_option())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_http_addr(sub)


def _record_server_arg(flag: str) -> Callable[[click.Context, click.Parameter, int | None], None]:
    def record(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
        if value is None:
            return
        obj = ctx.ensure_object(dict)
        if flag == "--http-port":
            # The server `up` starts listens there, so the CLI talks to it there too.
            obj["http_addr"] = f"127.0.0.1:{value}"
        else:
            obj.setdefault("server_args", []).extend([flag, str(value)])

    return record


def server_port_options(command: F) -> F:
    """--http-port, --gateway-port and --dns-port of the server that `shipyard up` starts when none is running."""
    port = click.IntRange(0, 65535)
    for flag, envvar, help_text in (
        ("--dns-port", "SHIPYARD_DNS_PORT", "DNS port of a server `up` starts (0: no DNS) [default: 8600]."),
        ("--gateway-port", "SHIPYARD_GATEWAY_PORT", "Gateway port of a server `up` starts [default: 8080]."),
        ("--http-port", None, "Control API port of a server `up` starts, and where `up` talks to it "
                              "(sets --http-addr to 127.0.0.1:PORT) [default: 8500]."),
    ):
        command = click.option(flag, type=port, default=None, envvar=envvar, show_envvar=bool(envvar),
                               expose_value=False, callback=_record_server_arg(flag), help=help_text)(command)
    return command


def server_args() -> list[str]:
    """The server options given to the running `up` command, to pass on to the server it starts."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return list(obj.get("server_args", [])) if isinstance(obj, dict) else []
