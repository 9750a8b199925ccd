"""Fault files: a YAML list of timed faults for `fleetflow sim`, parsed into the fault values of sim/faults.py.

    faults:
      - {at: 5, kill: {percent: 10}}                      # power cut: no DISCONNECT, the broker sends the Will
      - {at: 6, kill: {running: 2}}                       # two devices while they run steps (waits for them)
      - {at: 5, partition: {count: 2, for: 8}}            # stop all traffic, keep sockets open; heal after 8 s
      - {at: 8, spike: {count: 1, metrics: {temp: 95}, for: 10}}
      - {at: 8, heat: {count: 1, temp: 95}}               # the board overheats until the end
      - {at: 8, slow: {count: 2, factor: 3}}              # steps take 3x as long
      - {at: 8, skew: {count: 1, seconds: 300}}           # the device's clock runs 5 minutes ahead
      - {at: 10, flap: {count: 1, times: 3, every: 2}}    # power cut, reboot, repeatedly
      - {at: 12, rogue: {forged: 5, replayed: 5}}         # an attacker forges and replays messages

`at` counts seconds from the moment every device is up. A fault that lands on devices names them by `count`,
`percent`, `nodes`, or `running` (that many devices at work, as the devices report it: the fault waits for them).
Each kind below names the fault class it builds; its fields are that class's, under the same names (YAML's `for` and
`every` are `duration_s` and `every_s`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hub.workflow import load_model_text

from .faults import (
    Busy,
    Fault,
    Flap,
    Heat,
    Kill,
    Partition,
    Pick,
    Rogue,
    Scheduled,
    Skew,
    Slow,
    Spike,
    Target,
)

PICK_FIELDS = {"count", "percent", "nodes", "running"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _Aimed(_Model):
    """A kind that lands on devices: which ones, as `Pick` takes them, or `running` devices at work (`Busy`)."""

    builds: ClassVar[type[Any]]
    count: int | None = Field(None, ge=1)
    percent: float | None = Field(None, gt=0, le=100)
    nodes: list[str] = Field(default_factory=list)
    running: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_pick(self) -> _Aimed:
        if self.running is not None and (self.count is not None or self.percent is not None or self.nodes):
            raise ValueError("give exactly one of count, percent, nodes or running")
        self.target()  # `Pick` refuses anything but exactly one of its three ways
        return self

    def target(self) -> Target:
        if self.running is not None:
            return Busy(self.running)
        return Pick(self.count, self.percent, tuple(self.nodes))

    def fault(self) -> Fault:
        fault: Fault = self.builds(target=self.target(), **self.model_dump(exclude=PICK_FIELDS))
        return fault


class _Kill(_Aimed):
    builds = Kill


class _Partition(_Aimed):
    builds = Partition
    duration_s: float = Field(10.0, alias="for", gt=0)


class _Spike(_Aimed):
    builds = Spike
    metrics: dict[str, float]
    duration_s: float = Field(10.0, alias="for", gt=0)


class _Heat(_Aimed):
    builds = Heat
    temp: float = 95.0


class _Slow(_Aimed):
    builds = Slow
    factor: float = Field(gt=0)


class _Skew(_Aimed):
    builds = Skew
    seconds: float


class _Flap(_Aimed):
    builds = Flap
    times: int = Field(3, ge=1, le=100)
    every_s: float = Field(2.0, alias="every", gt=0)


class _Rogue(_Model):
    forged: int = Field(5, ge=0, le=10_000)
    replayed: int = Field(5, ge=0, le=10_000)

    def fault(self) -> Fault:
        return Rogue(self.forged, self.replayed)


KINDS = ("kill", "partition", "spike", "heat", "slow", "skew", "flap", "rogue")


class _Entry(_Model):
    at: float = Field(ge=0, description="seconds after the devices are up")
    kill: _Kill | None = None
    partition: _Partition | None = None
    spike: _Spike | None = None
    heat: _Heat | None = None
    slow: _Slow | None = None
    skew: _Skew | None = None
    flap: _Flap | None = None
    rogue: _Rogue | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _Entry:
        kinds = [k for k in KINDS if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"each fault has exactly one kind, found {kinds or 'none'}")
        return self

    def scheduled(self) -> Scheduled:
        spec: _Aimed | _Rogue = next(getattr(self, k) for k in KINDS if getattr(self, k))
        return Scheduled(spec.fault(), at=self.at)


class _FaultFile(_Model):
    faults: list[_Entry] = Field(default_factory=list)


def parse_faults(text: str, source: str) -> tuple[Scheduled, ...]:
    """The timeline of a fault file's text; hub.workflow.WorkflowError names every problem with its line."""
    parsed = load_model_text(_FaultFile, text, source, "a fault file is a mapping with `faults:`")
    return tuple(entry.scheduled() for entry in parsed.faults)


def load_faults(path: Path) -> tuple[Scheduled, ...]:
    return parse_faults(Path(path).read_text(), str(path))
