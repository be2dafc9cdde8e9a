"""Revisioned key/value store: the protocol and its backends (embedded SQLite; etcd later).

Nothing above the store may depend on which backend runs.
"""

from shipyard.store.base import (
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    RangeResult,
    Store,
    StoreError,
    TxnResult,
    Watcher,
    WatchOverflow,
)
from shipyard.store.follow import follow_prefix
from shipyard.store.sqlite import SqliteStore

__all__ = [
    "Compacted",
    "Compare",
    "Delete",
    "Event",
    "EventType",
    "Get",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "Put",
    "RangeResult",
    "SqliteStore",
    "Store",
    "StoreError",
    "TxnResult",
    "WatchOverflow",
    "Watcher",
    "follow_prefix",
]
