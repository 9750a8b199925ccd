"""The last hour of each node's telemetry, for the dashboard's charts.

The hub keeps only a node's latest sample (hub/protocol.py `NodeView`); telemetry is not journaled (it would dwarf
the journal), so this history lives in memory and starts empty on every hub start. It is bounded twice: per node a
fixed ring of `SLOTS` samples, one per `RESOLUTION_MS` of clock time at most (a newer sample inside that time replaces
the older, so the chart always ends with the latest figure), and only the metrics charted (`METRICS`) are kept, as 32-bit
floats. 5,000 nodes cost about 20 MB.

Pure: the caller passes the time of each sample and of each read.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from typing import Any, Final

METRICS: Final = ("cpu", "mem", "disk", "temp")  # what the node view charts (agent/telemetry.py reports these)
WINDOW_MS: Final = 3_600_000
RESOLUTION_MS: Final = 15_000
SLOTS: Final = WINDOW_MS // RESOLUTION_MS


class Ring:
    """One node's samples: times (ms) and one column per metric, oldest overwritten first."""

    __slots__ = ("at", "columns", "next", "size")

    def __init__(self, slots: int) -> None:
        self.at = array("q", bytes(8 * slots))
        self.columns = {metric: array("f", [math.nan]) * slots for metric in METRICS}
        self.next = 0  # the slot the next sample goes to
        self.size = 0

    def add(self, at: int, metrics: Mapping[str, float], resolution: int) -> None:
        last = (self.next - 1) % len(self.at)
        if self.size and at < self.at[last]:
            return  # an older sample sent late (from a node's outbox): the chart moves forward only
        if not self.size or at // resolution != self.at[last] // resolution:
            slot = self.next
            self.next = (self.next + 1) % len(self.at)
            self.size = min(self.size + 1, len(self.at))
        else:
            slot = last  # within the slot's resolution: the newer sample stands for it
        self.at[slot] = at
        for metric, column in self.columns.items():
            value = metrics.get(metric)
            column[slot] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan

    def series(self, since: int) -> dict[str, Any]:
        """The samples at or after `since`, oldest first; a metric the node never reported is left out, a missing
        figure is null."""
        start = (self.next - self.size) % len(self.at)
        order = [(start + i) % len(self.at) for i in range(self.size)]
        order = [slot for slot in order if self.at[slot] >= since]
        out: dict[str, Any] = {"at": [self.at[slot] for slot in order]}
        for metric, column in self.columns.items():
            values = [None if math.isnan(column[slot]) else round(column[slot], 2) for slot in order]
            if any(value is not None for value in values):
                out[metric] = values
        return out


class TelemetryHistory:
    """Every node's ring, made on its first sample and dropped when the hub forgets the node."""

    def __init__(self, window_ms: int = WINDOW_MS, resolution_ms: int = RESOLUTION_MS) -> None:
        self.window_ms, self.resolution_ms = window_ms, resolution_ms
        self.slots = max(1, window_ms // resolution_ms)
        self.rings: dict[str, Ring] = {}

    def add(self, node: str, at: int, metrics: Mapping[str, float]) -> None:
        ring = self.rings.get(node)
        if ring is None:
            ring = self.rings[node] = Ring(self.slots)
        ring.add(at, metrics, self.resolution_ms)

    def forget(self, node: str) -> None:
        self.rings.pop(node, None)

    def series(self, node: str, now: int) -> dict[str, Any]:
        ring = self.rings.get(node)
        out = ring.series(now - self.window_ms) if ring is not None else {"at": []}
        return {"window_ms": self.window_ms, "resolution_ms": self.resolution_ms, **out}
