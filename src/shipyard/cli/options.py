"""Options every `shipyard` sub-command that talks to a server shares: where the server is (--http-addr, also
accepted after the sub-command).

Option callbacks only record values in the click context object; they never talk to a server.
"""

from __future__ import annotations

import click

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
