"""The hub's pure core: `Core.apply(event) -> commands` folds journaled events into state; `Core.decide(now)`
returns the decisions (placements, timeouts, liveness changes) the shell journals and applies next.

No I/O and no clock reads: time comes from events and from the `now` passed to `decide`. Every transition of a
run, step or attempt goes through the tables below; an illegal one raises `IllegalTransition` (a bug of ours).
Commands (assign, cancel) are what the shell must send after the event is durable; on replay they are dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .conditions import ConditionError
from .events import (ActionTaken, AttemptAssigned, AttemptLost, BreakerChanged, Event, HealthChanged,
                     HubLoadChanged, NodeBorn, NodeDied, NodeDrainSet, NodeFailed, NodeRemoved, NodeSeen,
                     NodeConflict, NodeSuspected, ReplayMarks, ResultReported, RunCancelRequested, RunSubmitted,
                     RunTimedOut, StepReported, StepUnrunnable)
from .health import Policy
from .runnable import AVOID_UNANSWERING_MS, unanswered
from .workflow import Compensation, Selector, Step, Workflow, instance_id, workflow_from_data

UNANSWERED_MS = 10_000        # an assignment nobody accepted within this is lost (counted apart: hub/runnable.py)
TIMEOUT_GRACE_MS = 5_000      # the agent enforces step timeouts; the hub steps in only after this grace
REFUSAL_BACKOFF_MS = 1_000
AVOID_AFTER_REFUSAL_MS = 30_000
MAX_REFUSALS = 50
RETAIN_FINISHED = 2_000      # finished runs kept whole; older ones shrink to a summary (the journal has the rest)
SUSPECT_AFTER_HEARTBEATS = 2
FAIL_AFTER_HEARTBEATS = 3
CONFLICT_QUIET_MS = 600_000  # a birth this long after the last evidence of a second device clears the node's mark

RUN_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
STEP_TERMINAL = frozenset({"succeeded", "failed", "skipped", "cancelled"})
ATTEMPT_LIVE = frozenset({"assigned", "accepted", "running"})

RUN_TRANSITIONS = {
    "running": {"succeeded", "failed", "cancelled", "timed_out", "compensating"},
    "compensating": {"failed", "cancelled", "timed_out"},
}
STEP_TRANSITIONS = {
    "pending": {"queued", "skipped", "cancelled", "running", "failed", "succeeded"},
    "queued": {"placed", "cancelled", "failed"},
    "placed": {"queued", "succeeded", "failed", "cancelled"},
    "running": {"succeeded", "failed", "cancelled"},  # a for_each parent while its instances run
}
ATTEMPT_TRANSITIONS = {
    "assigned": {"accepted", "running", "succeeded", "failed", "cancelled", "lost", "refused"},
    "accepted": {"running", "succeeded", "failed", "cancelled", "lost"},
    "running": {"succeeded", "failed", "cancelled", "lost"},
}
LIVENESS_TRANSITIONS = {
    "online": {"suspected", "failed", "offline"},
    "suspected": {"online", "failed", "offline"},
    "failed": {"online"},
    "offline": {"online"},
}


class IllegalTransition(RuntimeError):
    """The core tried a transition its tables do not allow: a bug, never caused by input."""


def _move(table: dict[str, set[str]], what: str, obj: Any, new: str) -> None:
    if new not in table.get(obj.state, ()):
        raise IllegalTransition(f"{what} {getattr(obj, 'id', '?')}: {obj.state} -> {new} is not allowed")
    obj.state = new


# -- commands ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SendAssign:
    node: str
    run: str
    step: str
    attempt: str
    fence: int
    uses: str
    inputs: dict[str, Any]
    timeout: float


@dataclass(frozen=True)
class SendCancel:
    node: str
    refs: tuple[tuple[str, str, str, int], ...]
    reason: str


@dataclass(frozen=True)
class SendDrain:
    node: str
    on: bool


@dataclass(frozen=True)
class SendConfig:
    node: str
    tel: float


Command = SendAssign | SendCancel | SendDrain | SendConfig
HISTORY = 50  # health changes and actions kept per node for `nodes show`


# -- state ---------------------------------------------------------------------------------------------------------

@dataclass
class Attempt:
    id: str
    run: str
    step: str
    fence: int
    node: str
    state: str = "assigned"
    assigned_at: int = 0
    started_at: int | None = None
    ended_at: int | None = None
    reason: str | None = None

    def ref(self) -> tuple[str, str, str, int]:
        return (self.run, self.step, self.id, self.fence)


@dataclass
class StepRun:
    id: str
    spec: Step
    kind: str = "step"                 # step, instance (of a for_each), compensation
    state: str = "pending"
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
    state: str = "running"
    steps: dict[str, StepRun] = field(default_factory=dict)
    error: str | None = None
    finished_at: int | None = None
    compensations: list[str] = field(default_factory=list)
    migrations: int = 0


@dataclass
class Node:
    id: str
    boot: int = 0
    profile: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    caps: frozenset[str] = frozenset()
    slots: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    hb: float = 5.0
    state: str = "online"              # liveness: online, suspected, failed, offline
    last_seen: int = 0                 # not journaled: heartbeats are not events; reset to the load time on start
    attempts: set[str] = field(default_factory=set)
    draining: bool = False
    removed: bool = False
    changed_at: int = 0
    health: str = "healthy"
    tel: float = 10.0
    throttled: bool = False
    breaker: str = "closed"
    breaker_at: int = 0
    failures: list[int] = field(default_factory=list)     # times of recent step failures (breaker window)
    probe_successes: int = 0                               # successes while half-open
    probe_failed: bool = False
    migrations: list[int] = field(default_factory=list)   # times of recent migrations off this node
    history: list[dict[str, Any]] = field(default_factory=list)
    # Two devices use this identity (hub/clones.py): {reason, since, last, boots}. A plain default, so nodes in
    # snapshots pickled before the field existed read it as None.
    conflict: dict[str, Any] | None = None

    def remember(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[:-HISTORY]


@dataclass
class Counters:
    stale_reports: int = 0
    refusals: int = 0
    lost_attempts: int = 0


_WORKFLOWS: dict[str, Workflow] = {}


def compile_workflow(spec: dict[str, Any]) -> Workflow:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    workflow = _WORKFLOWS.get(key)
    if workflow is None:
        workflow = _WORKFLOWS[key] = workflow_from_data(spec)
    return workflow


def _unit(*parts: Any) -> float:
    """A deterministic draw in [0, 1) for retry jitter: the same journal replays to the same delays."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Core:
    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.overloaded = False
        self.runs: dict[str, Run] = {}
        self.nodes: dict[str, Node] = {}
        self.attempts: dict[str, Attempt] = {}
        self.live: set[str] = set()                    # attempts assigned, accepted or running
        self.active: set[str] = set()                  # runs not terminal
        self.keys: dict[str, str] = {}                 # idempotency key -> run id
        self.finished: dict[str, None] = {}            # finished runs still kept whole, oldest first
        self.archived: dict[str, tuple[Any, ...]] = {}  # run id -> (workflow, version, state, submitted, finished, error)
        self.queue: dict[tuple[str, str], None] = {}   # (run, step) waiting for placement, in arrival order
        self.fence = 0
        self.seq = 0                                   # events applied
        self.done_seq = 0
        self.windows: dict[str, dict[str, Any]] = {}
        self.counters = Counters()
        self.breaker_watch: set[str] = set()           # nodes with recent failures or a breaker not closed
        self.loaded_at = 0                             # not journaled: when the hub could last hear nodes again
        self._handlers = {
            RunSubmitted: self._run_submitted, RunCancelRequested: self._run_cancel, RunTimedOut: self._run_timed_out,
            NodeBorn: self._node_born, NodeSeen: self._node_seen, NodeDied: self._node_died,
            NodeSuspected: self._node_suspected, NodeFailed: self._node_failed, NodeDrainSet: self._node_drain,
            NodeRemoved: self._node_removed, StepReported: self._step_reported, ResultReported: self._result,
            AttemptAssigned: self._assigned, AttemptLost: self._lost, ReplayMarks: self._replay_marks,
            StepUnrunnable: self._step_unrunnable,
            HealthChanged: self._health_changed, ActionTaken: self._action, BreakerChanged: self._breaker_changed,
            HubLoadChanged: self._hub_load, NodeConflict: self._node_conflict,
        }

    # -- the fold ------------------------------------------------------------------------------------------------

    def apply(self, event: Event) -> list[Command]:
        self.seq += 1
        return self._handlers[type(event)](event) or []  # type: ignore[operator]

    def fold(self, events: list[Event]) -> Core:
        for event in events:
            self.apply(event)
        return self

    def touch(self, node_id: str, now: int) -> bool:
        """A message from a node arrived (heartbeats are not journaled). True if a NodeSeen should be journaled."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = max(node.last_seen, now)
        return node.state == "suspected"

    def after_load(self, now: int) -> None:
        """After a restart, or after a spell when the hub could not keep up (liveness was suspended), nobody has
        been heard from for certain: give every node a fresh heartbeat window."""
        for node in self.nodes.values():
            node.last_seen = max(node.last_seen, now)
        self.loaded_at = now

    # -- runs ----------------------------------------------------------------------------------------------------

    def _run_submitted(self, ev: RunSubmitted) -> list[Command]:
        if ev.run in self.runs or ev.run in self.archived or (ev.key and ev.key in self.keys):
            return []
        workflow = compile_workflow(ev.spec)
        run = Run(ev.run, workflow, dict(ev.inputs), ev.at, ev.deadline, ev.key, self.seq)
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
        if run.state != "running":
            return self._finish_compensation(run, at) if run.state == "compensating" else commands
        for spec in run.workflow.steps:
            step = run.steps[spec.id]
            if step.state != "pending":
                continue
            needs = [run.steps[n] for n in spec.needs]
            if any(n.state not in STEP_TERMINAL for n in needs):
                continue
            succeeded = [n for n in needs if n.state == "succeeded"]
            go = len(succeeded) == len(needs) if spec.join == "all" else (bool(succeeded) or not needs)
            if go and spec.when:
                try:
                    go = spec.condition().evaluate(self._context(run))  # type: ignore[union-attr]
                except ConditionError as exc:
                    step.state, step.error = "failed", f"condition: {exc}"
                    return commands + self._fail_run(run, f"step {spec.id}: condition: {exc}", at)
            if not go:
                _move(STEP_TRANSITIONS, "step", step, "skipped")
                continue
            if spec.for_each is not None:
                self._expand(run, step, spec.for_each, at)
            else:
                self._enqueue(run, step, at)
        if all(s.state in STEP_TERMINAL for s in run.steps.values()):
            self._end_run(run, "succeeded", at)
        return commands

    def _context(self, run: Run) -> dict[str, Any]:
        return {"inputs": run.inputs,
                "steps": {sid: {"output": s.output or {}, "state": s.state} for sid, s in run.steps.items()}}

    def _expand(self, run: Run, parent: StepRun, selector: Selector, at: int) -> None:
        nodes = sorted(n.id for n in self.nodes.values()
                       if n.state == "online" and not n.removed and selector.matches(n.id, n.labels, n.profile, n.caps))
        if not nodes:
            _move(STEP_TRANSITIONS, "step", parent, "succeeded")
            parent.output = {"instances": 0}
            self._mark_done(parent)
            return
        _move(STEP_TRANSITIONS, "step", parent, "running")
        base = parent.spec
        for node_id in nodes:
            placement = base.placement.model_copy(update={"selector": Selector(nodes=[node_id])})
            spec = base.model_copy(update={"id": instance_id(base.id, node_id), "placement": placement,
                                           "for_each": None, "migratable": False})
            child = StepRun(spec.id, spec, kind="instance", parent=parent.id)
            run.steps[child.id] = child
            parent.instances.append(child.id)
            self._enqueue(run, child, at)

    def _enqueue(self, run: Run, step: StepRun, ready_at: int) -> None:
        _move(STEP_TRANSITIONS, "step", step, "queued")
        step.ready_at = ready_at
        self.queue[(run.id, step.id)] = None

    def _mark_done(self, step: StepRun) -> None:
        self.done_seq += 1
        step.done_seq = self.done_seq

    def _end_run(self, run: Run, state: str, at: int, error: str | None = None) -> None:
        _move(RUN_TRANSITIONS, "run", run, state)
        run.finished_at = at
        run.error = run.error or error
        if state in RUN_TERMINAL:
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
                    self._end_attempt(attempt, "cancelled", at, reason)
                    commands.append(SendCancel(attempt.node, (attempt.ref(),), reason))
            self.queue.pop((run.id, step.id), None)
            step.state = "cancelled"  # from any non-terminal state
        return commands

    def _fail_run(self, run: Run, error: str, at: int) -> list[Command]:
        """A step failed for good: stop the rest, then compensate completed steps newest first (saga)."""
        run.error = error
        commands = self._stop_live(run, f"run failed: {error}"[:200], at)
        done = sorted((s for s in run.steps.values() if s.state == "succeeded" and s.spec.compensate is not None),
                      key=lambda s: s.done_seq, reverse=True)
        if not done:
            self._end_run(run, "failed", at)
            return commands
        _move(RUN_TRANSITIONS, "run", run, "compensating")
        previous: str | None = None
        for original in done:
            comp: Compensation = original.spec.compensate  # type: ignore[assignment]
            spec = Step.model_construct(
                id=f"undo-{original.id}", uses=comp.uses, with_=comp.with_, needs=[previous] if previous else [],
                join="all", when=None, placement=original.spec.placement, resources=original.spec.resources,
                timeout=comp.timeout, retry=original.spec.retry, migratable=True, compensate=None, for_each=None)
            step = StepRun(spec.id, spec, kind="compensation")
            run.steps[spec.id] = step
            run.compensations.append(spec.id)
            previous = spec.id
        self._enqueue(run, run.steps[run.compensations[0]], at)
        return commands

    def _finish_compensation(self, run: Run, at: int) -> list[Command]:
        for comp_id in run.compensations:
            step = run.steps[comp_id]
            if step.state == "pending":
                self._enqueue(run, step, at)  # the previous one settled (failed compensations do not stop the rest)
                return []
            if step.state not in STEP_TERMINAL:
                return []
        self._end_run(run, "failed", at)
        return []

    def _run_cancel(self, ev: RunCancelRequested) -> list[Command]:
        run = self.runs.get(ev.run)  # an archived run is finished: nothing to cancel
        if run is None or run.state in RUN_TERMINAL:
            return []
        commands = self._stop_live(run, ev.reason or "cancelled by an operator", ev.at)
        self._end_run(run, "failed" if ev.force_fail else "cancelled", ev.at, ev.reason or None)
        return commands

    def _run_timed_out(self, ev: RunTimedOut) -> list[Command]:
        run = self.runs.get(ev.run)
        if run is None or run.state in RUN_TERMINAL:
            return []
        commands = self._stop_live(run, "run deadline passed", ev.at)
        self._end_run(run, "timed_out", ev.at, "deadline passed")
        return commands

    # -- attempts ------------------------------------------------------------------------------------------------

    def _assigned(self, ev: AttemptAssigned) -> list[Command]:
        run = self.runs[ev.run]
        step = run.steps[ev.step]
        node = self.nodes[ev.node]
        self.fence = max(self.fence, ev.fence)
        attempt = Attempt(ev.attempt, ev.run, ev.step, ev.fence, ev.node, assigned_at=ev.at)
        self.attempts[attempt.id] = attempt
        self.live.add(attempt.id)
        _move(STEP_TRANSITIONS, "step", step, "placed")
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

    def _end_attempt(self, attempt: Attempt, state: str, at: int, reason: str | None = None) -> None:
        _move(ATTEMPT_TRANSITIONS, "attempt", attempt, state)
        self.live.discard(attempt.id)
        attempt.ended_at, attempt.reason = at, reason
        node = self.nodes.get(attempt.node)
        if node is not None:
            node.attempts.discard(attempt.id)

    def _step_reported(self, ev: StepReported) -> list[Command]:
        attempt = self.current(ev.attempt, ev.node, ev.fence)
        if attempt is None:
            self.counters.stale_reports += 1
            known = self.attempts.get(ev.attempt)
            if ev.event in ("accepted", "started") and known is not None and known.state not in ATTEMPT_LIVE:
                return [SendCancel(ev.node, (known.ref(),), "stale attempt: the hub moved this step")]
            return []
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        if ev.event == "accepted" and attempt.state == "assigned":
            _move(ATTEMPT_TRANSITIONS, "attempt", attempt, "accepted")
        elif ev.event == "started" and attempt.state in ("assigned", "accepted"):
            _move(ATTEMPT_TRANSITIONS, "attempt", attempt, "running")
            attempt.started_at = ev.at
        elif ev.event == "refused":
            self.counters.refusals += 1
            self._end_attempt(attempt, "refused", ev.at, ev.reason)
            step.refusals += 1
            hard = ev.reason in ("executor-disabled", "unknown-executor")
            step.avoid[ev.node] = ev.at + (10 * AVOID_AFTER_REFUSAL_MS if hard else AVOID_AFTER_REFUSAL_MS)
            if step.refusals >= MAX_REFUSALS:
                return self._step_failed(run, step, f"refused {step.refusals} times (last: {ev.reason})", ev.at)
            self._enqueue(run, step, ev.at + REFUSAL_BACKOFF_MS)
        elif ev.event == "cancelled":
            # The node gave the attempt up on its own (e.g. it is shutting down): place it again, not a failure.
            self._end_attempt(attempt, "cancelled", ev.at, ev.reason)
            self._enqueue(run, step, ev.at)
        return []

    def _result(self, ev: ResultReported) -> list[Command]:
        attempt = self.current(ev.attempt, ev.node, ev.fence)
        if attempt is None:
            self.counters.stale_reports += 1
            return []
        node = self.nodes.get(ev.node)
        if node is not None:
            if ev.ok:
                node.probe_successes += node.breaker == "half_open"
            else:
                window = int(self.policy.breaker.window * 1000)
                node.failures = [t for t in node.failures if t > ev.at - window] + [ev.at]
                self.breaker_watch.add(node.id)
                node.probe_failed = node.probe_failed or node.breaker == "half_open"
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        if ev.ok:
            self._end_attempt(attempt, "succeeded", ev.at)
            _move(STEP_TRANSITIONS, "step", step, "succeeded")
            step.output = dict(ev.output)
            self._mark_done(step)
            return self._step_settled(run, step, ev.at)
        self._end_attempt(attempt, "failed", ev.at, ev.error)
        return self._retry_or_fail(run, step, ev.error or "failed", ev.at)

    def _lost(self, ev: AttemptLost) -> list[Command]:
        attempt = self.attempts.get(ev.attempt)
        if attempt is None or attempt.state not in ATTEMPT_LIVE:
            return []
        run = self.runs[attempt.run]
        step = run.steps[attempt.step]
        self.counters.lost_attempts += 1
        self._end_attempt(attempt, "lost", ev.at, ev.reason)
        node = self.nodes.get(attempt.node)
        commands: list[Command] = []
        if node is not None and node.state in ("online", "suspected"):
            commands.append(SendCancel(node.id, (attempt.ref(),), ev.reason))
        if ev.counts:
            return commands + self._retry_or_fail(run, step, ev.reason, ev.at)
        ready_at = ev.at
        if ev.unanswered:
            # Sent but never answered: the node may be unable to read it. Back off like a retry; the decision
            # that fails the step at the limit is taken in hub/runnable.py and journaled on its own.
            step.unanswered += 1
            ready_at += int(1000 * step.spec.retry.delay(step.unanswered, _unit(run.id, step.id, "unanswered",
                                                                                  step.unanswered)))
            step.avoid[attempt.node] = ready_at + AVOID_UNANSWERING_MS  # another node, if one fits, goes next
        self._enqueue(run, step, ready_at)
        return commands

    def _retry_or_fail(self, run: Run, step: StepRun, error: str, at: int) -> list[Command]:
        step.failures += 1
        step.error = error
        retry = step.spec.retry
        if step.failures < retry.max_attempts:
            delay = retry.delay(step.failures, _unit(run.id, step.id, step.failures))
            self._enqueue(run, step, at + int(1000 * delay))
            return []
        return self._step_failed(run, step, f"step {step.id} failed after {step.failures} attempt(s): {error}", at)

    def _step_unrunnable(self, ev: StepUnrunnable) -> list[Command]:
        run = self.runs.get(ev.run)
        step = run.steps.get(ev.step) if run is not None else None
        if run is None or step is None or step.state != "queued":
            return []
        return self._step_failed(run, step, ev.reason, ev.at)

    def _step_failed(self, run: Run, step: StepRun, error: str, at: int) -> list[Command]:
        self.queue.pop((run.id, step.id), None)
        _move(STEP_TRANSITIONS, "step", step, "failed")
        step.error = error
        if step.kind == "compensation":
            return self._advance(run, at)  # recorded; the remaining compensations still run
        if step.parent is not None:
            parent = run.steps[step.parent]
            if parent.state not in STEP_TERMINAL:
                _move(STEP_TRANSITIONS, "step", parent, "failed")
                parent.error = error
        return self._fail_run(run, error, at) if run.state == "running" else []

    def _step_settled(self, run: Run, step: StepRun, at: int) -> list[Command]:
        if step.parent is not None:
            parent = run.steps[step.parent]
            children = [run.steps[c] for c in parent.instances]
            if parent.state == "running" and all(c.state == "succeeded" for c in children):
                _move(STEP_TRANSITIONS, "step", parent, "succeeded")
                parent.output = {"instances": len(children),
                                 "outputs": {c.id.split(".", 1)[1]: c.output for c in children}}
                self._mark_done(parent)
        return self._advance(run, at)

    # -- nodes ---------------------------------------------------------------------------------------------------

    def _node_born(self, ev: NodeBorn) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None:
            node = self.nodes[ev.node] = Node(ev.node)
        elif node.state != "online":
            _move(LIVENESS_TRANSITIONS, "node", node, "online")
            node.remember({"at": ev.at, "kind": "liveness", "state": "online", "reason": f"birth, boot {ev.boot}"})
        if node.conflict is not None and ev.at - node.conflict["last"] >= CONFLICT_QUIET_MS:
            # Evidence of a second device keeps coming while it runs; a birth after a long silence clears the mark.
            node.remember({"at": ev.at, "kind": "conflict", "conflict": False,
                           "reason": f"no sign of a second device for {CONFLICT_QUIET_MS // 60_000} min"})
            node.conflict = None
        node.boot, node.profile, node.labels = ev.boot, ev.profile, dict(ev.labels)
        node.caps, node.slots, node.resources, node.hb = frozenset(ev.caps), ev.slots, dict(ev.resources), ev.hb
        node.tel = ev.tel
        node.last_seen = max(node.last_seen, ev.at)
        node.changed_at = ev.at
        node.removed = False
        stale = tuple(ref for ref in ev.running if self.current(ref[2], ev.node, ref[3]) is None)
        return [SendCancel(ev.node, stale, "stale attempt: the hub moved this step")] if stale else []

    def _node_conflict(self, ev: NodeConflict) -> list[Command]:
        """Marks the node only: the devices are not told anything, so neither is pushed into a new boot."""
        node = self.nodes.get(ev.node)
        if node is None:
            return []
        if node.conflict is None:
            node.conflict = {"reason": ev.reason, "since": ev.at, "last": ev.at, "boots": sorted({ev.boot, ev.current})}
            node.remember({"at": ev.at, "kind": "conflict", "conflict": True, "reason": ev.reason})
        else:
            node.conflict = {**node.conflict, "reason": ev.reason, "last": ev.at,
                             "boots": sorted({*node.conflict["boots"], ev.boot, ev.current})[-4:]}
        return []

    def _node_seen(self, ev: NodeSeen) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None and node.state == "suspected":
            _move(LIVENESS_TRANSITIONS, "node", node, "online")
            node.changed_at = ev.at
        return []

    def _node_suspected(self, ev: NodeSuspected) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None and node.state == "online":
            _move(LIVENESS_TRANSITIONS, "node", node, "suspected")
            node.changed_at = ev.at
        return []

    def _node_failed(self, ev: NodeFailed) -> list[Command]:
        return self._take_down(ev.node, "failed", ev.reason, ev.at)

    def _node_died(self, ev: NodeDied) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None or ev.boot != node.boot or node.state in ("failed", "offline"):
            return []  # a will left from an older session never kills a newer one
        state = "offline" if ev.reason == "shutdown" else "failed"
        return self._take_down(ev.node, state, f"death certificate ({ev.reason})", ev.at)

    def _node_removed(self, ev: NodeRemoved) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None:
            return []
        node.removed = True
        commands = self._take_down(ev.node, "failed", ev.reason or "removed", ev.at) if node.state != "failed" else []
        if ev.forget:  # attempts keep the node's id as history; nothing looks the node up by it any more
            del self.nodes[ev.node]
            self.breaker_watch.discard(ev.node)
        return commands

    def _take_down(self, node_id: str, state: str, reason: str, at: int) -> list[Command]:
        """The node is gone: its attempts are lost. Migratable ones, and ones that never started, go elsewhere
        at once; the others count as a failed attempt under their retry policy."""
        node = self.nodes.get(node_id)
        if node is None or node.state == state:
            return []
        _move(LIVENESS_TRANSITIONS, "node", node, state)
        node.changed_at = at
        node.remember({"at": at, "kind": "liveness", "state": state, "reason": reason})
        commands: list[Command] = []
        for attempt_id in sorted(node.attempts, key=lambda a: self.attempts[a].fence):
            attempt = self.attempts[attempt_id]
            step = self.runs[attempt.run].steps[attempt.step]
            counts = not (step.spec.migratable or attempt.state in ("assigned", "accepted"))
            commands += self._lost(AttemptLost(at, attempt_id, f"node {node_id} {state}: {reason}", counts))
        return commands

    def _node_drain(self, ev: NodeDrainSet) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.draining = ev.on
        return []

    def _replay_marks(self, ev: ReplayMarks) -> list[Command]:
        self.windows = dict(ev.windows)
        return []

    # -- adaptation ----------------------------------------------------------------------------------------------

    def _health_changed(self, ev: HealthChanged) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.health = ev.health
            node.remember({"at": ev.at, "kind": "health", "health": ev.health, "metric": ev.metric,
                           "value": ev.value, "threshold": ev.threshold, "duration": ev.duration, "reason": ev.reason})
        return []

    def _action(self, ev: ActionTaken) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None:
            return []
        node.remember({"at": ev.at, "kind": "action", "action": ev.action, "reason": ev.reason})
        if ev.action == "throttle":
            node.throttled = True
        elif ev.action == "unthrottle":
            node.throttled = False
        elif ev.action == "drain":
            node.draining = True
            return [SendDrain(node.id, True)]
        elif ev.action == "telemetry_rate":
            return [SendConfig(node.id, node.tel * self.policy.self_protection.telemetry_factor)]
        elif ev.action == "circuit_break":
            node.breaker, node.breaker_at = "open", ev.at
        elif ev.action == "migrate":
            return self._migrate(node, ev)
        return []

    def _migrate(self, node: Node, ev: ActionTaken) -> list[Command]:
        """Move migratable live attempts off the node (new fenced attempt elsewhere; the old one is cancelled),
        within the limits against flapping."""
        limits = self.policy.limits
        window = int(limits.window * 1000)
        node.migrations = [t for t in node.migrations if t > ev.at - window]
        commands: list[Command] = []
        for attempt_id in sorted(node.attempts, key=lambda a: self.attempts[a].fence):
            attempt = self.attempts[attempt_id]
            run = self.runs[attempt.run]
            step = run.steps[attempt.step]
            if not step.spec.migratable:
                continue
            if len(node.migrations) >= limits.max_migrations_per_node or run.migrations >= limits.max_migrations_per_run:
                node.remember({"at": ev.at, "kind": "action", "action": "migrate-skipped",
                               "reason": f"limit reached for {attempt_id} (node or run migration limit)"})
                continue
            node.migrations.append(ev.at)
            run.migrations += 1
            step.avoid[node.id] = ev.at + int(self.policy.cooldown * 1000)
            commands += self._lost(AttemptLost(ev.at, attempt_id, f"migrated off {node.id}: {ev.reason}", False))
        return commands

    def _breaker_changed(self, ev: BreakerChanged) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.breaker, node.breaker_at = ev.state, ev.at
            node.probe_successes, node.probe_failed = 0, False
            if ev.state == "closed":
                node.failures = []
                self.breaker_watch.discard(node.id)
            else:
                self.breaker_watch.add(node.id)
            node.remember({"at": ev.at, "kind": "breaker", "state": ev.state, "reason": ev.reason})
        return []

    def _hub_load(self, ev: HubLoadChanged) -> list[Command]:
        self.overloaded = ev.overloaded
        factor = self.policy.self_protection.telemetry_factor if ev.overloaded else 1.0
        return [SendConfig(n.id, n.tel * factor) for n in sorted(self.nodes.values(), key=lambda n: n.id)
                if n.state in ("online", "suspected")]

    def _breakers(self, now: int) -> list[Event]:
        policy = self.policy.breaker
        out: list[Event] = []
        for node in (self.nodes[n] for n in sorted(self.breaker_watch)):
            recent = [t for t in node.failures if t > now - policy.window * 1000]
            if node.breaker == "closed" and len(recent) >= policy.failures:
                out.append(BreakerChanged(now, node.id, "open",
                                          f"{len(recent)} step failures in {policy.window:g} s"))
            elif node.breaker == "open" and now - node.breaker_at >= policy.cooldown * 1000:
                out.append(BreakerChanged(now, node.id, "half_open", f"open for {policy.cooldown:g} s: one probe"))
            elif node.breaker == "half_open" and node.probe_failed:
                out.append(BreakerChanged(now, node.id, "open", "the probe step failed"))
            elif node.breaker == "half_open" and node.probe_successes >= policy.successes:
                out.append(BreakerChanged(now, node.id, "closed", f"{node.probe_successes} probe(s) succeeded"))
        return out

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide(self, now: int, placement_limit: int = 1000, timers: bool = True, liveness: bool = True) -> list[Event]:
        """Everything due at `now`: liveness changes, lost attempts, run deadlines, breakers, then placements.

        Timers scan every node and live attempt; a caller deciding after every small batch may pass `timers=False`
        for most calls (the hub scans at most every 100 ms: timer precision, not correctness)."""
        from .scheduler import place

        out: list[Event] = []
        if timers:
            out.extend(self._timers(now, liveness))
        if not out:
            out.extend(place(self, now, placement_limit))
        return out

    def _timers(self, now: int, liveness: bool = True) -> list[Event]:
        """`liveness=False` while the hub itself is behind (its intake is full or lags): silence may then be ours, so
        no node is suspected or failed and no assignment counts as unanswered until it catches up."""
        out: list[Event] = []
        for node in self.nodes.values() if liveness else ():
            silent = now - node.last_seen
            period = node.hb * 1000
            if node.state == "online" and silent > SUSPECT_AFTER_HEARTBEATS * period:
                out.append(NodeSuspected(now, node.id))
            elif node.state == "suspected" and silent > FAIL_AFTER_HEARTBEATS * period:
                out.append(NodeFailed(now, node.id, f"no heartbeat for {silent / 1000:.1f} s"))
        for attempt in (self.attempts[a] for a in sorted(self.live)):
            # measured from when the hub could hear again: answers sent meanwhile arrive from the nodes' outboxes
            waited = now - max(attempt.assigned_at, self.loaded_at)
            if liveness and attempt.state == "assigned" and waited > UNANSWERED_MS:
                out.extend(unanswered(self, attempt, now))
            elif attempt.state == "running" and attempt.started_at is not None:
                timeout = self.runs[attempt.run].steps[attempt.step].spec.timeout
                if now - attempt.started_at > timeout * 1000 + TIMEOUT_GRACE_MS:
                    out.append(AttemptLost(now, attempt.id, f"timed out after {timeout:g} s (no result)"))
        for run in (self.runs[r] for r in sorted(self.active)):
            if now >= run.deadline:
                out.append(RunTimedOut(now, run.id))
        out.extend(self._breakers(now))
        return out

    def live_attempts(self) -> list[Attempt]:
        return [self.attempts[a] for a in sorted(self.live)]
