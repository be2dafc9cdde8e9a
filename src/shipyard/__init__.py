"""Shipyard: a self-hosted microservice platform in one Python package.

The package root exports only the version; components live in their own subpackages.
"""

__version__ = "0.1.0"
