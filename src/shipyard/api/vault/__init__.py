"""The Vault-compatible HTTP edge on its own listener (--vault-port): /v1/ paths, Vault's headers and error bodies.

It turns HTTP into engine requests and engine answers into Vault's JSON; it never decides who may do what.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_server import Server

from shipyard.agent.node_agent import NodeAgent
from shipyard.api.vault.delivery import SecretChangeWatcher, files_root_for, secrets_env_hook
from shipyard.api.vault.node_delivery import ClusterSecretChangeWatcher
from shipyard.errors import ShipyardError
from shipyard.scheduler.jobs import JobService
from shipyard.secrets.barrier import Barrier
from shipyard.secrets.core import VaultCore, decode_key
from shipyard.secrets.request import Missing, Request
from shipyard.secrets.wrapping import wrap_ttl
from shipyard.store import Store

log = logging.getLogger("shipyard.vault")

# Vault's default max_request_size is 32 MiB; secrets are small, and the store keeps every entry in one row.
MAX_REQUEST_BODY = 1 << 20
CORE: web.AppKey[VaultCore] = web.AppKey("vault_core", VaultCore)
_METHODS = {"GET": "read", "HEAD": "read", "POST": "update", "PUT": "update", "DELETE": "delete", "LIST": "list",
            "PATCH": "patch"}


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _errors(status: int, *messages: str) -> web.Response:
    return _json(status, {"errors": [m for m in messages if m]})


async def _request_data(request: web.Request, operation: str) -> dict[str, Any]:
    if operation in ("read", "list", "delete"):
        return {k: v for k, v in request.query.items() if k != "list"}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ShipyardError("failed to parse JSON input: invalid JSON body", status=400) from None
    if not isinstance(data, dict):
        raise ShipyardError("failed to parse JSON input: the body must be a JSON object", status=400)
    return data


def _operation(request: web.Request) -> str:
    operation = _METHODS.get(request.method)
    if operation is None:
        raise ShipyardError(f"unsupported method {request.method}", status=405)
    if operation == "read" and request.query.get("list", "").lower() in ("true", "1"):
        return "list"
    return operation


async def vault_request(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    path = request.match_info["path"]
    if request.headers.get("Origin") and request.headers.get("X-Vault-Request", "").lower() != "true":
        return _errors(403, "permission denied")  # a browser's cross-site request: no custom header, no entry
    try:
        operation = _operation(request)
        if path == "sys/health":
            status, body = await core.health(dict(request.query))
            return _json(status, body) if request.method != "HEAD" else web.Response(status=status)
        token = request.headers.get("X-Vault-Token", "")
        bearer = request.headers.get("Authorization", "")
        if not token and bearer.lower().startswith("bearer "):
            token = bearer[7:].strip()
        req = Request(operation, path, await _request_data(request, operation), token,
                      remote_address=request.remote or "",
                      wrap_ttl=wrap_ttl(request.headers.get("X-Vault-Wrap-TTL", "")))
        response = await core.handle(req)
    except Missing as exc:
        return _json(404, exc.body) if exc.body is not None else _errors(404)
    except web.HTTPRequestEntityTooLarge:
        return _errors(413, f"http: request body too large (limit {MAX_REQUEST_BODY} bytes)")
    except ShipyardError as exc:
        return _errors(exc.status, exc.message)
    except Exception:
        log.exception("unhandled error on %s /v1/%s", request.method, path)
        return _errors(500, "internal error")
    return web.Response(status=204) if response is None else _json(200, response)


def build_vault_app(core: VaultCore) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    app[CORE] = core
    app.router.add_route("*", "/v1/{path:.*}", vault_request)
    return app


def lenient_protocol(server: Server, loop: asyncio.AbstractEventLoop) -> Callable[[], RequestHandler]:
    """aiohttp's protocol with its pure-Python parser: the C parser (llhttp) refuses methods it does not know, and
    Vault's clients send LIST (hvac, the vault CLI). The Python parser takes any token as a method."""

    def make() -> RequestHandler:
        handler = server()
        handler._parser = HttpRequestParserPy(
            handler, loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=128,
            payload_exception=RequestPayloadError, auto_decompress=True, max_msg_queue_size=32)
        return handler

    return make


class VaultService:
    """The engine and its listener, as the server starts and stops them."""

    def __init__(self, store: Store, bind: str, port: int, *, dev: bool, data_dir: str | None,
                 dev_root_token: str = "", ssl_context: ssl.SSLContext | None = None) -> None:
        self.core = VaultCore(Barrier(store))
        self.bind, self.port, self.dev, self.data_dir = bind, port, dev, data_dir
        self.dev_root_token = dev_root_token
        self.ssl_context = ssl_context
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.watcher: SecretChangeWatcher | None = None
        self.root_token = ""  # dev mode only: shown once at start, as `vault server -dev` does

    @property
    def address(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.bind}:{self.port}"

    async def start(self) -> None:
        await self.unseal_if_dev()
        await self.listen()

    async def unseal_if_dev(self) -> None:
        if self.dev and self.core.barrier.sealed:
            await self._dev_unseal()

    async def listen(self) -> None:
        self.runner = web.AppRunner(build_vault_app(self.core), access_log=None, handle_signals=False,
                                    shutdown_timeout=2.0)
        await self.runner.setup()
        assert self.runner.server is not None
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(lenient_protocol(self.runner.server, loop), self.bind, self.port,
                                                 backlog=1024, reuse_address=True, ssl=self.ssl_context)

    async def _dev_unseal(self) -> None:
        """Dev mode initialises and unseals itself. With a data dir (`shipyard up`) the single unseal key is kept
        in <data dir>/vault-dev.json (0600) so that a restart unseals again: convenient, and not for production."""
        keep = os.path.join(self.data_dir, "vault-dev.json") if self.data_dir else ""
        if keep and os.path.exists(keep) and await self.core.barrier.seal_config() is not None:
            with open(keep) as fh:
                saved = json.load(fh)
            await self.core.barrier.unseal_with(decode_key(saved["unseal_key"]))
            await self.core.post_unseal()
            self.root_token = saved["root_token"]
            return
        if await self.core.barrier.seal_config() is not None:
            log.warning("secrets engine: --vault-dev, but this data dir was initialised without it: it stays sealed")
            return
        result = await self.core.dev_start(self.dev_root_token)
        self.root_token = self.dev_root_token or result["root_token"]
        if keep:
            fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"unseal_key": result["keys"][0], "root_token": self.root_token}, fh)

    def attach(self, agent: NodeAgent | None, jobs: JobService | None) -> None:
        """Instances get their secrets at each start, wait for an unseal when sealed, and follow changes. Without
        an in-process agent (this server's node agent is its own process), that agent gets its instances' secrets
        through the node API as every agent does; the watcher still acts on jobs that must restart."""
        self.watcher = ClusterSecretChangeWatcher(self.core, self.core.barrier.store, agent, jobs,
                                                  files_root_for(self.data_dir))
        if agent is not None:
            agent.instance_env = secrets_env_hook(self.core, self.address, agent.instance_env, self.watcher)
            self.core.on_unseal.append(agent.reconcile)
        self.watcher.start()

    async def stop(self) -> None:
        await self.core.stop_following()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.core.barrier.seal()
