"""Fault files: a YAML list of timed faults, applied by `fleetflow sim` (and usable from tests).

    faults:
      - {at: 5, kill: {percent: 10}}                      # power cut: no DISCONNECT, the broker sends the Will
      - {at: 5, partition: {count: 2, for: 8}}            # stop all traffic, keep sockets open; heal after 8 s
      - {at: 8, spike: {count: 1, metrics: {temp: 95}, for: 10}}
      - {at: 8, slow: {count: 2, factor: 3}}              # steps take 3x as long
      - {at: 8, skew: {count: 1, seconds: 300}}           # the device's clock runs 5 minutes ahead
      - {at: 10, flap: {count: 1, times: 3, every: 2}}    # power cut, reboot, repeatedly
      - {at: 12, rogue: {forged: 5, replayed: 5}}         # an attacker forges and replays messages
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hub.workflow import load_model_text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pick(_Model):
    count: int | None = Field(None, ge=1)
    percent: float | None = Field(None, gt=0, le=100)
    nodes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self) -> Pick:
        if sum(x is not None and x != [] for x in (self.count, self.percent, self.nodes or None)) != 1:
            raise ValueError("give exactly one of count, percent or nodes")
        return self


class Partition(Pick):
    for_: float = Field(10.0, alias="for", gt=0)


class Spike(Pick):
    metrics: dict[str, float]
    for_: float = Field(10.0, alias="for", gt=0)


class Slow(Pick):
    factor: float = Field(gt=0)


class Skew(Pick):
    seconds: float


class Flap(Pick):
    times: int = Field(3, ge=1, le=100)
    every: float = Field(2.0, gt=0)


class Rogue(_Model):
    forged: int = Field(5, ge=0, le=10_000)
    replayed: int = Field(5, ge=0, le=10_000)


class Fault(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    at: float = Field(ge=0, description="seconds after the devices are up")
    kill: Pick | None = None
    partition: Partition | None = None
    spike: Spike | None = None
    slow: Slow | None = None
    skew: Skew | None = None
    flap: Flap | None = None
    rogue: Rogue | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Fault:
        kinds = [k for k in ("kill", "partition", "spike", "slow", "skew", "flap", "rogue") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"each fault has exactly one kind, found {kinds or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("kill", "partition", "spike", "slow", "skew", "flap", "rogue") if getattr(self, k))


class FaultPlan(_Model):
    faults: list[Fault] = Field(default_factory=list)


def load_faults(path: Path) -> FaultPlan:
    return load_model_text(FaultPlan, Path(path).read_text(), str(path), "a fault file is a mapping with `faults:`")
