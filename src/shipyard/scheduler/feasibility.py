"""A job's placement rules against the nodes: constraints on attributes and meta, distinct hosts and properties,
spread over an attribute's values, and, when no node fits, why, counted per rule and per node class.

Pure over the planner's NodePool and the snapshot's nodes; it never reads the store or the clock, and it never
decides how many instances a job needs (reconcile does) or books capacity itself (the planner reserves).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from shipyard.scheduler.model import Allocation, Node
from shipyard.scheduler.placement import NodePool
from shipyard.spec import Constraint, Spread, TaskSpec, parse_version_constraint

NUMBER_PREFIX_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def node_value(node: Node, attribute: str) -> str | None:
    """What `${...}` names on this node, or None when the node does not have it."""
    inner = attribute[2:-1] if attribute.startswith("${") and attribute.endswith("}") else attribute
    if inner in ("node.unique.name", "node.name", "node.unique.id"):
        return node.id
    if inner == "node.class":
        return node.node_class or None
    if inner == "node.datacenter":
        return node.attributes.get("datacenter")
    kind, _, name = inner.partition(".")
    if kind == "attr":
        return node.attributes.get(name)
    if kind == "meta":
        return node.meta.get(name)
    return None


@lru_cache(maxsize=256)
def _regexp(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def version_matches(value: str, ranges: str) -> bool:
    """'6.1.0-18-amd64' against '>= 5.4, < 7': the leading dotted number of the value, compared part by part
    (missing parts are 0); '~> 5.10' allows 5.10 up to, not including, 6.0 (Nomad's pessimistic operator)."""
    match = NUMBER_PREFIX_RE.match(value)
    if match is None:
        return False
    have = tuple(int(n) for n in match.group(1).split("."))
    return all(_compare(have, op, want) for op, want in parse_version_constraint(ranges))


def _compare(have: tuple[int, ...], op: str, want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
    if op == "~>":
        return a >= b and (len(want) < 2 or have[:len(want) - 1] == want[:-1])
    return {"=": a == b, "!=": a != b, ">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]


def constraint_holds(constraint: Constraint, node: Node) -> bool:
    """A node filter (every operator but distinct_hosts and distinct_property, which depend on other instances).
    A missing attribute fails every operator but !=, not_regexp and is_not_set, as in Nomad."""
    op, want = constraint.operator, constraint.value
    value = node_value(node, constraint.attribute)
    if op == "is_set":
        return value is not None
    if op == "is_not_set":
        return value is None
    if op == "!=":
        return value != want
    if op == "not_regexp":
        return value is None or _regexp(want).search(value) is None
    if value is None:
        return False
    if op == "=":
        return value == want
    if op == "regexp":
        return _regexp(want).search(value) is not None
    if op == "version":
        return version_matches(value, want)
    return True


def describe(constraint: Constraint) -> str:
    if constraint.operator in ("is_set", "is_not_set"):
        return f"{constraint.attribute} {constraint.operator}"
    return f"{constraint.attribute} {constraint.operator} {constraint.value}"


def _by_class(counts: Counter[str]) -> str:
    return ", ".join(f"{cls or 'none'}: {n}" for cls, n in sorted(counts.items()))


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


@dataclass
class _SpreadState:
    spread: Spread
    used: Counter[str] = field(default_factory=Counter)
    desired: dict[str, float] = field(default_factory=dict)


class RulePlacer:
    """Chooses nodes for one job's new instances under its placement rules; feasible nodes are found once per job
    (constraints depend only on the node), the rest (resources, distinct, spread) per instance."""

    def __init__(self, pool: NodePool, nodes: Iterable[Node], spec: TaskSpec, counted: Iterable[Allocation]) -> None:
        """counted: the job's instances that stay where they are (not being stopped or moved off a node)."""
        self.pool = pool
        self.spec = spec
        self.nodes: dict[int, Node] = {pool.index_of[n.id]: n for n in nodes if n.id in pool.index_of}
        filters = [c for c in spec.constraints if c.operator not in ("distinct_hosts", "distinct_property")]
        self.distinct_hosts = spec.distinct_hosts or any(c.operator == "distinct_hosts" for c in spec.constraints)
        self.distinct_props = [(c.attribute, int(c.value or 1)) for c in spec.constraints
                               if c.operator == "distinct_property"]
        self.ineligible: Counter[str] = Counter()
        self.filtered: dict[str, Counter[str]] = {}
        self.feasible: list[int] = []
        for i, node in sorted(self.nodes.items()):
            if not pool.eligible[i]:
                self.ineligible[node.node_class] += 1
                continue
            failed = next((c for c in filters if not constraint_holds(c, node)), None)
            if failed is not None:
                self.filtered.setdefault(describe(failed), Counter())[node.node_class] += 1
                continue
            self.feasible.append(i)
        self.on_node: Counter[int] = Counter()
        self.prop_used: list[Counter[str]] = [Counter() for _ in self.distinct_props]
        self.spreads = [_SpreadState(s) for s in spec.spread]
        for alloc in counted:
            at = pool.index_of.get(alloc.node)
            if at is not None:
                self._count(at)
        self._plan_spreads()

    def _plan_spreads(self) -> None:
        """How many instances each value should get: its target percent, or an even share (the values not listed
        share what the targets leave); values are those of the feasible nodes."""
        total = max(1, self.spec.instances)
        for state in self.spreads:
            values = sorted({v for i in self.feasible if (v := node_value(self.nodes[i], state.spread.attribute))
                             is not None})
            targets = state.spread.targets
            others = [v for v in values if v not in targets]
            rest = max(0, 100 - sum(targets.values())) if targets else 100
            for value in values:
                percent = targets.get(value, rest / len(others) if others else 0.0)
                state.desired[value] = total * percent / 100

    def _count(self, i: int) -> None:
        node = self.nodes[i]
        self.on_node[i] += 1
        for n, (attribute, _) in enumerate(self.distinct_props):
            value = node_value(node, attribute)
            if value is not None:
                self.prop_used[n][value] += 1
        for state in self.spreads:
            value = node_value(node, state.spread.attribute)
            if value is not None:
                state.used[value] += 1

    def _distinct_ok(self, i: int) -> str:
        """'' when the node keeps the job's instances distinct, else the rule that rules it out."""
        if self.distinct_hosts and self.on_node[i]:
            return "distinct_hosts"
        for n, (attribute, limit) in enumerate(self.distinct_props):
            value = node_value(self.nodes[i], attribute)
            if value is None or self.prop_used[n][value] >= limit:
                return f"distinct_property {attribute} (at most {limit} per value)"
        return ""

    def _spread_score(self, i: int) -> float:
        """Nomad's spread boost, weighted: (desired - used) / desired per spread, -1 for a value that gets none."""
        if not self.spreads:
            return 0.0
        score = weights = 0.0
        for state in self.spreads:
            value = node_value(self.nodes[i], state.spread.attribute)
            desired = state.desired.get(value, 0.0) if value is not None else 0.0
            used = state.used[value] if value is not None else 0
            boost = -1.0 if desired <= 0 else max(-1.0, min(1.0, (desired - used) / desired))
            score += boost * state.spread.weight
            weights += state.spread.weight
        return score / weights

    def choose(self, cpu: int, mem: int) -> int | None:
        """The feasible node with room and the best spread, then the best binpack fit (lowest index on ties)."""
        pool = self.pool
        best: tuple[float, float, int] | None = None  # (spread score, fitness, -index)
        for i in self.feasible:
            if pool.cpu_free[i] < cpu or pool.mem_free[i] < mem or self._distinct_ok(i):
                continue
            key = (round(self._spread_score(i), 9), pool.fitness(i, cpu, mem), -i)
            if best is None or key > best:
                best = key
        return None if best is None else -best[2]

    def placed(self, i: int) -> None:
        self._count(i)

    def why(self, cpu: int, mem: int) -> str:
        """Why choose() found nothing, per rule and node class, e.g. 'no node fits (3 nodes): constraint ${meta.rack}
        = r1 filtered 2 nodes (class web: 2); memory exhausted on 1 node (class none: 1; needs 512 MB, ...)'."""
        if not self.nodes:
            return "no nodes"
        parts = []
        if self.ineligible:
            parts.append(f"{_nodes(sum(self.ineligible.values()))} ineligible or draining "
                         f"(class {_by_class(self.ineligible)})")
        for text, counts in self.filtered.items():
            parts.append(f"constraint {text} filtered {_nodes(sum(counts.values()))} (class {_by_class(counts)})")
        distinct, exhausted = self._tally(cpu, mem)
        for rule, counts in distinct.items():
            parts.append(f"{rule} filtered {_nodes(sum(counts.values()))} (class {_by_class(counts)})")
        for dimension, counts in exhausted.items():
            parts.append(f"{dimension} exhausted on {_nodes(sum(counts.values()))} (class {_by_class(counts)}; "
                         f"{self._need(dimension, cpu, mem)})")
        return f"no node fits ({_nodes(len(self.nodes))}): " + "; ".join(parts)

    def _tally(self, cpu: int, mem: int) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]]]:
        """The feasible nodes left out, by node class: per distinct rule, and per resource exhausted."""
        distinct: dict[str, Counter[str]] = {}
        exhausted: dict[str, Counter[str]] = {}
        for i in self.feasible:
            cls = self.nodes[i].node_class
            rule = self._distinct_ok(i)
            if rule:
                distinct.setdefault(rule, Counter())[cls] += 1
            elif self.pool.mem_free[i] < mem:
                exhausted.setdefault("memory", Counter())[cls] += 1
            elif self.pool.cpu_free[i] < cpu:
                exhausted.setdefault("cpu", Counter())[cls] += 1
        return distinct, exhausted

    def counts(self, cpu: int, mem: int) -> tuple[tuple[str, int], ...]:
        """The same as why(), as figures (see model.Unplaceable.counts)."""
        distinct, exhausted = self._tally(cpu, mem)
        figures = {"nodes": len(self.nodes), "ineligible": sum(self.ineligible.values()),
                   "constraint": sum(sum(c.values()) for c in self.filtered.values()),
                   "distinct": sum(sum(c.values()) for c in distinct.values()),
                   "memory": sum(exhausted.get("memory", Counter()).values()),
                   "cpu": sum(exhausted.get("cpu", Counter()).values())}
        return tuple(figures.items())

    def _need(self, dimension: str, cpu: int, mem: int) -> str:
        free = self.pool.mem_free if dimension == "memory" else self.pool.cpu_free
        i = max(self.feasible, key=lambda i: (free[i], -i))
        unit, amount = ("MB", mem) if dimension == "memory" else ("MHz", cpu)
        return f"needs {amount} {unit}, most free: {self.pool.ids[i]} with {free[i]} {unit}"


