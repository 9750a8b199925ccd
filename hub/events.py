"""Journaled events. Facts record what arrived (messages, operator requests); decisions record what the core chose
(placements, lost attempts, liveness changes, timeouts). Replaying the journal applies both and never decides again,
so the same journal always gives the same state.

Every event carries `at`, the hub clock in ms when it happened: the reducer reads time only from events.
`to_record`/`from_record` are the journal's codec for them; `JournalError` is what the journal raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocols import AttemptRef, FleetflowError


class JournalError(FleetflowError, RuntimeError):
    """A journal this hub cannot use (hub/journal.py), or a record in it it cannot read."""


class SnapshotError(JournalError):
    """A snapshot of another version, or malformed (hub/snapshot.py): the journal replays its events instead."""


@dataclass(frozen=True, slots=True)
class Event:
    KIND: ClassVar[str] = "event"
    at: int


# -- facts ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunSubmitted(Event):
    KIND: ClassVar[str] = "run_submitted"
    run: str = ""
    spec: dict[str, Any] = field(default_factory=dict)   # the workflow as validated data (by alias)
    inputs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None                                # idempotency key
    deadline: int = 0                                     # ms


@dataclass(frozen=True, slots=True)
class RunCancelRequested(Event):
    KIND: ClassVar[str] = "run_cancel_requested"
    run: str = ""
    reason: str = ""
    force_fail: bool = False                              # operator force-fail: failed instead of cancelled


@dataclass(frozen=True, slots=True)
class NodeBorn(Event):
    KIND: ClassVar[str] = "node_born"
    node: str = ""
    boot: int = 0
    profile: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    caps: tuple[str, ...] = ()
    slots: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    running: tuple[AttemptRef, ...] = ()                  # the attempts the node still holds
    hb: float = 5.0
    tel: float = 10.0


@dataclass(frozen=True, slots=True)
class NodeSeen(Event):
    """A suspected node was heard from again (only journaled when it changes liveness)."""

    KIND: ClassVar[str] = "node_seen"
    node: str = ""


@dataclass(frozen=True, slots=True)
class NodeDied(Event):
    KIND: ClassVar[str] = "node_died"
    node: str = ""
    boot: int = 0
    reason: str = "lost"


@dataclass(frozen=True, slots=True)
class NodeConflict(Event):
    """Evidence that two devices use this node's identity (hub/clones.py): a refused message of `boot` that only a
    second device can have signed while the node was at `current`."""

    KIND: ClassVar[str] = "node_conflict"
    node: str = ""
    boot: int = 0
    current: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeDrainSet(Event):
    KIND: ClassVar[str] = "node_drain_set"
    node: str = ""
    on: bool = True


@dataclass(frozen=True, slots=True)
class NodeRemoved(Event):
    """Revoked, rejected or deleted by an operator: its attempts are lost and it gets no more work. `forget` (a
    delete): its record goes too, so a node later enrolled under the id starts from nothing."""

    KIND: ClassVar[str] = "node_removed"
    node: str = ""
    reason: str = ""
    forget: bool = False


@dataclass(frozen=True, slots=True)
class StepReported(Event):
    KIND: ClassVar[str] = "step_reported"
    node: str = ""
    attempt: str = ""
    fence: int = 0
    event: str = ""                                       # accepted, started, progress, refused, cancelled
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ResultReported(Event):
    KIND: ClassVar[str] = "result_reported"
    node: str = ""
    attempt: str = ""
    fence: int = 0
    ok: bool = False
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayMarks(Event):
    """The hub's per-sender replay windows, journaled periodically so a restart keeps refusing old messages."""

    KIND: ClassVar[str] = "replay_marks"
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeploymentCreated(Event):
    """An operator asked for a deployment (hub/deployments/): `spec` is its checked request as plain data."""

    KIND: ClassVar[str] = "deployment_created"
    deployment: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    actor: str = ""


@dataclass(frozen=True, slots=True)
class DeploymentControlled(Event):
    KIND: ClassVar[str] = "deployment_controlled"
    deployment: str = ""
    action: str = ""                                      # pause, resume, cancel
    force: bool = False                                   # cancel: end every execution at once, runs cancelled
    reason: str = ""


# -- decisions -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AttemptAssigned(Event):
    KIND: ClassVar[str] = "attempt_assigned"
    run: str = ""
    step: str = ""
    attempt: str = ""
    fence: int = 0
    node: str = ""


