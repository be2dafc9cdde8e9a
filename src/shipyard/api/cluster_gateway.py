"""Wires a server's gateway into its cluster: with several servers on etcd, the rate-limit counts of its gateway
workers are shared with every other server's (gateway/cluster_counters.py does the work).

It only decides whether to share and starts and stops the sync; it never counts or admits a request.
"""

from __future__ import annotations

from shipyard.api.context import Platform
from shipyard.gateway.cluster_counters import ClusterCounters
from shipyard.gateway.counters import shared_counters
from shipyard.store.etcd import EtcdStore

GATEWAY_COUNTERS = "gateway-counters"


async def start_gateway_counters(platform: Platform, shared_path: str) -> None:
    """Several servers on etcd: this server's gateway counts are published and the others' added to its counters
    file, so a rate limit holds across every gateway of the cluster. Alone (SQLite, or --single-server on etcd)
    there is nobody to share with: nothing starts."""
    config = platform.config
    if not isinstance(platform.store, EtcdStore) or config.single_server or not shared_path:
        return
    sync = ClusterCounters(platform.store, shared_counters(shared_path), platform.node.id,
                           interval=config.gateway_sync)
    platform.extras[GATEWAY_COUNTERS] = sync
    await sync.start()


async def stop_gateway_counters(platform: Platform) -> None:
    sync = platform.extras.pop(GATEWAY_COUNTERS, None)
    if isinstance(sync, ClusterCounters):
        await sync.stop()
