"""Wires a server's gateway into its cluster: the rate-limit counts of its gateway workers are shared with every other
server's (several servers on etcd) and every agent's gateway (`shipyard agent --gateway`); gateway/cluster_counters.py
does the work.

It only decides whether to share and starts and stops the sync; it never counts or admits a request.
"""

from __future__ import annotations

from shipyard.api.context import Platform
from shipyard.gateway.cluster_counters import ClusterCounters
from shipyard.gateway.counters import shared_counters
from shipyard.store.etcd import EtcdStore

GATEWAY_COUNTERS = "gateway-counters"


async def start_gateway_counters(platform: Platform, shared_path: str) -> None:
    """This server's gateway counts are published and the other gateways' added to its counters file, so a rate limit
    holds across every gateway of the cluster. A lone server (SQLite, or --single-server on etcd) shares only once
    some agent's gateway has published its counts: until then it reads and writes nothing."""
    config = platform.config
    if not shared_path:
        return
    alone = not isinstance(platform.store, EtcdStore) or config.single_server
    sync = ClusterCounters(platform.store, shared_counters(shared_path), platform.node.id,
                           interval=config.gateway_sync, wait_for_others=alone)
    platform.extras[GATEWAY_COUNTERS] = sync
    await sync.start()


async def stop_gateway_counters(platform: Platform) -> None:
    sync = platform.extras.pop(GATEWAY_COUNTERS, None)
    if isinstance(sync, ClusterCounters):
        await sync.stop()
