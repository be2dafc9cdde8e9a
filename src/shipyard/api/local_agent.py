"""The server's own node agent: `shipyard agent`, started by the server for the machine it runs on, as every machine
of a cluster without a server runs it (DESIGN: "on one machine the server starts the same agent for itself").

So there is one way instances run: the same process, talking to the servers through the same HTTP API and token,
registering its node on a lease, probing its instances' checks, serving their logs and usage on its own listener,
fetching their secrets and ACL tokens from a server. The server keeps what a Consul server keeps: the catalog's
API registrations and their checks (an instance's checks are the agent's: registration.is_instance_check), DNS,
the gateway and the leader's loops.

This module only starts, restarts (with backoff) and stops that process; it never runs an instance. The agent shares
the server's data dir (instances are adopted from `<data dir>/agent` across restarts, by whichever agent runs next)
and dies with the server (PR_SET_PDEATHSIG), so a server killed with -9 leaves its instances running under their
shims for the next server's agent, never an orphaned agent at work on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time

from shipyard.api.context import ServerConfig
from shipyard.api.machine import is_loopback
from shipyard.private_files import OPERATOR_UMASK_ENV, operator_umask
from shipyard.registry.agents import agent_alive_key
from shipyard.registry.node import NodeIdentity, reachable_address
from shipyard.scheduler.records import node_key
from shipyard.store import Get, Store
from shipyard.tasks import cancel_and_wait
from shipyard.tokens import TOKEN_VARIABLES

log = logging.getLogger("shipyard.server")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 60.0
STOP_GRACE = 60.0  # a --dev server's agent stops its instances first (drain delay, each one's stop grace)
READY_TIMEOUT = 30.0
NODE_AGENT = "node-agent"  # its key in Platform.extras
SERVER_INSTANCE_ENV = "SHIPYARD_NODE_AGENT_ENV"  # JSON: what the agent tells its instances about the platform


def node_agent_rules(node: str) -> str:
    """The agent's token: its node (registration, service tokens, secrets of what is placed there), the store."""
    return f'store = "write"\nnode "{node}" {{ policy = "write" }}'


class LocalNodeAgent:
    """Keeps `shipyard agent --server-pid <this server>` running for this server's node."""

    def __init__(self, config: ServerConfig, node: NodeIdentity, data_dir: str, *, control_url: str,
                 instance_env: dict[str, str], stop_instances: bool) -> None:
        self.config = config
        self.node = node
        self.data_dir = data_dir
        self.control_url = control_url
        self.instance_env = instance_env  # what instances are told about the platform (the server's platform_env)
        self.stop_instances = stop_instances  # --dev: its instances stop with it
        self.token = ""  # with ACLs: the agent's own token (set before start)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def command(self) -> list[str]:
        config, node = self.config, self.node
        address = reachable_address(node.address)
        args = [sys.executable, "-m", "shipyard.cli.main", "agent", "--server", self.control_url,
                "--node", node.name, "--node-id", node.id, "--advertise", address, "--datacenter", node.datacenter,
                "--data-dir", self.data_dir, "--port", "0", "--http-port", "0", "--dns-port", "0",
                "--drain-delay", str(config.drain_delay), "--server-pid", str(os.getpid()),
                "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()]
        for key, value in sorted(config.node_meta.items()):
            args += ["--meta", f"{key}={value}"]
        if config.node_class:
            args += ["--node-class", config.node_class]
        if config.enable_script_checks:
            args.append("--enable-script-checks")
        # The server's certificate is its agent's: a client's towards an HTTPS control API (as the gateway workers'),
        # and, on a non-loopback address, what makes the agent's logs port HTTPS (the certificate names that
        # address, as the server's HTTPS clients reach it there).
        tls = config.tls
        if self.control_url.startswith("https://") or (tls.enabled and not is_loopback(address)):
            args += ["--ca-file", os.path.abspath(tls.ca_file)] if tls.ca_file else []
            args += ["--client-cert", os.path.abspath(tls.cert_file), "--client-key", os.path.abspath(tls.key_file)]
        if self.stop_instances:
            args.append("--stop-instances-on-exit")
        return args

    def environment(self) -> dict[str, str]:
        """The server's environment without a caller's Consul settings (the agent uses only what it is given), plus
        its token and the instances' platform env, in the environment rather than on a command line."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CONSUL_") and k not in TOKEN_VARIABLES and k != "SHIPYARD_HTTP_ADDR"}
        if self.token:
            env[TOKEN_VARIABLES[0]] = self.token
        env[SERVER_INSTANCE_ENV] = json.dumps(self.instance_env)
        env[OPERATOR_UMASK_ENV] = f"{operator_umask():o}"  # instances keep the operator's umask, not the server's
        return env

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_running(), name="node-agent")

    async def wait_registered(self, store: Store, timeout: float = READY_TIMEOUT) -> bool:
        """True once the agent holds its node's lease and has written its node's record for placement (so a server
        that says ready can place on its own node, and `node eligibility` finds it); False after `timeout` (it goes
        on trying; the server is ready anyway: the scheduler places once the node is there)."""
        deadline = time.monotonic() + timeout
        keys = [agent_alive_key(self.node.name), node_key(self.node.name)]
        while time.monotonic() < deadline:
            if all(kv for kv in (await store.txn((), [Get(key) for key in keys])).ranges()):
                return True
            await asyncio.sleep(0.05)
        log.warning("this node's agent has not registered after %.0fs (%s); instances wait for it", timeout,
                    self.last_exit or "still starting")
        return False

    async def _keep_running(self) -> None:
        delay = BACKOFF_INITIAL
        while not self._stopping:
            started = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(*self.command(), env=self.environment(),
                                                                 stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                log.error("cannot start this node's agent: %s", exc)
            else:
                code = await self.proc.wait()
                if self._stopping:
                    return
                self.restarts += 1
                self.last_exit = f"exit code {code}" if code >= 0 else f"signal {-code}"
                log.warning("this node's agent (pid %d) exited with %s; starting it again in %.1fs", self.proc.pid,
                            self.last_exit, delay)
            if time.monotonic() - started > BACKOFF_RESET_AFTER:
                delay = BACKOFF_INITIAL
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def stop(self) -> None:
        """SIGTERM: it leaves the cluster (and, for a --dev server, stops its instances); SIGKILL past the grace."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await cancel_and_wait(self._task)
