"""The runs half of the hub's pure core: workflow runs, their steps and the attempts that execute them, with the
placement queue and fences, retries with hashed jitter, for_each fan-out and saga compensation.

No I/O and no clock reads: time comes from events. Every state change goes through the machines of
hub/transitions.py. Nodes are read (for_each, whether a cancel can reach one) and hold the ids of their attempts;
everything else about them is hub/fleet.py's.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from protocols import AttemptRef

from .conditions import ConditionError
from .events import (AttemptAssigned, AttemptLost, ResultReported, RunCancelRequested, RunSubmitted, RunTimedOut,
                     StepReported, StepUnrunnable)
from .fleet import Command, Node, SendAssign, SendCancel
from .runnable import AVOID_UNANSWERING_MS
from .transitions import (ATTEMPT, ATTEMPT_LIVE, REACHABLE, RUN, RUN_TERMINAL, STEP, STEP_TERMINAL, AttemptState,
                          AttemptTrigger, Liveness, RunState, RunTrigger, StepState, StepTrigger)
from .workflow import Selector, Step, Workflow, instance_id, workflow_from_data

REFUSAL_BACKOFF_MS = 1_000
AVOID_AFTER_REFUSAL_MS = 30_000
MAX_REFUSALS = 50
RETAIN_FINISHED = 2_000      # finished runs kept whole; older ones shrink to a summary (the journal has the rest)
STALE = "stale attempt: the hub moved this step"

# What a node may report about an attempt, as the trigger it is (progress changes nothing).
_REPORTED = {"accepted": AttemptTrigger.ACCEPTED, "started": AttemptTrigger.STARTED,
             "refused": AttemptTrigger.REFUSED, "cancelled": AttemptTrigger.CANCELLED}


@dataclass
class Attempt:
    id: str
    run: str
    step: str
    fence: int
    node: str
    state: AttemptState = AttemptState.ASSIGNED
    assigned_at: int = 0
    started_at: int | None = None
    ended_at: int | None = None
    reason: str | None = None

    def ref(self) -> AttemptRef:
        return AttemptRef(self.run, self.step, self.id, self.fence)


@dataclass
class StepRun:
    id: str
    spec: Step
    kind: str = "step"                 # step, instance (of a for_each), compensation
    state: StepState = StepState.PENDING
    attempts: list[str] = field(default_factory=list)
    failures: int = 0
    refusals: int = 0
    unanswered: int = 0                # assignments its node never answered (hub/runnable.py bounds them)
    ready_at: int = 0
    output: dict[str, Any] | None = None
    error: str | None = None
    node: str | None = None            # where it last ran
    parent: str | None = None
    instances: list[str] = field(default_factory=list)
    avoid: dict[str, int] = field(default_factory=dict)
    done_seq: int = 0                  # completion order, for saga compensation newest first


@dataclass
class Run:
    id: str
    workflow: Workflow
    inputs: dict[str, Any]
    submitted_at: int
    deadline: int
    key: str | None
    seq: int                           # submission order, for FIFO among equals
    state: RunState = RunState.RUNNING
    steps: dict[str, StepRun] = field(default_factory=dict)
    error: str | None = None
    finished_at: int | None = None
    compensations: list[str] = field(default_factory=list)
    migrations: int = 0
    spec: dict[str, Any] = field(default_factory=dict)  # the workflow as journaled: snapshots store it, not objects


@dataclass
class Counters:
    stale_reports: int = 0
    refusals: int = 0
    lost_attempts: int = 0


# Recently compiled workflows by spec hash: runs of one workflow share one validated model. Bounded, so a hub fed many
# distinct workflows does not keep every one of them (each run holds its own workflow anyway).
_WORKFLOWS: collections.OrderedDict[str, Workflow] = collections.OrderedDict()
WORKFLOW_CACHE = 256


def compile_workflow(spec: dict[str, Any]) -> Workflow:
    """The workflow of a journaled spec, validated once per distinct spec among the recent ones."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    workflow = _WORKFLOWS.get(key)
    if workflow is None:
        workflow = _WORKFLOWS[key] = workflow_from_data(spec)
        if len(_WORKFLOWS) > WORKFLOW_CACHE:
            _WORKFLOWS.popitem(last=False)
    else:
        _WORKFLOWS.move_to_end(key)
    return workflow


