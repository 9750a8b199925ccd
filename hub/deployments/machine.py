"""Every state of a deployment and of its per-node executions, and every transition between them, as data (the
shape of hub/transitions.py, whose `Machine` this reuses).

The core chooses a transition by trigger (`EXECUTION.target(state, trigger)`) when it decides, and journals the
state it chose (`ExecutionChanged.state`, `DeploymentChanged.state`). Applying a journaled change checks that the
pair (state before, state after) is an edge of the table, so a decision that does not fit raises
`IllegalTransition`: a bug of ours, never input.

Executions: queued, in_progress, verifying and rolling_back are the non-terminal states, each with a deadline
(hub/deployments/core.py); the rest are terminal. One exit from a terminal state exists: `succeeded` rolls back
when its deployment aborts under `--rollback on-abort`; and a cron deployment's next round queues a node again.
A `succeeded` execution whose rollback must not run (another deployment has updated the node since, or is updating
it) stays `succeeded`, with the reason journaled as a change to itself.
"""

from __future__ import annotations

from enum import StrEnum

from ..transitions import IllegalTransition, Machine, _from

__all__ = ["DEPLOYMENT", "DEPLOYMENT_OPEN", "EXECUTION", "EXECUTION_LIVE", "EXECUTION_TERMINAL", "DeploymentState",
           "DeploymentTrigger", "ExecutionState", "ExecutionTrigger", "IllegalTransition", "check_move"]


