"""Warnings a sender can provoke at will (refused or shed messages, refused commands, enrollment mischief), logged
without letting that sender flood the log or the receiver's memory. The hub and the agent use the same one."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable


class ThrottledLog:
    """The first warning of each key at once, then at most one line per key per interval, with the count since.
    Callers key by a fixed set (a refusal reason, an enrollment outcome), never by anything a sender chooses such as
    a node id or a topic, so memory stays bounded."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[Hashable, float] = {}
        self._since: collections.Counter[Hashable] = collections.Counter()

    def warning(self, key: Hashable, message: str) -> None:
        now = self.clock()
        self._since[key] += 1
        last = self._last.get(key)
        if last is None or now - last >= self.interval:
            count = self._since.pop(key)
            self._last[key] = now
            since = f" ({count} such in the last {now - last:.0f} s)" if last is not None else ""
            self.logger.warning("%s%s", message, since)
