"""Who this server is in the catalog: node name, id, address and datacenter.

The id persists in the data dir so a restart is the same node; nothing else is decided here.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    id: str
    address: str
    datacenter: str

    @classmethod
    def load(cls, data_dir: str | None, *, name: str, address: str, datacenter: str) -> NodeIdentity:
        node_id = str(uuid.uuid4())
        if data_dir is not None:
            path = Path(data_dir) / "node-id"
            if path.exists():
                node_id = path.read_text().strip() or node_id
            else:
                path.write_text(node_id + "\n")
        return cls(name or socket.gethostname(), node_id, address, datacenter)


def reachable_address(address: str) -> str:
    """Where a process of this machine reaches what binds `address`: a wildcard (or nothing) means loopback."""
    return address if address not in ("", "0.0.0.0", "::") else "127.0.0.1"
