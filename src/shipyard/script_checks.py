"""The one switch for health checks that run a command (--enable-script-checks): Consul script checks, Marathon
COMMAND checks and shipyard.yaml `health: command` all ask it when they are submitted and again right before running.

It holds the switch and nothing else; it never runs a command itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shipyard.errors import ShipyardError
from shipyard.spec import TaskSpec

# Consul's own text, which Consul clients and tests match on.
SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true"
)
COMMAND_CHECKS_DISABLED = "command checks are disabled on this server (start it with --enable-script-checks)"


class ScriptChecksDisabled(ShipyardError):
    status = 403


def runs_command(spec: TaskSpec) -> bool:
    return spec.health is not None and spec.health.kind == "command"


@dataclass(frozen=True)
class ScriptChecks:
    enabled: bool = False

    def require_for(self, specs: Iterable[TaskSpec]) -> None:
        """Refuses specs whose health check runs a command while the switch is off."""
        if self.enabled:
            return
        names = [s.name for s in specs if runs_command(s)]
        if names:
            raise ScriptChecksDisabled(f"{', '.join(names)}: the health check runs a command, and "
                                       f"{COMMAND_CHECKS_DISABLED}", {"jobs": names})
