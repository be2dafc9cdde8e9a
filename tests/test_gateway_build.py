"""The gateway's per-request modules ship compiled by mypyc (setup.py); a build older than its source, or
SHIPYARD_PURE_PYTHON=1, makes the package load the source instead (never stale code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard.gateway import COMPILED_MODULES, data_plane_build


def _tree(tmp_path: Path, compiled: bool, source_newer: str | None = None, by: float = 1_000) -> Path:
    for name in COMPILED_MODULES:
        (tmp_path / f"{name}.py").write_text("# source\n")
        os.utime(tmp_path / f"{name}.py", (1_000, 1_000))
        if compiled:
            build = tmp_path / f"{name}.cpython-311-x86_64-linux-gnu.so"
            build.write_bytes(b"\x7fELF")
            os.utime(build, (2_000, 2_000))
    if source_newer:
        os.utime(tmp_path / f"{source_newer}.py", (2_000 + by, 2_000 + by))
    return tmp_path


def test_a_fresh_build_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHIPYARD_PURE_PYTHON", raising=False)
    assert data_plane_build(_tree(tmp_path, compiled=True)) == "compiled"
    # A wheel's installer may write a .py a moment after its .so: still the build of that very source.
    assert data_plane_build(_tree(tmp_path, compiled=True, source_newer="upstream", by=1)) == "compiled"


def test_no_build_or_an_older_one_means_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHIPYARD_PURE_PYTHON", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert data_plane_build(_tree(tmp_path / "a", compiled=False)) == "source (not compiled)"
    verdict = data_plane_build(_tree(tmp_path / "b", compiled=True, source_newer="proxy"))
    assert verdict.startswith("source (proxy.py is newer than its compiled build")


def test_pure_python_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_PURE_PYTHON", "1")
    assert data_plane_build(_tree(tmp_path, compiled=True)) == "source (SHIPYARD_PURE_PYTHON is set)"


def _loaded(env: dict[str, str]) -> list[str]:
    code = ("import shipyard.gateway as g, shipyard.gateway.proxy as p, shipyard.gateway.upstream as u; "
            "print(g.DATA_PLANE_BUILD); print(p.__file__); print(u.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_the_installed_package_loads_what_it_says() -> None:
    """With a C compiler at install time (make test has one here) the workers run the compiled modules; with
    SHIPYARD_PURE_PYTHON=1 the very same package runs both from source."""
    env = {k: v for k, v in os.environ.items() if k != "SHIPYARD_PURE_PYTHON"}
    verdict, proxy, upstream = _loaded(env)
    if shutil.which("gcc") or shutil.which("cc"):
        assert verdict == "compiled", verdict
    if verdict == "compiled":
        assert proxy.endswith(".so") and upstream.endswith(".so")
    verdict, proxy, upstream = _loaded({**env, "SHIPYARD_PURE_PYTHON": "1"})
    assert verdict.startswith("source") and proxy.endswith("proxy.py") and upstream.endswith("upstream.py")
