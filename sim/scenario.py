"""What a simulated session does, as one value the driver (sim/driver.py) carries out: the workflows to submit and how
each must end, the workload that keeps the fleet busy, the fault timeline, how long to keep going, the bounded waits,
and the checks beyond the checker's own. `fleetflow sim` (sim/run.py) and `fleetflow demo` (sim/demo.py) each build
one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hub.events import Event
from hub.state import Core

from .faults import FaultContext, RunningStep, Scheduled

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SUCCEEDS = frozenset({"succeeded"})


@dataclass(frozen=True)
class Submission:
    """A workflow of sim/scenarios/ to submit; targets, gates and expectations name its run by `label`. `expect`:
    the terminal states its run may end in (the checker fails any other)."""

    label: str
    workflow: str  # file name in sim/scenarios/
    expect: frozenset[str] = SUCCEEDS

    def text(self) -> str:
        return (SCENARIOS / self.workflow).read_text()


@dataclass(frozen=True)
class StepMigratedOff:
    """The step a fault aimed at through `target` (the device running it) ended on another device, moved there by a
    migration: what a thermal runaway must end in. Judged from the journal, like the checker's own invariants."""

    name: str
    target: RunningStep

    def evaluate(self, ctx: FaultContext, journal: Sequence[Event]) -> tuple[str, bool, str]:
        hot, run_id = ctx.resolved.get(self.target), ctx.runs.get(self.target.run)
        core = Core().fold(list(journal))  # a migration is the core's decision on a journaled action, not an event
        run = core.runs.get(run_id or "")
        step = run.steps.get(self.target.step) if run is not None else None
        attempts = [core.attempts[a] for a in step.attempts if a in core.attempts] if step is not None else []
        if not hot or not attempts:
            return self.name, False, f"{self.target} was never found, so no fault landed on it"
        moved = [a for a in attempts if (a.reason or "").startswith("migrated")]
        last = attempts[-1]
        where = f"run {run_id} step {self.target.step}"
        return (self.name, bool(moved) and last.state == "succeeded" and last.node != hot[0],
                f"{hot[0]} overheated; {where} moved to {last.node} ({last.id} fence {last.fence} {last.state})"
                if moved else f"{hot[0]} overheated but {where} was not migrated")


@dataclass(frozen=True)
class Workload:
    """Runs submitted all along the session, `rate` per device per minute, cycling through `submissions` (their
    labels get a running number): a load proportional to the fleet, so faults find devices at work."""

    rate: float
    submissions: tuple[Submission, ...]


@dataclass(frozen=True)
class Scenario:
    name: str                                   # the live table's title: "fleetflow <name>"
    submissions: tuple[Submission, ...]
    timeline: tuple[Scheduled, ...] = ()        # applied in order of `at` (ties in the order given)
    duration_s: float = 0.0                     # keep going this long after submitting; later faults come at its end
    boot_deadline_s: float = 120.0              # every device online within this, or the scenario fails
    end_deadline_s: float = 60.0                # then the check runs whether or not every run has ended
    settle_s: float = 2.0                       # for the last acknowledgements to empty the outboxes
    refresh_s: float = 1.0                      # the live table's refresh period
    expectations: tuple[StepMigratedOff, ...] = ()
    workload: Workload | None = None
