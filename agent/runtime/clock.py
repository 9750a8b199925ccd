"""Time as the processes read it. Decision code never calls these: it takes `now` as an argument, so a test or a
deterministic simulation can hand it any clock. Shells take a `Clock` and default to the wall clock."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], int]
"""Milliseconds since the epoch."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000