def pool_counts(pool: NodePool, cpu: int, mem: int) -> tuple[tuple[str, int], ...]:
    """For a job without placement rules: the nodes, the ineligible ones, and those short of memory or cpu."""
    figures = {"nodes": len(pool.ids), "ineligible": 0, "constraint": 0, "distinct": 0, "memory": 0, "cpu": 0}
    for i in range(len(pool.ids)):
        if not pool.eligible[i]:
            figures["ineligible"] += 1
        elif pool.mem_free[i] < mem:
            figures["memory"] += 1
        elif pool.cpu_free[i] < cpu:
            figures["cpu"] += 1
    return tuple(figures.items())


def by_class_note(pool: NodePool, nodes: Iterable[Node], cpu: int, mem: int) -> str:
    """For a job without placement rules in a cluster whose nodes have classes: where each class fell short."""
    classes = {n.id: n.node_class for n in nodes}
    if not any(classes.values()):
        return ""
    short: Counter[str] = Counter()
    ineligible: Counter[str] = Counter()
    for i, node_id in enumerate(pool.ids):
        cls = classes.get(node_id, "")
        if not pool.eligible[i]:
            ineligible[cls] += 1
        elif pool.cpu_free[i] < cpu or pool.mem_free[i] < mem:
            short[cls] += 1
    parts = []
    if short:
        parts.append(f"resources exhausted on {_nodes(sum(short.values()))} (class {_by_class(short)})")
    if ineligible:
        parts.append(f"{_nodes(sum(ineligible.values()))} ineligible or draining (class {_by_class(ineligible)})")
    return "; ".join(parts)
