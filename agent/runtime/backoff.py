"""Reconnect delays."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import ClassVar


class Backoff:
    """Exponential backoff with +-20% jitter, so a fleet that lost its broker does not reconnect in lockstep."""

    # Where a Backoff made without `rng` gets one: unseeded here; the deterministic simulation (sim/dst.py) hands out
    # seeded ones, so the reconnect delays of the agents and the hub it runs repeat with the seed.
    new_rng: ClassVar[Callable[[], random.Random]] = random.Random

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.rng = initial, maximum, rng or Backoff.new_rng()
        self.current = initial

    def next(self) -> float:
        delay = self.current * self.rng.uniform(0.8, 1.2)
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial
