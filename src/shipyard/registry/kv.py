"""Consul KV semantics over the store (being written)."""

from __future__ import annotations


class ConsulKV:
    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store = store
