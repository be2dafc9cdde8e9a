"""Messaging for services and workers: one Bus API (events and tasks), embedded or RabbitMQ backends.

Picks a backend from a URL; it never imports aio-pika unless a RabbitMQ URL asks for it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shipyard.bus.base import Bus, BusError, Consumer, Delivery, Message, QueueStats, Task
from shipyard.errors import BadRequest

__all__ = ["Bus", "BusError", "Consumer", "Delivery", "Message", "QueueStats", "Task", "bus_from_url"]


def bus_from_url(url: str) -> Bus:
    """`amqp://` (`amqps://`; `rabbitmq://` is a synonym) -> RabbitMQ; `http://host:port` -> the embedded broker of
    that server."""
    scheme = urlsplit(url).scheme
    if scheme in ("rabbitmq", "amqp", "amqps"):
        from shipyard.bus.rabbitmq import RabbitBus

        return RabbitBus(url)
    if scheme in ("http", "https"):
        from shipyard.bus.http_client import HttpBus

        return HttpBus(url)
    raise BadRequest(f"unsupported bus URL {url!r}: use amqp://user:pass@host:port/vhost or http://host:port")
