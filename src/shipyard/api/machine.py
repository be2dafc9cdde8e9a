"""What a server and a `shipyard agent` both do on their machine: hold the data dir, tell a loopback address,
keep the gateway's default certificate. Kept apart from api/server.py so that an agent process (a server starts one
for its own node) does not import the whole server to start.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import tempfile
from pathlib import Path

from shipyard.errors import ShipyardError
from shipyard.tls import self_signed
from shipyard.tls.authority import write_private


class DataDirInUse(ShipyardError):
    status = 409


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lock_data_dir(data_dir: str) -> int:
    """Holds an exclusive lock on the data dir for the life of the process (released on exit or kill)."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    path = Path(data_dir) / "LOCK"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(
            f"data dir {data_dir} is in use by another shipyard server (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def gateway_certificate_files(cert_file: str, key_file: str, data_dir: str | None) -> tuple[str, str]:
    """The gateway's default certificate and key files: the operator's, else a self-signed pair kept in `data_dir`
    (a temporary directory without one), made once. A server's and a `shipyard agent`'s gateway alike."""
    if cert_file:
        return os.path.abspath(cert_file), os.path.abspath(key_file or cert_file)
    folder = Path(data_dir or tempfile.mkdtemp(prefix="shipyard-gateway-tls-"))
    cert, key = folder / "gateway-default-cert.pem", folder / "gateway-default-key.pem"
    if not (cert.exists() and key.exists()):
        cert.unlink(missing_ok=True)
        key.unlink(missing_ok=True)
        cert_pem, key_pem = self_signed("localhost", ["localhost"])
        write_private(key, key_pem, 0o600)
        write_private(cert, cert_pem, 0o644)
    return str(cert), str(key)
