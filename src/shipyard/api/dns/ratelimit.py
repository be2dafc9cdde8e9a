"""Log lines about what clients send, at most one per kind per interval, with a count of those held back.

Owns only the counting: whoever sends garbage must never be able to fill the log; it never drops a first line.
"""

from __future__ import annotations

import logging
import time

INTERVAL = 60.0  # a flood of bad packets costs one line a minute per kind


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        if held:
            self.logger.warning(message + " (%d more like it in the last %.0fs)", *args, held, now - (last or now))
        else:
            self.logger.warning(message, *args)
