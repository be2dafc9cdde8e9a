"""How many instances a worker with `autoscale:` should run, from its queue's figures: a pure function.

It must never read the bus, the store or the clock; the autoscaler loop (bus/autoscaler.py) feeds it and acts.
"""

from __future__ import annotations

import math
from typing import Protocol

from shipyard.spec import Autoscale

# Scale down only to a count that would run at most this fraction of target_depth each, so a queue hovering
# around a boundary does not flap between two counts (the hysteresis band).
SCALE_DOWN_LOAD = 0.8


class QueueFigures(Protocol):
    """What the decision reads from the bus's QueueStats (structural, so the scheduler needs no bus import)."""

    ready: int
    in_flight: int


def clamp(n: int, policy: Autoscale) -> int:
    return max(policy.min, min(policy.max, n))


def desired_instances(stats: QueueFigures | None, policy: Autoscale, current: int, *,
                      since_last_change: float = math.inf) -> int:
    """The instance count to run now. Work is what waits plus what is being worked on (delayed messages are not
    work yet). Up at once to ceil(work / target_depth); down only after `cooldown` seconds without a change and
    only as far as keeps each instance under SCALE_DOWN_LOAD of the target; always within [min, max].
    No figures (the queue does not exist yet) means no evidence: keep the count, within bounds."""
    held = clamp(current, policy)
    if stats is None:
        return held
    work = max(0, stats.ready) + max(0, stats.in_flight)
    up = clamp(math.ceil(work / policy.target_depth), policy)
    if up > held:
        return up
    down = clamp(math.ceil(work / (policy.target_depth * SCALE_DOWN_LOAD)), policy)
    if down < held and since_last_change >= policy.cooldown:
        return down
    return held
