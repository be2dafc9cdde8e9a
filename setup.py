"""Builds the gateway's hot path (gateway/proxy.py, gateway/upstream.py) with mypyc into C extensions.

Why: those two modules run per request and per response in every gateway worker; compiled, a worker spends about a
fifth less CPU per proxied request (bench/gateway.py). They stay plain, typed Python: the compiled modules are made
from the same files, SHIPYARD_PURE_PYTHON=1 builds (and, at run time, loads) the source instead, and a build without
mypyc or a C compiler falls back to the source with a warning. Everything else is configured in pyproject.toml.
"""

import os
import sys

from setuptools import setup

COMPILED = ["src/shipyard/gateway/upstream.py", "src/shipyard/gateway/proxy.py"]


def ext_modules() -> list:
    if os.environ.get("SHIPYARD_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify

        # Only these modules are type-checked strictly; what they import is read for types, not judged.
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED], opt_level="3")
    except Exception as exc:  # no mypyc, no compiler, or a type error: the source still works
        print(f"shipyard: gateway not compiled ({exc}); using the Python source", file=sys.stderr)
        return []


setup(ext_modules=ext_modules())