@dataclass(frozen=True, slots=True)
class AttemptLost(Event):
    KIND: ClassVar[str] = "attempt_lost"
    attempt: str = ""
    reason: str = ""
    counts: bool = True                                   # does it use up one of the step's attempts?
    unanswered: bool = False                              # an assignment its (online) node never answered: counted
                                                          # apart, with backoff (older journals: False, re-queued free)


@dataclass(frozen=True, slots=True)
class StepUnrunnable(Event):
    """The core found that a queued step can never run (its assignment cannot be sent, no node in the fleet offers
    what it needs, or its assignments go unanswered): it fails for good, whatever its retry policy."""

    KIND: ClassVar[str] = "step_unrunnable"
    run: str = ""
    step: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeSuspected(Event):
    KIND: ClassVar[str] = "node_suspected"
    node: str = ""


@dataclass(frozen=True, slots=True)
class NodeFailed(Event):
    KIND: ClassVar[str] = "node_failed"
    node: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RunTimedOut(Event):
    KIND: ClassVar[str] = "run_timed_out"
    run: str = ""


@dataclass(frozen=True, slots=True)
class HealthChanged(Event):
    """A node's health classification changed, with the figures that made it change."""

    KIND: ClassVar[str] = "health_changed"
    node: str = ""
    health: str = "healthy"
    metric: str = ""
    value: float = 0.0
    threshold: float = 0.0
    duration: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ActionTaken(Event):
    """An adaptation action on a node: throttle, unthrottle, migrate, circuit_break, drain, alert, telemetry_rate."""

    KIND: ClassVar[str] = "action_taken"
    node: str = ""
    action: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BreakerChanged(Event):
    KIND: ClassVar[str] = "breaker_changed"
    node: str = ""
    state: str = "closed"                                 # closed, open, half_open
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HubLoadChanged(Event):
    """The hub protects itself: while overloaded it slows the fleet's telemetry and sheds non-critical work."""

    KIND: ClassVar[str] = "hub_load_changed"
    overloaded: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeploymentChanged(Event):
    """A deployment's state as the core chose it: a round fired (`fired`, the fire time), a wave started, it paused
    between waves, succeeded, aborted. `next_fire` is its next fire time after the change (None: none), so
    schedules survive restarts as journaled times."""

    KIND: ClassVar[str] = "deployment_changed"
    deployment: str = ""
    state: str = ""
    reason: str = ""
    wave: int | None = None                               # the current wave after the change (1-based)
    fired: int | None = None
    next_fire: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionChanged(Event):
    """A node's execution of a deployment moved to `state`. `run`: the run it started (its first, a retry, or its
    rollback); `version`: the component's version on the node after a terminal state; `wave` when it is queued;
    `failure` (failed, timed_out, rejected) what ended it or started its rollback, for the abort criteria; `retry`:
    a run started again uses one of its retries (a run lost with its node down is started again without)."""

    KIND: ClassVar[str] = "execution_changed"
    deployment: str = ""
    node: str = ""
    state: str = ""
    reason: str = ""
    run: str | None = None
    version: str | None = None
    wave: int | None = None
    failure: str | None = None
    retry: bool = False


EVENT_TYPES: dict[str, type[Event]] = {
    cls.KIND: cls for cls in (RunSubmitted, RunCancelRequested, NodeBorn, NodeSeen, NodeDied, NodeDrainSet,
                              NodeRemoved, StepReported, ResultReported, ReplayMarks, AttemptAssigned, AttemptLost,
                              StepUnrunnable, NodeSuspected, NodeFailed, RunTimedOut, HealthChanged, ActionTaken,
                              BreakerChanged, HubLoadChanged, NodeConflict, DeploymentCreated, DeploymentControlled,
                              DeploymentChanged, ExecutionChanged)
}


def to_record(event: Event) -> tuple[str, dict[str, Any]]:
    """The event as plain data for the journal's CBOR; `from_record` reads it back."""
    data = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    if isinstance(event, NodeBorn):
        data["running"] = [dataclasses.asdict(ref) for ref in event.running]
    return event.KIND, data


def from_record(kind: str, data: dict[str, Any]) -> Event:
    cls = EVENT_TYPES[kind]
    if cls is NodeBorn:
        data = {**data, "caps": tuple(data.get("caps", ())),
                "running": tuple(_attempt_ref(r) for r in data.get("running", ()))}
    return cls(**data)


def _attempt_ref(record: Any) -> AttemptRef:
    """A map {run, step, attempt, fence}, or a [run, step, attempt, fence] list as journals before it hold."""
    return AttemptRef(**record) if isinstance(record, dict) else AttemptRef(*record)
