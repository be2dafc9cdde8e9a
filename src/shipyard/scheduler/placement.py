"""Node capacity bookkeeping and best-fit node choice for one plan, in O(log nodes) per placement.

It must never decide how many instances a job needs, and never scans every node to place one instance.
"""

from __future__ import annotations

from collections.abc import Iterable

from sortedcontainers import SortedList

from shipyard.scheduler.model import TERMINAL, Allocation, Node

# After the first fitting node is found, look this many more steps for better-scoring candidates.
SEARCH_SLACK = 4


class NodePool:
    """Free cpu and memory per node, indexed twice (by free cpu, by free memory) to find a fit quickly.

    Best fit in two dimensions: the two indexes are walked in lockstep from the smallest free amount that
    could fit; a node skipped in one index (too little of the other resource) is usually found early in the
    other, so full nodes cost nothing. Candidates are then ranked with Nomad's binpack fitness.
    """

    def __init__(self, nodes: Iterable[Node], allocations: Iterable[Allocation] = (), floor: tuple[int, int] = (0, 0),
                 ) -> None:
        # Nodes with less than the smallest demand of this plan (floor: cpu, memory) leave the indexes, so
        # nodes that are full in either dimension never slow down a search.
        self.floor_cpu, self.floor_mem = floor
        self.ids: list[str] = []
        self.cpu_total: list[int] = []
        self.mem_total: list[int] = []
        self.cpu_free: list[int] = []
        self.mem_free: list[int] = []
        self.eligible: list[bool] = []
        self.index_of: dict[str, int] = {}
        for node in nodes:
            self.index_of[node.id] = len(self.ids)
            self.ids.append(node.id)
            self.cpu_total.append(node.cpu)
            self.mem_total.append(node.memory)
            self.cpu_free.append(node.cpu)
            self.mem_free.append(node.memory)
            self.eligible.append(node.eligible and not node.draining)
        for alloc in allocations:
            i = self.index_of.get(alloc.node)
            if i is not None and alloc.desired == "run" and alloc.client not in TERMINAL:
                self.cpu_free[i] -= alloc.cpu
                self.mem_free[i] -= alloc.memory
        live = [i for i, ok in enumerate(self.eligible) if ok and self._useful(i)]
        self.by_cpu = SortedList((self.cpu_free[i], i) for i in live)
        self.by_mem = SortedList((self.mem_free[i], i) for i in live)

    def fitness(self, i: int, cpu: int, mem: int) -> float:
        """Nomad's ScoreFitBinPack after placing: 18 for a node left full, 0 for one left empty."""
        free_cpu = (self.cpu_free[i] - cpu) / self.cpu_total[i] if self.cpu_total[i] else 0.0
        free_mem = (self.mem_free[i] - mem) / self.mem_total[i] if self.mem_total[i] else 0.0
        return 20.0 - (10.0 ** free_cpu + 10.0 ** free_mem)

    def choose(self, cpu: int, mem: int, spread: dict[int, int] | None = None, spread_total: int = 1,
               candidates: int = 2) -> int | None:
        """The best-fitting eligible node for (cpu, mem), or None when none fits.

        With spread, nodes already running instances of the same job are penalised as in Nomad.
        """
        cpu_free, mem_free = self.cpu_free, self.mem_free
        walks = [(self.by_mem.irange((mem, -1)), True), (self.by_cpu.irange((cpu, -1)), False)]
        found: list[int] = []
        steps = 0
        first_at = -1
        while walks and len(found) < candidates:
            for walk in list(walks):
                entry = next(walk[0], None)
                if entry is None:
                    walks.remove(walk)
                    continue
                i = entry[1]
                fits = cpu_free[i] >= cpu if walk[1] else mem_free[i] >= mem
                if fits and i not in found:
                    found.append(i)
                    if first_at < 0:
                        first_at = steps
            steps += 1
            if first_at >= 0 and steps - first_at > SEARCH_SLACK:
                break
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        if spread:
            # As Nomad's job anti-affinity: normalised fitness minus (collisions + 1) / count on busy nodes.
            def score(i: int) -> float:
                collisions = spread.get(i, 0)
                penalty = (collisions + 1) / spread_total if collisions else 0.0
                return self.fitness(i, cpu, mem) / 18.0 - penalty
            return max(found, key=score)
        return max(found, key=lambda i: self.fitness(i, cpu, mem))

    def _useful(self, i: int) -> bool:
        return self.cpu_free[i] >= self.floor_cpu and self.mem_free[i] >= self.floor_mem

    def reserve(self, i: int, cpu: int, mem: int) -> None:
        indexed = self.eligible[i] and self._useful(i)
        if indexed:
            self.by_cpu.remove((self.cpu_free[i], i))
            self.by_mem.remove((self.mem_free[i], i))
        self.cpu_free[i] -= cpu
        self.mem_free[i] -= mem
        if indexed and self._useful(i):
            self.by_cpu.add((self.cpu_free[i], i))
            self.by_mem.add((self.mem_free[i], i))

    def unplaceable_reason(self, cpu: int, mem: int) -> str:
        """Why choose() found nothing, naming the closest node, e.g. 'no node has 512 MB free memory (...)'."""
        # Rare (once per job that does not fit), so a scan of the eligible nodes is fine here.
        eligible = [i for i, ok in enumerate(self.eligible) if ok]
        if not eligible:
            return "no eligible nodes" if self.ids else "no nodes"
        most_mem, mi = max((self.mem_free[i], -i) for i in eligible)
        most_cpu, ci = max((self.cpu_free[i], -i) for i in eligible)
        mi, ci = -mi, -ci
        biggest_mem = max((self.mem_total[i], i) for i in eligible)
        biggest_cpu = max((self.cpu_total[i], i) for i in eligible)
        if mem > biggest_mem[0]:
            return f"needs {mem} MB memory, more than any node has (largest: {self.ids[biggest_mem[1]]} " \
                   f"with {biggest_mem[0]} MB)"
        if cpu > biggest_cpu[0]:
            return f"needs {cpu} MHz cpu, more than any node has (largest: {self.ids[biggest_cpu[1]]} " \
                   f"with {biggest_cpu[0]} MHz)"
        if most_mem < mem:
            return f"no node has {mem} MB free memory (best: {self.ids[mi]} with {most_mem} MB)"
        if most_cpu < cpu:
            return f"no node has {cpu} MHz free cpu (best: {self.ids[ci]} with {most_cpu} MHz)"
        return (f"no node has both {cpu} MHz cpu and {mem} MB memory free (most memory: {self.ids[mi]} "
                f"with {most_mem} MB and {self.cpu_free[mi]} MHz)")
