"""Discoverability of the `shipyard` command: --version, -h, every option described, environment variables shown,
--http-addr accepted after the sub-command, and --bus help that names the URL scheme the bus really takes."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from shipyard import __version__
from support import ServerProcess

SHIPYARD = [sys.executable, "-m", "shipyard.cli.main"]


def run(*args: str, env_addr: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("SHIPYARD_HTTP_ADDR", "CONSUL_HTTP_ADDR")}
    if env_addr is not None:
        env["SHIPYARD_HTTP_ADDR"] = env_addr
    return subprocess.run([*SHIPYARD, *args], capture_output=True, text=True, timeout=60, env=env)


def test_version_and_short_help() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout == f"shipyard {__version__}\n"
    for args in (["-h"], ["ps", "-h"], ["kv", "get", "-h"], ["server", "-h"]):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.startswith("Usage: shipyard"), args


def test_help_shows_environment_variables() -> None:
    top = " ".join(run("-h").stdout.split())  # click wraps; compare without the line breaks
    assert "SHIPYARD_HTTP_ADDR, CONSUL_HTTP_ADDR" in top
    server = " ".join(run("server", "-h").stdout.split())
    assert "env var: SHIPYARD_GATEWAY_PORT" in server and "env var: SHIPYARD_BUS" in server
    up = " ".join(run("up", "-h").stdout.split())
    assert "--http-port" in up and "--gateway-port" in up and "env var: SHIPYARD_GATEWAY_PORT" in up
    assert "--dns-port" in up and "env var: SHIPYARD_DNS_PORT" in up
    worker = " ".join(run("worker", "-h").stdout.split())
    assert "env var: SHIPYARD_BUS_URL" in worker and "env var: SHIPYARD_STOP_GRACE" in worker


def test_bus_help_names_the_scheme_the_server_accepts(tmp_path: object) -> None:
    server = " ".join(run("server", "-h").stdout.split())
    assert "amqp://user:pass@host:port/vhost" in server
    # The scheme the help names is one the server takes: a bad one is refused in one line naming amqp://.
    done = run("server", "--dev", "--http-port", "0", "--dns-port", "0", "--no-gateway", "--bus", "redis://x")
    assert done.returncode == 1 and "use amqp://user:pass@host:port/vhost" in done.stderr, done.stderr


def test_an_error_with_square_brackets_is_printed_as_written() -> None:
    """Rich markup is not applied to the message: `[/namespace]` once crashed the error printer with a traceback."""
    done = run("server", "--dev", "--http-port", "0", "--dns-port", "0", "--no-gateway", "--single-server",
               "--store", "http://127.0.0.1:1")
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: unsupported --store 'http://127.0.0.1:1': use etcd://host:port[/namespace]"), done.stderr


def _commands() -> list[tuple[str, click.Command]]:
    from shipyard.cli.main import _register_subcommands, cli

    _register_subcommands()
    out: list[tuple[str, click.Command]] = []

    def walk(command: click.Command, path: str) -> None:
        out.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(cli, "shipyard")
    return out


def test_every_command_and_option_is_described() -> None:
    missing = [f"{path} {param.opts[0]}" for path, command in _commands() for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not param.help]
    missing += [path for path, command in _commands() if not (command.help or command.short_help)]
    assert missing == []


@pytest.mark.parametrize("args", [["ps"], ["services"], ["kv", "list"], ["queues"], ["gateway", "routes"],
                                  ["members"]])
def test_http_addr_after_the_subcommand(server: ServerProcess, args: list[str]) -> None:
    # The top-level default points nowhere useful; the option after the sub-command wins.
    done = run(*args, "--http-addr", server.addr, env_addr="127.0.0.1:1")
    assert done.returncode == 0, done.stderr
    # And it is in that sub-command's help.
    assert "--http-addr" in run(*args, "-h").stdout


def test_every_command_that_talks_to_a_server_takes_http_addr() -> None:
    lacking = [path for path, command in _commands()
               if path not in ("shipyard", "shipyard server", "shipyard agent")  # daemons: --server, --bind
               and not any(isinstance(p, click.Option) and "--http-addr" in p.opts for p in command.params)]
    assert lacking == []
