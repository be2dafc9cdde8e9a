"""The agent's own description of one instance to run: command, env, ports, limits, restart policy.

Plain data only; it must never know about job specs, versions or placement (the caller maps those onto it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts; a run lasting `reset_after` seconds counts as stable."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0
    reset_after: float = 30.0

    def delay_for(self, consecutive_failures: int) -> float:
        """Delay before restart number `consecutive_failures` (1-based); the first one is immediate."""
        if consecutive_failures <= 1:
            return 0.0
        try:
            return min(self.max, self.initial * self.factor ** (consecutive_failures - 2))
        except OverflowError:  # a long crash loop (factor 2: the 1026th restart) is long past the cap
            return self.max


@dataclass(frozen=True)
class LogLimits:
    """Per stream: rotate at `max_bytes`, keep `max_files` files including the live one."""

    max_bytes: int = 10 * 1024 * 1024
    max_files: int = 5


@dataclass(frozen=True)
class TaskSpec:
    """One instance to run on this node. Exactly one of `args` (argv) or `cmd` (run by /bin/sh -c)."""

    service: str
    alloc_id: str
    instance: int = 0
    args: tuple[str, ...] | None = None
    cmd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ()
    static_ports: dict[str, int] = field(default_factory=dict)
    workdir: str | None = None
    stop_grace: float = 10.0
    restart: RestartPolicy = RestartPolicy()
    memory_mb: int | None = None
    cpus: float | None = None
    logs: LogLimits = LogLimits()
    health_cmd: str | None = None
    # Secret values delivered to the instance (engine token, `secrets:` values, the ACL token): in its environment
    # and in this process's memory only. Never serialised (to_dict drops it: launch and state files hold no
    # secret), never shown (repr); the shim gets it over a pipe.
    secret_env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.args is None) == (self.cmd is None):
            raise ValueError("TaskSpec needs exactly one of args or cmd")
        if self.args is not None and not self.args:
            raise ValueError("TaskSpec.args must not be empty")
        if self.args is not None and not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not isinstance(self.ports, tuple):
            object.__setattr__(self, "ports", tuple(self.ports))

    @property
    def argv(self) -> list[str]:
        return list(self.args) if self.args is not None else ["/bin/sh", "-c", self.cmd or ""]

    @property
    def port_names(self) -> list[str]:
        """Declared names first, then static names not declared, in a stable order."""
        names = list(self.ports)
        names += [name for name in self.static_ports if name not in names]
        return names

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["secret_env"]
        data["args"] = list(self.args) if self.args is not None else None
        data["ports"] = list(self.ports)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        data = dict(data)
        data.pop("secret_env", None)
        data["restart"] = RestartPolicy(**data.get("restart") or {})
        data["logs"] = LogLimits(**data.get("logs") or {})
        if data.get("args") is not None:
            data["args"] = tuple(data["args"])
        data["ports"] = tuple(data.get("ports") or ())
        return cls(**data)
