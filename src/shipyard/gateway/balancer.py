"""Choosing an instance for a request: round-robin, least connections, consistent hash, weights; passive health.

Balancers are immutable and rebuilt with the route table; the runtime state they consult (failures, ejections,
in-flight counts) lives in one HealthBoard per worker. Nothing here does I/O or knows about HTTP parsing.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from shipyard.gateway.routes import BalancingSpec, Target

MAX_SCHEDULE = 1000  # round-robin positions; weights beyond this are scaled down (canary ratios stay close)
VNODES_PER_WEIGHT = 40
MAX_RING = 20000


@dataclass(slots=True)
class TargetHealth:
    failures: int = 0  # consecutive
    ejected_until: float = 0.0
    active: int = 0  # requests in flight on this instance from this worker


@dataclass
class HealthBoard:
    """Passive health of every instance this worker talked to, keyed by "host:port"; survives table swaps."""

    states: dict[str, TargetHealth] = field(default_factory=dict)
    ejections: int = 0  # instances ejected now or before: while 0, balancers skip health lookups

    def state(self, address: str) -> TargetHealth:
        st = self.states.get(address)
        if st is None:
            st = self.states[address] = TargetHealth()
        return st

    def available(self, address: str, now: float) -> bool:
        st = self.states.get(address)
        return st is None or st.ejected_until <= now

    def report_success(self, address: str) -> None:
        st = self.states.get(address)
        if st is not None and st.failures:
            st.failures = 0

    def eject(self, address: str, spec: BalancingSpec) -> None:
        """Ejects an instance at once (a refused connect: nothing listens there, no need to wait for N failures)."""
        st = self.state(address)
        st.failures = 0
        st.ejected_until = time.monotonic() + spec.eject_seconds
        self.ejections += 1

    def report_failure(self, address: str, spec: BalancingSpec) -> bool:
        """Counts a transport failure or timeout; True when this one ejects the instance."""
        st = self.state(address)
        st.failures += 1
        if st.failures >= spec.failures:
            st.failures = 0
            st.ejected_until = time.monotonic() + spec.eject_seconds
            self.ejections += 1
            return True
        return False


class RetryBudget:
    """Retries may add at most `ratio` of the requests seen, plus `per_second` for idle periods (Finagle's budget),
    so a dying instance cannot multiply the load on the others."""

    __slots__ = ("_last", "cap", "per_second", "ratio", "tokens")

    def __init__(self, ratio: float = 0.2, per_second: float = 10.0, cap: float = 200.0) -> None:
        self.ratio, self.per_second, self.cap = ratio, per_second, cap
        self.tokens = cap
        self._last = time.monotonic()

    def deposit(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def withdraw(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self._last) * self.per_second)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Balancer:
    """Base: `pick(board, key, exclude)` returns a target or None when there are none at all."""

    tracks_active = False

    def __init__(self, targets: tuple[Target, ...], spec: BalancingSpec) -> None:
        self.targets = targets
        self.spec = spec
        self.needs_key = spec.algorithm == "consistent-hashing"

    def pick(self, board: HealthBoard, key: bytes | None = None, exclude: Collection[str] = ()) -> Target | None:
        raise NotImplementedError

    def _fallback(self, board: HealthBoard, exclude: Collection[str]) -> Target | None:
        """Every candidate is ejected: try the one whose ejection ends first rather than fail the request."""
        candidates = [t for t in self.targets if t.address not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda t: board.state(t.address).ejected_until)


class RoundRobin(Balancer):
    """Smooth weighted round-robin (nginx's): weights 99/1 send 1 request in 100 to the canary, evenly spread."""

    def __init__(self, targets: tuple[Target, ...], spec: BalancingSpec) -> None:
        super().__init__(targets, spec)
        weights = [t.weight for t in targets]
        total = sum(weights)
        if total > MAX_SCHEDULE:
            weights = [max(1, round(w * MAX_SCHEDULE / total)) for w in weights]
        divisor = math.gcd(*weights) if weights else 1
        weights = [w // divisor for w in weights]
        current = [0] * len(weights)
        schedule: list[Target] = []
        for _ in range(sum(weights)):
            for i, w in enumerate(weights):
                current[i] += w
            best = max(range(len(weights)), key=lambda i: current[i])
            current[best] -= sum(weights)
            schedule.append(targets[best])
        self.schedule = schedule
        self.position = 0

    def pick(self, board: HealthBoard, key: bytes | None = None, exclude: Collection[str] = ()) -> Target | None:
        schedule = self.schedule
        n = len(schedule)
        if n == 0:
            return None
        if not board.ejections and not exclude:
            pos = self.position
            self.position = pos + 1 if pos + 1 < n else 0
            return schedule[pos]
        states = board.states
        for _ in range(n):
            pos = self.position
            self.position = pos + 1 if pos + 1 < n else 0
            target = schedule[pos]
            address = target.address
            st = states.get(address)
            if (st is None or st.ejected_until == 0.0 or st.ejected_until <= time.monotonic()) and (
                not exclude or address not in exclude
            ):
                return target
        return self._fallback(board, exclude)


class LeastConnections(Balancer):
    """Fewest requests in flight from this worker, relative to weight; ties rotate."""

    tracks_active = True

    def __init__(self, targets: tuple[Target, ...], spec: BalancingSpec) -> None:
        super().__init__(targets, spec)
        self.position = 0

    def pick(self, board: HealthBoard, key: bytes | None = None, exclude: Collection[str] = ()) -> Target | None:
        n = len(self.targets)
        if n == 0:
            return None
        now = time.monotonic()
        self.position = (self.position + 1) % n
        best, best_load = None, 0.0
        for i in range(n):
            target = self.targets[(self.position + i) % n]
            if target.address in exclude or not board.available(target.address, now):
                continue
            load = (board.state(target.address).active + 1) / target.weight
            if best is None or load < best_load:
                best, best_load = target, load
        return best if best is not None else self._fallback(board, exclude)


class ConsistentHash(Balancer):
    """A hash ring with virtual nodes per unit of weight: a key keeps its instance while the set is stable, and
    only the keys of an instance that leaves move. Requests without a key are spread round-robin."""

    def __init__(self, targets: tuple[Target, ...], spec: BalancingSpec) -> None:
        super().__init__(targets, spec)
        total = sum(t.weight for t in targets) or 1
        scale = min(VNODES_PER_WEIGHT, max(1, MAX_RING // total))
        ring = []
        for t in targets:
            for v in range(t.weight * scale):
                ring.append((_hash64(f"{t.address}#{v}".encode()), t))
        ring.sort(key=lambda item: item[0])
        self.points = [p for p, _ in ring]
        self.ring = [t for _, t in ring]
        self.fallback = RoundRobin(targets, spec)

    def pick(self, board: HealthBoard, key: bytes | None = None, exclude: Collection[str] = ()) -> Target | None:
        if not self.ring:
            return None
        if not key:
            return self.fallback.pick(board, None, exclude)
        now = time.monotonic()
        start = bisect.bisect(self.points, _hash64(key))
        n = len(self.ring)
        seen: set[str] = set()
        for i in range(n):
            target = self.ring[(start + i) % n]
            address = target.address
            if address in seen:
                continue
            seen.add(address)
            if address not in exclude and board.available(address, now):
                return target
            if len(seen) == len(self.targets):
                break
        return self._fallback(board, exclude)


def build_balancer(targets: tuple[Target, ...], spec: BalancingSpec) -> Balancer:
    if spec.algorithm == "least-connections":
        return LeastConnections(targets, spec)
    if spec.algorithm == "consistent-hashing" and spec.hash_on in ("header", "cookie", "ip"):
        return ConsistentHash(targets, spec)
    return RoundRobin(targets, spec)
