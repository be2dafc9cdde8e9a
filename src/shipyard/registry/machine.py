"""What the machine a node runs on is made of — kernel, architecture, OS, hostname, cores — under the attribute
names Nomad's fingerprints use, so placement constraints read `${attr.kernel.name}`, `${attr.cpu.arch}`...

It only looks at this machine (platform, /etc/os-release); it never writes anything and never decides placement.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

# Python's (uname's) machine names to Go's GOARCH, which Nomad reports as cpu.arch.
GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
           "armv6l": "arm", "i386": "386", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
           "riscv64": "riscv64"}


def _os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def machine_attributes() -> dict[str, str]:
    """{"kernel.name": "linux", "kernel.version": "6.1.0-18-amd64", "kernel.arch": "x86_64", "cpu.arch": "amd64",
    "cpu.numcores": "8", "os.name": "debian", "os.version": "12", "unique.hostname": "web-3"} (what is known)."""
    machine = platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    release = _os_release()
    attributes = {
        "kernel.name": platform.system().lower(),
        "kernel.version": platform.release(),
        "kernel.arch": machine,
        "cpu.arch": GO_ARCH.get(machine.lower(), machine.lower()),
        "cpu.numcores": str(cores),
        "os.name": release.get("ID", ""),
        "os.version": release.get("VERSION_ID", ""),
        "unique.hostname": socket.gethostname(),
    }
    return {k: v for k, v in attributes.items() if v}