class ExecutionState(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    VERIFYING = "verifying"          # the run succeeded: the node must prove healthy for the verify window
    ROLLING_BACK = "rolling_back"    # the rollback run is under way (it takes time, so it has a deadline too)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"            # the node cannot take this version (no migration, or lacks an executor)
    REMOVED = "removed"              # the node left the target while queued
    CANCELED = "canceled"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


class DeploymentState(StrEnum):
    SCHEDULED = "scheduled"          # waiting for its fire time (--at, --cron; a deployment without one fires at once)
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    CANCELED = "canceled"


class ExecutionTrigger(StrEnum):
    QUEUED = "queued"                # a new round of a cron deployment takes the node again
    STARTED = "started"              # its first run is submitted
    RETRIED = "retried"              # its run failed and a retry is left: a new run
    RESUBMITTED = "resubmitted"      # its run was lost with its node (down): a new run, no retry used
    RUN_SUCCEEDED = "run_succeeded"
    FAILED = "failed"                # its run failed after its retries, or its verify failed, with no rollback
    TIMED_OUT = "timed_out"          # queued past the deployment's timeout, or in progress past its own
    REJECTED = "rejected"
    LEFT_TARGET = "left_target"
    CANCELED = "canceled"
    VERIFIED = "verified"
    ROLLBACK_STARTED = "rollback_started"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    ROLLBACK_SKIPPED = "rollback_skipped"  # aborted under on-abort, but the node is no longer this deployment's


class DeploymentTrigger(StrEnum):
    FIRED = "fired"                  # its fire time came: a round starts
    RESCHEDULED = "rescheduled"      # a cron deployment's next fire time is set
    FIRE_SKIPPED = "fire_skipped"    # a fire time came while a round still runs
    WAVE_STARTED = "wave_started"
    WAVE_PAUSED = "wave_paused"      # a wave succeeded under --pause-between
    PAUSE_REQUESTED = "pause_requested"
    RESUMED = "resumed"
    COMPLETED = "completed"          # every execution of the round is terminal and nothing aborted it
    ROUND_DONE = "round_done"        # ... of a cron deployment: it waits for its next fire
    ABORTED = "aborted"
    CANCEL_REQUESTED = "cancel_requested"


_E, _D = ExecutionState, DeploymentState
EXECUTION_LIVE = frozenset({_E.QUEUED, _E.IN_PROGRESS, _E.VERIFYING, _E.ROLLING_BACK})
EXECUTION_TERMINAL = frozenset(set(_E) - EXECUTION_LIVE)
EXECUTION_ACTIVE = frozenset({_E.IN_PROGRESS, _E.VERIFYING, _E.ROLLING_BACK})  # what --max-concurrent counts
DEPLOYMENT_OPEN = frozenset({_D.SCHEDULED, _D.RUNNING, _D.PAUSED})
_ROLLING = (_D.RUNNING, _D.PAUSED)

EXECUTION: Machine[ExecutionState, ExecutionTrigger] = Machine("execution", "state", {
    **_from(EXECUTION_TERMINAL, ExecutionTrigger.QUEUED, _E.QUEUED),
    (_E.QUEUED, ExecutionTrigger.STARTED): _E.IN_PROGRESS,
    (_E.IN_PROGRESS, ExecutionTrigger.RETRIED): _E.IN_PROGRESS,
    (_E.IN_PROGRESS, ExecutionTrigger.RESUBMITTED): _E.IN_PROGRESS,
    (_E.IN_PROGRESS, ExecutionTrigger.RUN_SUCCEEDED): _E.VERIFYING,
    **_from((_E.IN_PROGRESS, _E.VERIFYING), ExecutionTrigger.FAILED, _E.FAILED),
    **_from((_E.QUEUED, _E.IN_PROGRESS), ExecutionTrigger.TIMED_OUT, _E.TIMED_OUT),
    **_from((_E.QUEUED, _E.IN_PROGRESS), ExecutionTrigger.REJECTED, _E.REJECTED),
    (_E.QUEUED, ExecutionTrigger.LEFT_TARGET): _E.REMOVED,
    **_from(EXECUTION_LIVE, ExecutionTrigger.CANCELED, _E.CANCELED),
    (_E.VERIFYING, ExecutionTrigger.VERIFIED): _E.SUCCEEDED,
    **_from((_E.IN_PROGRESS, _E.VERIFYING, _E.SUCCEEDED), ExecutionTrigger.ROLLBACK_STARTED, _E.ROLLING_BACK),
    (_E.ROLLING_BACK, ExecutionTrigger.ROLLED_BACK): _E.ROLLED_BACK,
    (_E.ROLLING_BACK, ExecutionTrigger.ROLLBACK_FAILED): _E.ROLLBACK_FAILED,
    (_E.SUCCEEDED, ExecutionTrigger.ROLLBACK_SKIPPED): _E.SUCCEEDED,
})

DEPLOYMENT: Machine[DeploymentState, DeploymentTrigger] = Machine("deployment", "state", {
    (_D.SCHEDULED, DeploymentTrigger.FIRED): _D.RUNNING,
    (_D.SCHEDULED, DeploymentTrigger.RESCHEDULED): _D.SCHEDULED,
    (_D.RUNNING, DeploymentTrigger.FIRE_SKIPPED): _D.RUNNING,
    (_D.PAUSED, DeploymentTrigger.FIRE_SKIPPED): _D.PAUSED,
    **_from(_ROLLING, DeploymentTrigger.WAVE_STARTED, _D.RUNNING),
    **_from(_ROLLING, DeploymentTrigger.WAVE_PAUSED, _D.PAUSED),
    (_D.RUNNING, DeploymentTrigger.PAUSE_REQUESTED): _D.PAUSED,
    (_D.PAUSED, DeploymentTrigger.RESUMED): _D.RUNNING,
    **_from(_ROLLING, DeploymentTrigger.COMPLETED, _D.SUCCEEDED),
    **_from(_ROLLING, DeploymentTrigger.ROUND_DONE, _D.SCHEDULED),
    **_from(_ROLLING, DeploymentTrigger.ABORTED, _D.ABORTED),
    **_from(DEPLOYMENT_OPEN, DeploymentTrigger.CANCEL_REQUESTED, _D.CANCELED),
})

_EDGES = {machine.name: frozenset((state, target) for (state, _), target in machine.table.items())
          for machine in (EXECUTION, DEPLOYMENT)}


def check_move(machine: Machine[ExecutionState, ExecutionTrigger] | Machine[DeploymentState, DeploymentTrigger],
               what: str, before: StrEnum | None, after: StrEnum) -> None:
    """A journaled change from `before` to `after` must be an edge of the machine's table (an execution is born
    queued). Anything else is a decision the tables never allowed: `IllegalTransition`."""
    if before is None and after == ExecutionState.QUEUED and machine is EXECUTION:
        return
    if (before, after) not in _EDGES[machine.name]:
        raise IllegalTransition(f"{machine.name} {what}: {before} -> {after} is not allowed")
