"""Memory and cpu limits of instances: a cgroup v2 sub-cgroup per instance where the host lets us write one,
else RSS polling of the instance's process tree. It must never choose which instances run, only cap them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.agent.state import proc_stat

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupSupport:
    """Whether instances get a cgroup v2 sub-cgroup; when not, `reason` says why (shown by `shipyard ps`)."""

    available: bool
    reason: str
    base: Path | None = None
    controllers: frozenset[str] = field(default_factory=frozenset)

    def describe(self, memory: bool, cpu: bool) -> str:
        """One line for `shipyard ps`: how this instance's limits are enforced."""
        parts = []
        if self.available:
            if memory:
                parts.append("memory: cgroup v2")
            if cpu:
                parts.append("cpu: cgroup v2" if "cpu" in self.controllers else "cpu: not enforced (no cpu controller)")
        else:
            if memory:
                parts.append("memory: RSS polling")
            if cpu:
                parts.append("cpu: not enforced")
            if parts:
                parts.append(f"cgroup v2 unavailable: {self.reason}")
        return "; ".join(parts)


def _cgroup2_mounts(mountinfo: str) -> list[Path]:
    mounts = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            mounts.append(Path(pre.split()[4]))
    return mounts


def _own_cgroup_v2_path(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _enable_controllers(cgroup: Path, wanted: set[str]) -> None:
    enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    missing = wanted - enabled
    if missing:
        (cgroup / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))


def detect_cgroup_support(base_name: str = "shipyard", *, proc_root: Path = Path("/proc")) -> CgroupSupport:
    """Find a writable cgroup v2 hierarchy with the memory controller and prepare `<ours>/<base_name>`."""
    try:
        mounts = _cgroup2_mounts((proc_root / "self/mountinfo").read_text())
        own = _own_cgroup_v2_path((proc_root / "self/cgroup").read_text())
    except OSError as exc:
        return CgroupSupport(False, f"cannot read /proc: {exc}")
    if not mounts:
        return CgroupSupport(False, "no cgroup v2 filesystem mounted")
    if own is None:
        return CgroupSupport(False, "this process is not in a cgroup v2 hierarchy")
    mount = mounts[0]
    parent = mount / own.lstrip("/")
    try:
        controllers = set((parent / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return CgroupSupport(False, f"cannot read {parent}/cgroup.controllers: {exc}")
    if "memory" not in controllers:
        listed = " ".join(sorted(controllers)) or "none"
        return CgroupSupport(
            False, f"cgroup v2 at {mount} has no memory controller (controllers: {listed}; a v1/hybrid host)"
        )
    if not os.access(parent, os.W_OK):
        return CgroupSupport(False, f"{parent} is not writable (not root, or not delegated)")
    wanted = {"memory"} | ({"cpu"} & controllers)
    base = parent / base_name
    try:
        _enable_controllers(parent, wanted)
        base.mkdir(exist_ok=True)
        _enable_controllers(base, wanted)
    except OSError as exc:
        # EBUSY here is cgroup v2's "no internal processes" rule: our own cgroup holds processes.
        return CgroupSupport(False, f"cannot enable {' '.join(sorted(wanted))} under {parent}: {exc.strerror or exc}")
    return CgroupSupport(True, "cgroup v2", base, frozenset(wanted))


def create_instance_cgroup(support: CgroupSupport, name: str, memory_mb: int | None, cpus: float | None) -> Path:
    """A fresh sub-cgroup for one run of an instance, with memory.max and cpu.max set."""
    assert support.available and support.base is not None
    path = support.base / name
    if path.exists():
        remove_instance_cgroup(path)
    path.mkdir()
    if memory_mb is not None:
        (path / "memory.max").write_text(str(memory_mb * 1024 * 1024))
        try:
            # Swap would let an instance pass its limit without being killed.
            (path / "memory.swap.max").write_text("0")
        except OSError:
            pass
    if cpus is not None and "cpu" in support.controllers:
        (path / "cpu.max").write_text(f"{max(1000, int(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
    return path


def kill_cgroup(path: Path) -> None:
    """SIGKILL every process in the cgroup at once (cgroup.kill, Linux 5.14+); silently absent before."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        pass


def cgroup_oom_killed(path: Path) -> bool:
    try:
        for line in (path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
    except OSError:
        pass
    return False


def remove_instance_cgroup(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process visible in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = (stat[1], stat[2], stat[0])
    return table


def instance_pids(root_pid: int, pgid: int, table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """Live (non-zombie) processes of an instance: descendants of `root_pid` (excluded) plus members of `pgid`."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root_pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found |= {pid for pid, (_, group, _) in table.items() if group == pgid}
    found.discard(root_pid)
    return {pid for pid in found if table.get(pid, (0, 0, "X"))[2] not in ("Z", "X")}


def descendant_pids(root_pid: int) -> set[int]:
    """Every descendant of root_pid, found through /proc/<pid>/task/<tid>/children.

    Costs reads proportional to the instance's own process tree, not to every process on the machine:
    a shim polls this every second, and with a hundred shims a full /proc scan each would cost cores."""
    found: set[int] = set()
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    children = [int(c) for c in fh.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in found:
                    found.add(child)
                    stack.append(child)
    return found


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_bytes().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total