def instance_spec(base: Step, node_id: str) -> Step:
    """The step of one for_each instance: the base step, pinned to one node."""
    placement = base.placement.model_copy(update={"selector": Selector(nodes=[node_id])})
    return base.model_copy(update={"id": instance_id(base.id, node_id), "placement": placement, "for_each": None,
                                   "migratable": False})


def compensation_spec(original: Step, previous: str | None) -> Step:
    """The step that undoes `original`, after the compensation `previous` (saga order: newest first)."""
    comp = original.compensate
    if comp is None:
        raise ValueError(f"step {original.id} has no compensation")
    return Step.model_construct(
        id=f"undo-{original.id}", uses=comp.uses, with_=comp.with_, needs=[previous] if previous else [],
        join="all", when=None, placement=original.placement, resources=original.resources,
        timeout=comp.timeout, retry=original.retry, migratable=True, compensate=None, for_each=None)


def unit(*parts: Any) -> float:
    """A deterministic draw in [0, 1) for retry jitter: the same journal replays to the same delays."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Runs:
    """Runs, steps and attempts; `on_<event>` applies the journaled event of that name."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes                             # the fleet's: read, and each node's attempt ids kept
        self.runs: dict[str, Run] = {}
        self.attempts: dict[str, Attempt] = {}
        self.live: set[str] = set()                    # attempts assigned, accepted or running
        self.active: set[str] = set()                  # runs not terminal
        self.keys: dict[str, str] = {}                 # idempotency key -> run id
        self.finished: dict[str, None] = {}            # finished runs still kept whole, oldest first
        self.archived: dict[str, tuple[Any, ...]] = {}  # run id -> (workflow, version, state, submitted, finished, error)
        self.queue: dict[tuple[str, str], None] = {}   # (run, step) waiting for placement, in arrival order
        self.fence = 0
        self.done_seq = 0
        self.counters = Counters()

    # -- runs ----------------------------------------------------------------------------------------------------

    def on_run_submitted(self, ev: RunSubmitted, seq: int) -> list[Command]:
        if ev.run in self.runs or ev.run in self.archived or (ev.key and ev.key in self.keys):
            return []
        workflow = compile_workflow(ev.spec)
        run = Run(ev.run, workflow, dict(ev.inputs), ev.at, ev.deadline, ev.key, seq, spec=ev.spec)
        for spec in workflow.steps:
            run.steps[spec.id] = StepRun(spec.id, spec)
        self.runs[run.id] = run
        self.active.add(run.id)
        if ev.key:
            self.keys[ev.key] = run.id
        return self._advance(run, ev.at)

    def _advance(self, run: Run, at: int) -> list[Command]:
        """Start every step whose needs are settled; finish the run when every step is."""
        commands: list[Command] = []
        if run.state != RunState.RUNNING:
            return self._finish_compensation(run, at) if run.state == RunState.COMPENSATING else commands
        for spec in run.workflow.steps:
            step = run.steps[spec.id]
            if step.state != StepState.PENDING:
                continue
            needs = [run.steps[n] for n in spec.needs]
            if any(n.state not in STEP_TERMINAL for n in needs):
                continue
            succeeded = [n for n in needs if n.state == StepState.SUCCEEDED]
            go = len(succeeded) == len(needs) if spec.join == "all" else (bool(succeeded) or not needs)
            if go and spec.when:
                try:
                    go = spec.condition().evaluate(self._context(run))  # type: ignore[union-attr]
                except ConditionError as exc:
                    STEP.move(step, StepTrigger.CONDITION_ERROR)
                    step.error = f"condition: {exc}"
                    return commands + self._fail_run(run, f"step {spec.id}: condition: {exc}", at)
            if not go:
                STEP.move(step, StepTrigger.SKIPPED)
                continue
            if spec.for_each is not None:
                self._expand(run, step, spec.for_each, at)
            else:
                self._enqueue(run, step, at, StepTrigger.READY)
        if all(s.state in STEP_TERMINAL for s in run.steps.values()):
            self._end_run(run, RunTrigger.STEPS_SETTLED, at)
        return commands

    def _context(self, run: Run) -> dict[str, Any]:
        return {"inputs": run.inputs,
                "steps": {sid: {"output": s.output or {}, "state": str(s.state)} for sid, s in run.steps.items()}}

    def _expand(self, run: Run, parent: StepRun, selector: Selector, at: int) -> None:
        nodes = sorted(n.id for n in self.nodes.values() if n.state == Liveness.ONLINE and not n.removed
                       and selector.matches(n.id, n.labels, n.profile, n.caps))
        if not nodes:
            STEP.move(parent, StepTrigger.NO_INSTANCES)
            parent.output = {"instances": 0}
            self._mark_done(parent)
            return
        STEP.move(parent, StepTrigger.FANNED_OUT)
        for node_id in nodes:
            spec = instance_spec(parent.spec, node_id)
            child = StepRun(spec.id, spec, kind="instance", parent=parent.id)
            run.steps[child.id] = child
            parent.instances.append(child.id)
            self._enqueue(run, child, at, StepTrigger.READY)

    def _enqueue(self, run: Run, step: StepRun, ready_at: int, trigger: StepTrigger) -> None:
        STEP.move(step, trigger)
        step.ready_at = ready_at
        self.queue[(run.id, step.id)] = None

    def _mark_done(self, step: StepRun) -> None:
        self.done_seq += 1
        step.done_seq = self.done_seq

    def _end_run(self, run: Run, trigger: RunTrigger, at: int, error: str | None = None) -> None:
        RUN.move(run, trigger)
        run.finished_at = at
        run.error = run.error or error
        if run.state in RUN_TERMINAL:
            self.active.discard(run.id)
            self.finished[run.id] = None
            while len(self.finished) > RETAIN_FINISHED:
                self._archive(next(iter(self.finished)))

    def _archive(self, run_id: str) -> None:
        """Shrink an old finished run to a summary, so memory and snapshots stay proportional to recent work."""
        del self.finished[run_id]
        run = self.runs.pop(run_id)
        for step in run.steps.values():
            for attempt_id in step.attempts:
                self.attempts.pop(attempt_id, None)
        self.archived[run_id] = (run.workflow.name, run.workflow.version, run.state, run.submitted_at,
                                 run.finished_at, run.error)

    def _stop_live(self, run: Run, reason: str, at: int) -> list[Command]:
        """Cancel every live attempt of a run and every step not finished."""
        commands: list[Command] = []
        for step in run.steps.values():
            if step.state in STEP_TERMINAL:
                continue
            for attempt_id in step.attempts:
                attempt = self.attempts[attempt_id]
                if attempt.state in ATTEMPT_LIVE:
                    self._end_attempt(attempt, AttemptTrigger.CANCELLED, at, reason)
                    commands.append(SendCancel(attempt.node, (attempt.ref(),), reason))
            self.queue.pop((run.id, step.id), None)
            STEP.move(step, StepTrigger.STOPPED)
        return commands

    def _fail_run(self, run: Run, error: str, at: int) -> list[Command]:
        """A step failed for good: stop the rest, then compensate completed steps newest first (saga)."""
        run.error = error
        commands = self._stop_live(run, f"run failed: {error}"[:200], at)
        done = sorted((s for s in run.steps.values()
                       if s.state == StepState.SUCCEEDED and s.spec.compensate is not None),
                      key=lambda s: s.done_seq, reverse=True)
        if not done:
            self._end_run(run, RunTrigger.STEP_FAILED, at)
            return commands
        RUN.move(run, RunTrigger.STEP_FAILED_COMPENSATE)
        previous: str | None = None
        for original in done:
            spec = compensation_spec(original.spec, previous)
            run.steps[spec.id] = StepRun(spec.id, spec, kind="compensation")
            run.compensations.append(spec.id)
            previous = spec.id
        self._enqueue(run, run.steps[run.compensations[0]], at, StepTrigger.READY)
        return commands

    def _finish_compensation(self, run: Run, at: int) -> list[Command]:
        for comp_id in run.compensations:
            step = run.steps[comp_id]
            if step.state == StepState.PENDING:
                # the previous one settled (failed compensations do not stop the rest)
                self._enqueue(run, step, at, StepTrigger.READY)
                return []
            if step.state not in STEP_TERMINAL:
                return []
        self._end_run(run, RunTrigger.COMPENSATED, at)
        return []

    def on_run_cancel_requested(self, ev: RunCancelRequested) -> list[Command]:
        run = self.runs.get(ev.run)  # an archived run is finished: nothing to cancel
        if run is None or run.state in RUN_TERMINAL:
            return []
        commands = self._stop_live(run, ev.reason or "cancelled by an operator", ev.at)
        trigger = RunTrigger.FORCE_FAIL_REQUESTED if ev.force_fail else RunTrigger.CANCEL_REQUESTED
        self._end_run(run, trigger, ev.at, ev.reason or None)
        return commands

    def on_run_timed_out(self, ev: RunTimedOut) -> list[Command]:
        run = self.runs.get(ev.run)
        if run is None or run.state in RUN_TERMINAL:
            return []
        commands = self._stop_live(run, "run deadline passed", ev.at)
        self._end_run(run, RunTrigger.DEADLINE_PASSED, ev.at, "deadline passed")
        return commands

    # -- attempts ------------------------------------------------------------------------------------------------

    def on_attempt_assigned(self, ev: AttemptAssigned) -> list[Command]:
        run = self.runs[ev.run]
        step = run.steps[ev.step]
        node = self.nodes[ev.node]
        self.fence = max(self.fence, ev.fence)
        attempt = Attempt(ev.attempt, ev.run, ev.step, ev.fence, ev.node, assigned_at=ev.at)
        self.attempts[attempt.id] = attempt
        self.live.add(attempt.id)
        STEP.move(step, StepTrigger.ASSIGNED)
        step.attempts.append(attempt.id)
        step.node = node.id
        node.attempts.add(attempt.id)
        self.queue.pop((run.id, step.id), None)
        return [SendAssign(node.id, run.id, step.id, attempt.id, attempt.fence, step.spec.uses,
                           dict(step.spec.with_), step.spec.timeout)]

    def current(self, attempt_id: str, node: str, fence: int) -> Attempt | None:
        """The attempt if it is the live, current attempt of its step on that node with that fence."""
        attempt = self.attempts.get(attempt_id)
        if attempt is None or attempt.node != node or attempt.fence != fence or attempt.state not in ATTEMPT_LIVE:
            return None
        step = self.runs[attempt.run].steps[attempt.step]
        return attempt if step.attempts and step.attempts[-1] == attempt.id else None

    def _end_attempt(self, attempt: Attempt, trigger: AttemptTrigger, at: int, reason: str | None = None) -> None:
        ATTEMPT.move(attempt, trigger)
        self.live.discard(attempt.id)
        attempt.ended_at, attempt.reason = at, reason
        node = self.nodes.get(attempt.node)
        if node is not None:
            node.attempts.discard(attempt.id)

    def on_step_reported(self, ev: StepReported) -> list[Command]:
        attempt = self.current(ev.attempt, ev.node, ev.fence)
        if attempt is None:
            self.counters.stale_reports += 1
            known = self.attempts.get(ev.attempt)
            if ev.event in ("accepted", "started") and known is not None and known.state not in ATTEMPT_LIVE:
                return [SendCancel(ev.node, (known.ref(),), STALE)]
            return []
        trigger = _REPORTED.get(ev.event)
        if trigger is None or not ATTEMPT.allows(attempt.state, trigger):
            return []  # progress, a repeat, or out of order (refused after accepted): nothing changes
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        if trigger == AttemptTrigger.ACCEPTED:
            ATTEMPT.move(attempt, trigger)
        elif trigger == AttemptTrigger.STARTED:
            ATTEMPT.move(attempt, trigger)
            attempt.started_at = ev.at
        elif trigger == AttemptTrigger.REFUSED:
            self.counters.refusals += 1
            self._end_attempt(attempt, trigger, ev.at, ev.reason)
            step.refusals += 1
            hard = ev.reason in ("executor-disabled", "unknown-executor")
            step.avoid[ev.node] = ev.at + (10 * AVOID_AFTER_REFUSAL_MS if hard else AVOID_AFTER_REFUSAL_MS)
            if step.refusals >= MAX_REFUSALS:
                return self._step_failed(run, step, f"refused {step.refusals} times (last: {ev.reason})", ev.at)
            self._enqueue(run, step, ev.at + REFUSAL_BACKOFF_MS, StepTrigger.REQUEUED)
        else:
            # The node gave the attempt up on its own (e.g. it is shutting down): place it again, not a failure.
            self._end_attempt(attempt, trigger, ev.at, ev.reason)
            self._enqueue(run, step, ev.at, StepTrigger.REQUEUED)
        return []

    def on_result_reported(self, ev: ResultReported) -> list[Command]:
        attempt = self.current(ev.attempt, ev.node, ev.fence)
        if attempt is None:
            self.counters.stale_reports += 1
            return []
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        if ev.ok:
            self._end_attempt(attempt, AttemptTrigger.SUCCEEDED, ev.at)
            STEP.move(step, StepTrigger.SUCCEEDED)
            step.output = dict(ev.output)
            self._mark_done(step)
            return self._step_settled(run, step, ev.at)
        self._end_attempt(attempt, AttemptTrigger.FAILED, ev.at, ev.error)
        return self._retry_or_fail(run, step, ev.error or "failed", ev.at)

    def on_attempt_lost(self, ev: AttemptLost) -> list[Command]:
        attempt = self.attempts.get(ev.attempt)
        if attempt is None or attempt.state not in ATTEMPT_LIVE:
            return []
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        self.counters.lost_attempts += 1
        self._end_attempt(attempt, AttemptTrigger.LOST, ev.at, ev.reason)
        node = self.nodes.get(attempt.node)
        commands: list[Command] = []
        if node is not None and node.state in REACHABLE:
            commands.append(SendCancel(node.id, (attempt.ref(),), ev.reason))
        if ev.counts:
            return commands + self._retry_or_fail(run, step, ev.reason, ev.at)
        ready_at = ev.at
        if ev.unanswered:
            # Sent but never answered: the node may be unable to read it. Back off like a retry; the decision
            # that fails the step at the limit is taken in hub/runnable.py and journaled on its own.
            step.unanswered += 1
            ready_at += int(1000 * step.spec.retry.delay(step.unanswered, unit(run.id, step.id, "unanswered",
                                                                                step.unanswered)))
            step.avoid[attempt.node] = ready_at + AVOID_UNANSWERING_MS  # another node, if one fits, goes next
        self._enqueue(run, step, ready_at, StepTrigger.REQUEUED)
        return commands

    def _retry_or_fail(self, run: Run, step: StepRun, error: str, at: int) -> list[Command]:
        step.failures += 1
        step.error = error
        retry = step.spec.retry
        if step.failures < retry.max_attempts:
            delay = retry.delay(step.failures, unit(run.id, step.id, step.failures))
            self._enqueue(run, step, at + int(1000 * delay), StepTrigger.REQUEUED)
            return []
        return self._step_failed(run, step, f"step {step.id} failed after {step.failures} attempt(s): {error}", at)

    def on_step_unrunnable(self, ev: StepUnrunnable) -> list[Command]:
        run = self.runs.get(ev.run)
        step = run.steps.get(ev.step) if run is not None else None
        if run is None or step is None or step.state != StepState.QUEUED:
            return []
        return self._step_failed(run, step, ev.reason, ev.at)

    def _step_failed(self, run: Run, step: StepRun, error: str, at: int) -> list[Command]:
        self.queue.pop((run.id, step.id), None)
        STEP.move(step, StepTrigger.FAILED)
        step.error = error
        if step.kind == "compensation":
            return self._advance(run, at)  # recorded; the remaining compensations still run
        if step.parent is not None:
            parent = run.steps[step.parent]
            if parent.state not in STEP_TERMINAL:
                STEP.move(parent, StepTrigger.FAILED)
                parent.error = error
        return self._fail_run(run, error, at) if run.state == RunState.RUNNING else []

    def _step_settled(self, run: Run, step: StepRun, at: int) -> list[Command]:
        if step.parent is not None:
            parent = run.steps[step.parent]
            children = [run.steps[c] for c in parent.instances]
            if parent.state == StepState.RUNNING and all(c.state == StepState.SUCCEEDED for c in children):
                STEP.move(parent, StepTrigger.INSTANCES_SUCCEEDED)
                parent.output = {"instances": len(children),
                                 "outputs": {c.id.split(".", 1)[1]: c.output for c in children}}
                self._mark_done(parent)
        return self._advance(run, at)
