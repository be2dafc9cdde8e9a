"""Library for people who write services and workers on Shipyard: Service (serve an ASGI app, /health, /metrics,
self-registration), client (call another service by name), config (typed live settings from the KV), BusApp.

It reaches the platform only over the network (HTTP API, AMQP); it never imports the server's internals.
"""

from shipyard.sdk import config
from shipyard.sdk.bus import BusApp, Worker
from shipyard.sdk.client import ServiceClient, ServiceUnavailable, client
from shipyard.sdk.correlation import correlation_id
from shipyard.sdk.server_api import SdkError, ServerUnreachable
from shipyard.sdk.service import Service

__all__ = [
    "BusApp",
    "SdkError",
    "ServerUnreachable",
    "Service",
    "ServiceClient",
    "ServiceUnavailable",
    "Worker",
    "client",
    "config",
    "correlation_id",
]
