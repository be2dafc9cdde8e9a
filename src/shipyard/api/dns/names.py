"""What a name under the Consul domain asks for: `[tag.]<svc>.service`, `_<svc>._<tag>`, `<node>.node`, ...

Owns the grammar of Consul's DNS names (as Consul's own dispatch reads them, right to left); it never looks
anything up.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("service", "connect", "virtual", "ingress", "node", "query", "addr")


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: str  # one of KINDS, or "" for a name that means nothing (NXDOMAIN)
    datacenter: str = ""
    service: str = ""  # service, connect, ingress; prepared query name for "query"
    tag: str = ""
    node: str = ""
    addr: str = ""  # hex digits of an .addr name


INVALID = Lookup("")


def zone_of(name: str, domains: tuple[str, ...]) -> str | None:
    """The configured domain (no trailing dot) a lower-case name falls in; the longest one wins."""
    best: str | None = None
    for domain in domains:
        if domain and (name == domain or name.endswith("." + domain)) and (best is None or len(domain) > len(best)):
            best = domain
    return best


def parse_lookup(labels: list[str], *, srv: bool, datacenter: str) -> Lookup:
    """Labels of the name with the domain removed, e.g. ["web", "service", "dc1"]."""
    kind, parts, suffixes = _split(labels, srv)
    if not parts:
        return INVALID
    if kind == "query":
        return _query(parts, suffixes, datacenter)
    dc = _locality(suffixes, datacenter)
    if dc is None:
        return INVALID
    if kind == "service":
        return _service(parts, dc)
    if kind in ("connect", "ingress", "virtual"):
        return Lookup(kind, dc, service=parts[-1])
    if kind == "node":
        return Lookup("node", dc, node=".".join(parts))
    if kind == "addr" and len(parts) == 1:
        return Lookup("addr", dc, addr=parts[0])  # the datacenter is not checked, as in Consul
    return INVALID


def _service(parts: list[str], dc: str) -> Lookup:
    if len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
        tag = parts[1][1:]
        return Lookup("service", dc, service=parts[0][1:], tag="" if tag == "tcp" else tag)
    return Lookup("service", dc, service=parts[-1], tag=".".join(parts[:-1]))  # [tag.]<svc>, tags may hold dots


def _query(parts: list[str], suffixes: list[str], datacenter: str) -> Lookup:
    if len(suffixes) > 1:
        return INVALID
    dc = suffixes[0] if suffixes else datacenter
    if len(parts) >= 2 and parts[0].startswith("_") and parts[-1].startswith("_"):
        return Lookup("query", dc, service=".".join(parts[:-1])[1:])  # _<query>._<proto>: proto ignored
    return Lookup("query", dc, service=".".join(parts))


def _split(labels: list[str], srv: bool) -> tuple[str, list[str], list[str]]:
    for i in range(len(labels) - 1, -1, -1):
        label = labels[i]
        if label in KINDS:
            return label, labels[:i], labels[i + 1 :]
        if srv and label.startswith("_"):
            # An SRV question may leave out ".service": _web._tcp.consul.
            return "service", labels[: i + 1], labels[i + 1 :]
    return "", [], []


def _locality(suffixes: list[str], datacenter: str) -> str | None:
    """`[<dc>]` or `<dc>.dc` after the kind label; None for anything else."""
    if not suffixes:
        return datacenter
    if len(suffixes) == 1:
        return suffixes[0]
    if len(suffixes) == 2 and suffixes[1] == "dc":
        return suffixes[0]
    return None
