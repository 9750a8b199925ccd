"""Every state the hub's core holds, and every transition between them, as data (as h11's `_state.py` does).

Each machine is a table `(state, trigger) -> next state`, a trigger being what happened (a journaled event, or what
the core derived from one: a step's needs settled, its run ended). `Machine.move` is the only way the core changes a
state, and a pair the table does not hold raises `IllegalTransition`: a bug of ours, never input. Handlers screen
input first (a stale report, a node event out of order) and ignore what does not fit, so nothing a node sends
reaches a move the table refuses.

The states are `StrEnum`s: they compare, hash, format and encode (JSON, CBOR) as their plain strings, so the API,
the CLI, the journal and the mirrors read the same words as before.

A journaled decision that names the state it chose (`BreakerChanged.state`, `HealthChanged.health`) applies as
recorded: its rules ran when it was decided (BREAKER's below, in `Fleet.breaker_decisions`; health's hysteresis in
hub/health.py), and a replay must not judge it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from protocols import FleetflowError


class IllegalTransition(FleetflowError, RuntimeError):
    """The core tried a transition its tables do not allow: a bug, never caused by input."""


class RunState(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"  # a step failed for good: completed steps are being undone, newest first
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class StepState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"            # a for_each parent while its instances run
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class AttemptState(StrEnum):
    ASSIGNED = "assigned"
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    REFUSED = "refused"


class Liveness(StrEnum):
    ONLINE = "online"
    SUSPECTED = "suspected"
    FAILED = "failed"
    OFFLINE = "offline"


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


RUN_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT})
STEP_TERMINAL = frozenset({StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED, StepState.CANCELLED})
ATTEMPT_LIVE = frozenset({AttemptState.ASSIGNED, AttemptState.ACCEPTED, AttemptState.RUNNING})
REACHABLE = frozenset({Liveness.ONLINE, Liveness.SUSPECTED})  # a node that may still hear the hub


# -- what moves each machine: the triggers -----------------------------------------------------------------------------

class RunTrigger(StrEnum):
    STEPS_SETTLED = "steps_settled"                # every step finished, none failed for good
    STEP_FAILED = "step_failed"                    # a step failed for good and nothing is to be undone
    STEP_FAILED_COMPENSATE = "step_failed_compensate"  # ... and completed steps have compensations
    COMPENSATED = "compensated"                    # every compensation settled (the run still failed)
    CANCEL_REQUESTED = "cancel_requested"
    FORCE_FAIL_REQUESTED = "force_fail_requested"
    DEADLINE_PASSED = "deadline_passed"


class StepTrigger(StrEnum):
    READY = "ready"                                # its needs are settled: queue it for placement
    REQUEUED = "requeued"                          # its attempt ended without a result: place it again
    SKIPPED = "skipped"                            # `when` is false or its needs did not succeed
    FANNED_OUT = "fanned_out"                      # for_each: one instance per matching node
    NO_INSTANCES = "no_instances"                  # for_each matched no node
    CONDITION_ERROR = "condition_error"            # `when` could not be evaluated
    ASSIGNED = "assigned"
    SUCCEEDED = "succeeded"                        # its attempt's result was a success
    INSTANCES_SUCCEEDED = "instances_succeeded"
    FAILED = "failed"                              # for good: out of attempts, never runnable, an instance failed
    STOPPED = "stopped"                            # its run ended


class AttemptTrigger(StrEnum):
    ACCEPTED = "accepted"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"                        # by its run ending, or given back by its node
    LOST = "lost"                                  # its node failed, it was migrated, timed out or never answered
    REFUSED = "refused"


class NodeTrigger(StrEnum):
    BORN = "born"
    HEARD = "heard"                                # a suspected node was heard from again
    SILENT = "silent"                              # missed heartbeats
    FAILED = "failed"                              # more missed heartbeats, or a death certificate (lost)
    SHUT_DOWN = "shut_down"                        # a death certificate (shutdown)
    REMOVED = "removed"                            # revoked, rejected or deleted by an operator


class BreakerTrigger(StrEnum):
    TRIPPED = "tripped"                            # enough step failures within the window
    COOLED = "cooled"                              # open for the cooldown: let one probe through
    PROBE_FAILED = "probe_failed"
    PROBES_PASSED = "probes_passed"
    FORCED_OPEN = "forced_open"                    # the circuit_break adaptation action


S = TypeVar("S", bound=StrEnum)
E = TypeVar("E", bound=StrEnum)


def _from(states: Iterable[S], event: E, target: S) -> dict[tuple[S, E], S]:
    return {(state, event): target for state in states}


@dataclass(frozen=True)
class Machine(Generic[S, E]):
    """One state machine: which attribute of an object holds its state, and the table that moves it."""

    name: str
    attr: str
    table: Mapping[tuple[S, E], S]

    def allows(self, state: S, event: E) -> bool:
        return (state, event) in self.table

    def target(self, state: S, event: E) -> S | None:
        """Where `event` would take an object in `state`, or None if it does not apply: for deciding."""
        return self.table.get((state, event))

    def move(self, obj: Any, event: E) -> S:
        state = getattr(obj, self.attr)
        new = self.table.get((state, event))
        if new is None:
            raise IllegalTransition(f"{self.name} {getattr(obj, 'id', '?')}: {event} is not allowed in state {state}")
        setattr(obj, self.attr, new)
        return new


_R, _S, _A, _N, _B = RunState, StepState, AttemptState, Liveness, Breaker
_RUN_OPEN = (_R.RUNNING, _R.COMPENSATING)
_STEP_OPEN = (_S.PENDING, _S.QUEUED, _S.PLACED, _S.RUNNING)

RUN: Machine[RunState, RunTrigger] = Machine("run", "state", {
    (_R.RUNNING, RunTrigger.STEPS_SETTLED): _R.SUCCEEDED,
    (_R.RUNNING, RunTrigger.STEP_FAILED): _R.FAILED,
    (_R.RUNNING, RunTrigger.STEP_FAILED_COMPENSATE): _R.COMPENSATING,
    (_R.COMPENSATING, RunTrigger.COMPENSATED): _R.FAILED,
    **_from(_RUN_OPEN, RunTrigger.CANCEL_REQUESTED, _R.CANCELLED),
    **_from(_RUN_OPEN, RunTrigger.FORCE_FAIL_REQUESTED, _R.FAILED),
    **_from(_RUN_OPEN, RunTrigger.DEADLINE_PASSED, _R.TIMED_OUT),
})

STEP: Machine[StepState, StepTrigger] = Machine("step", "state", {
    (_S.PENDING, StepTrigger.READY): _S.QUEUED,
    (_S.PLACED, StepTrigger.REQUEUED): _S.QUEUED,
    (_S.PENDING, StepTrigger.SKIPPED): _S.SKIPPED,
    (_S.PENDING, StepTrigger.FANNED_OUT): _S.RUNNING,
    (_S.PENDING, StepTrigger.NO_INSTANCES): _S.SUCCEEDED,
    (_S.PENDING, StepTrigger.CONDITION_ERROR): _S.FAILED,
    (_S.QUEUED, StepTrigger.ASSIGNED): _S.PLACED,
    (_S.PLACED, StepTrigger.SUCCEEDED): _S.SUCCEEDED,
    (_S.RUNNING, StepTrigger.INSTANCES_SUCCEEDED): _S.SUCCEEDED,
    **_from((_S.QUEUED, _S.PLACED, _S.RUNNING), StepTrigger.FAILED, _S.FAILED),
    **_from(_STEP_OPEN, StepTrigger.STOPPED, _S.CANCELLED),
})

ATTEMPT: Machine[AttemptState, AttemptTrigger] = Machine("attempt", "state", {
    (_A.ASSIGNED, AttemptTrigger.ACCEPTED): _A.ACCEPTED,
    **_from((_A.ASSIGNED, _A.ACCEPTED), AttemptTrigger.STARTED, _A.RUNNING),
    **_from(ATTEMPT_LIVE, AttemptTrigger.SUCCEEDED, _A.SUCCEEDED),
    **_from(ATTEMPT_LIVE, AttemptTrigger.FAILED, _A.FAILED),
    **_from(ATTEMPT_LIVE, AttemptTrigger.CANCELLED, _A.CANCELLED),
    **_from(ATTEMPT_LIVE, AttemptTrigger.LOST, _A.LOST),
    (_A.ASSIGNED, AttemptTrigger.REFUSED): _A.REFUSED,
})

LIVENESS: Machine[Liveness, NodeTrigger] = Machine("node", "state", {
    **_from((_N.SUSPECTED, _N.FAILED, _N.OFFLINE), NodeTrigger.BORN, _N.ONLINE),
    (_N.SUSPECTED, NodeTrigger.HEARD): _N.ONLINE,
    (_N.ONLINE, NodeTrigger.SILENT): _N.SUSPECTED,
    **_from(REACHABLE, NodeTrigger.FAILED, _N.FAILED),
    **_from(REACHABLE, NodeTrigger.SHUT_DOWN, _N.OFFLINE),
    **_from((_N.ONLINE, _N.SUSPECTED, _N.OFFLINE), NodeTrigger.REMOVED, _N.FAILED),
})

BREAKER: Machine[Breaker, BreakerTrigger] = Machine("breaker", "breaker", {
    (_B.CLOSED, BreakerTrigger.TRIPPED): _B.OPEN,
    (_B.OPEN, BreakerTrigger.COOLED): _B.HALF_OPEN,
    (_B.HALF_OPEN, BreakerTrigger.PROBE_FAILED): _B.OPEN,
    (_B.HALF_OPEN, BreakerTrigger.PROBES_PASSED): _B.CLOSED,
    **_from(_B, BreakerTrigger.FORCED_OPEN, _B.OPEN),
})
