"""Helpers for the secrets engine's tests: a real `shipyard server` with its Vault listener, and hvac clients.

Tests reach the engine only over HTTP, as Vault's clients do.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import hvac
import requests

from support import ServerProcess, free_port


class VaultServer(ServerProcess):
    """A server with the secrets engine on a free --vault-port (no gateway: these tests do not need it)."""

    def __init__(self, data_dir: Path, *extra: str, dev: bool = False) -> None:
        self.vault_port = free_port()
        super().__init__(data_dir, "--no-gateway", "--vault-port", str(self.vault_port), *extra, dev=dev)

    def start(self, timeout: float = 20.0) -> VaultServer:
        """Started once the engine's own port accepts connections (the control API answers before it listens)."""
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.vault_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the secrets engine did not listen: {self.log_tail()}")

    @property
    def vault_url(self) -> str:
        return f"http://127.0.0.1:{self.vault_port}"

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.vault_url, token=token)

    def raw(self, method: str, path: str, token: str = "", **kwargs: object) -> requests.Response:
        headers = {"X-Vault-Token": token} if token else {}
        return requests.request(method, f"{self.vault_url}/v1/{path}", headers=headers, timeout=10,
                                **kwargs)  # type: ignore[arg-type]


def init_and_unseal(server: VaultServer, shares: int = 3, threshold: int = 2) -> tuple[str, list[str]]:
    """Initialises the engine and unseals it with the first `threshold` shares; returns (root token, shares)."""
    client = server.client()
    result = client.sys.initialize(secret_shares=shares, secret_threshold=threshold)
    client.sys.submit_unseal_keys(result["keys"][:threshold])
    assert not client.sys.is_sealed()
    return result["root_token"], result["keys"]
