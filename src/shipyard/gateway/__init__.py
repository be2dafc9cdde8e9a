"""The API gateway: data plane worker processes, the route table, balancers, and plugins.

Workers read the store only through the server's HTTP API (RemoteStore); they never open its files.

The per-request modules (proxy, upstream) are built into C extensions by mypyc when the package is installed
(setup.py). A compiled module is used only while it is newer than its source: after an edit (or with
SHIPYARD_PURE_PYTHON=1) both are loaded from their .py files, so a stale build can never run old code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

COMPILED_MODULES = ("upstream", "proxy")  # in import order
HERE = Path(__file__).parent
# An installer writes a wheel's .py and .so files moments apart, in either order; an edit comes later than this.
INSTALL_SKEW = 10.0


def data_plane_build(directory: Path = HERE) -> str:
    """'compiled' or why the source is used; decided once, before the modules are first imported."""
    if os.environ.get("SHIPYARD_PURE_PYTHON"):
        return "source (SHIPYARD_PURE_PYTHON is set)"
    for name in COMPILED_MODULES:
        builds = list(directory.glob(f"{name}.cpython-*.so")) + list(directory.glob(f"{name}.*.pyd"))
        if not builds:
            return "source (not compiled)"
        if max(b.stat().st_mtime for b in builds) + INSTALL_SKEW < (directory / f"{name}.py").stat().st_mtime:
            return f"source ({name}.py is newer than its compiled build: reinstall to compile it again)"
    return "compiled"


def _load_sources() -> None:
    """Imports the compiled modules from their .py files, ahead of the extension the import system would prefer.
    All of them or none: compiled modules call each other natively and cannot be mixed with source ones."""
    for name in COMPILED_MODULES:
        full = f"{__name__}.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


DATA_PLANE_BUILD = data_plane_build()
if DATA_PLANE_BUILD != "compiled":
    _load_sources()
