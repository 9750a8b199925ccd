"""The deployments half of the hub's pure core: deployments and their per-node executions, folded from journaled
events; `decide` (hub/deployments/decide.py) returns what is due.

No I/O and no clock reads: time comes from events and from the `now` given to `decide`. States move only along the
tables of hub/deployments/machine.py. Nodes (hub/fleet.py) are read for matching, liveness, health and boots, and
hold the inventory (`Node.versions`) that executions change; runs (hub/runs.py) are read for the outcome of the runs
executions start. Counters the decisions need (per wave and state, failures, what runs) are kept as events apply
and rebuilt from the executions when a snapshot loads, so a snapshot holds only what the events said.

Memory stays proportional to recent work: an execution keeps its newest runs (`RUNS_KEPT`; `run_counts` counts them
all), and ended deployments beyond `RETAIN_ENDED` shrink to their summary (the journal has the rest), as finished
runs do in hub/runs.py.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Unprocessable
from ..events import DeploymentChanged, DeploymentControlled, DeploymentCreated, Event, ExecutionChanged
from ..runnable import workflow_problems
from ..runs import compile_workflow
from .machine import (DEPLOYMENT, DEPLOYMENT_OPEN, EXECUTION, EXECUTION_ACTIVE, EXECUTION_LIVE, EXECUTION_TERMINAL,
                      DeploymentState, DeploymentTrigger, ExecutionState, check_move)
from .model import DeploymentSpec, spec_from_record

if TYPE_CHECKING:
    from ..fleet import Command, Node
    from ..runs import Runs

__all__ = ["CONTROLS", "NEVER", "RETAIN_ENDED", "RUNS_KEPT", "Deployment", "Deployments", "Execution",
           "control_problem", "deployable"]

NEVER = 2**62
RUNS_KEPT = 5               # an execution's newest runs kept (retries, resubmissions, rollbacks, earlier rounds)
RETAIN_ENDED = 100          # ended deployments kept whole; older ones shrink to their summary
RETAIN_ARCHIVED = 10_000    # summaries kept; older ones are only in the journal
_D, _E = DeploymentState, ExecutionState
# What an operator request moves a deployment by (hub/deployments/machine.py's triggers).
CONTROLS = {"pause": DeploymentTrigger.PAUSE_REQUESTED, "resume": DeploymentTrigger.RESUMED,
            "cancel": DeploymentTrigger.CANCEL_REQUESTED}


def deployable(spec: DeploymentSpec, resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> DeploymentSpec:
    """The spec with its workflow as its runs will carry it (`resolve` adds what the hub must, such as artifact
    manifests); Unprocessable when a step's assignment could never be sent. Blocking: call it in a worker thread."""
    workflow = resolve(spec.workflow)
    problems = workflow_problems(compile_workflow(workflow))
    if problems:
        raise Unprocessable("workflow: " + "; ".join(problems[:10]))
    return dataclasses.replace(spec, workflow=workflow)


def control_problem(dep: Deployment, action: str, force: bool) -> str | None:
    """Why an operator's pause, resume or cancel does not apply to the deployment now (None: it does)."""
    if action not in CONTROLS:
        return f"unknown action {action!r}: pause, resume or cancel"
    if DEPLOYMENT.allows(dep.state, CONTROLS[action]):
        return None
    if action == "cancel" and force and (dep.live or dep.undo):
        return None  # ended, but executions still run (or rollbacks wait to): --force ends them
    need = {"pause": "running", "resume": "paused", "cancel": "scheduled, running or paused (or, with --force, "
                                                            "still running executions)"}[action]
    return f"deployment {dep.id} is {dep.state}: {action} needs it {need}"


@dataclass
class Execution:
    node: str
    round: int
    wave: int
    seq: int                             # queue order within its deployment
    state: ExecutionState = ExecutionState.QUEUED
    reason: str = ""
    run: str | None = None               # the run under way or last run (a retry's, the rollback's)
    runs: list[str] = field(default_factory=list)
    retries: int = 0                     # retries used
    version_before: str | None = None
    version: str | None = None           # the component's version on the node when it ended
    failure: str | None = None           # failed, timed_out, rejected: what ended it or started its rollback
    queued_at: int = 0
    started_at: int | None = None
    updated_at: int = 0
    deadline: int | None = None          # every non-terminal state has one (queued: once it may start)
    verify_from: int | None = None
    verify_boot: int | None = None
    outage_at: int | None = None         # verifying: when the node's liveness first left online in the window


@dataclass
class Deployment:
    id: str
    spec: DeploymentSpec
    record: dict[str, Any]               # the spec as journaled (snapshots store it)
    actor: str
    created_at: int
    seq: int
    state: DeploymentState = DeploymentState.SCHEDULED
    reason: str = ""
    updated_at: int = 0
    ended_at: int | None = None
    next_fire: int | None = None
    round: int = 0
    round_started_at: int | None = None
    wave: int = 0                        # the current wave, 1-based (0: no round yet)
    abort_reason: str | None = None
    last_start: int | None = None        # of this round: the rate counts from it
    notified: int = 0                    # executions started in this round
    succeeded: int = 0                   # executions that succeeded in this round
    queued: int = 0                      # executions queued so far (their queue order)
    executions: dict[str, Execution] = field(default_factory=dict)
    run_counts: dict[str, int] = field(default_factory=dict)  # runs started per node: run ids never repeat
    joining: set[str] = field(default_factory=set)   # nodes that newly match: to be queued
    leaving: set[str] = field(default_factory=set)   # queued nodes that no longer match: to end removed
    undo: set[str] = field(default_factory=set)      # aborted under on-abort: succeeded nodes still to roll back
    stopping: set[str] = field(default_factory=set)  # cancel --force: the executions live then, to end at once
    # Derived from the executions (rebuilt on load):
    live: set[str] = field(default_factory=set)
    tally: dict[int, collections.Counter[ExecutionState]] = field(default_factory=dict)  # this round, by wave
    failures: collections.Counter[str] = field(default_factory=collections.Counter)      # this round, executed
    executed: int = 0                    # this round: ended executions the abort criteria count
    active: int = 0                      # executions in progress, verifying or rolling back

    @property
    def waves(self) -> int:
        return len(self.spec.waves.sizes)

    def startable(self, ex: Execution) -> bool:
        """Whether a queued execution may start now but for the rate, --max-concurrent, windows and the node: its
        deployment is running and its wave has started (or it is the component's current one, taking joiners).
        Only then does its queued deadline (--timeout) run: a pause or a wave not yet started is the operator's."""
        return (self.state == _D.RUNNING and ex.wave <= self.wave) or self.state == _D.SUCCEEDED

    def counts(self, wave: int | None = None) -> collections.Counter[ExecutionState]:
        if wave is not None:
            return self.tally.get(wave, collections.Counter())
        total: collections.Counter[ExecutionState] = collections.Counter()
        for counter in self.tally.values():
            total.update(counter)
        return total


class Deployments:
    """The deployments and the indexes decisions use; `on_<event>` applies the journaled event of that name."""

    def __init__(self, nodes: dict[str, Node], work: Runs) -> None:
        self.nodes = nodes                   # the fleet's (hub/fleet.py): matching, health, inventory
        self.work = work                     # the runs half: the outcome of the runs executions start
        self.deployments: dict[str, Deployment] = {}
        self.active: set[str] = set()        # deployments decide looks at
        self.current: dict[str, str] = {}    # component -> its newest succeeded deployment (late joiners get it)
        self.newest: dict[str, str] = {}     # component -> its newest deployment
        self.busy: dict[tuple[str, str], str] = {}  # (node, component) -> the deployment updating it now
        self.ended: dict[str, None] = {}     # ended deployments kept whole, in the order they ended
        self.archived: dict[str, dict[str, Any]] = {}  # older ones: id -> their summary (hub/deployments/views.py)
        self.ended_grew = False              # one more ended since `_retire` looked (which it then does again)
        self.seq = 0
        self.wake_at = 0                     # not journaled: when `decide` is next due besides the timer scan

    # -- the fold ------------------------------------------------------------------------------------------------

    def on_deployment_created(self, ev: DeploymentCreated) -> list[Command]:
        if ev.deployment in self.deployments or ev.deployment in self.archived:
            return []
        spec = spec_from_record(ev.spec)
        self.seq += 1
        dep = Deployment(ev.deployment, spec, ev.spec, ev.actor, ev.at, self.seq, updated_at=ev.at,
                         reason="waiting for its fire time" if spec.at or spec.cron else "starting")
        # A deployment without a schedule fires at once; a cron one once `decide` has journaled its first fire time.
        dep.next_fire = spec.at if spec.at is not None else (None if spec.cron else ev.at)
        self.deployments[dep.id] = dep
        self.newest[spec.component] = dep.id
        self._refresh(dep)
        self.wake_at = 0
        return []

    def on_deployment_controlled(self, ev: DeploymentControlled) -> list[Command]:
        """An operator's pause, resume or cancel; one that no longer applies (the deployment moved meanwhile) is
        ignored. A forced cancel ends the executions live at that moment, also of a deployment already ended, and
        no rollback starts after it; executions that come later (a succeeded deployment's joiners) are not its."""
        dep = self.deployments.get(ev.deployment)
        trigger = CONTROLS.get(ev.action)
        if dep is None or trigger is None:
            return []
        target = DEPLOYMENT.target(dep.state, trigger)
        if target is not None:
            DEPLOYMENT.move(dep, trigger)
            dep.reason, dep.updated_at = ev.reason or f"{ev.action} requested", ev.at
            if target == _D.CANCELED:
                dep.ended_at = ev.at
                dep.joining.clear()
            self._deadlines(dep, ev.at)
        if ev.action == "cancel" and ev.force:
            dep.stopping |= dep.live
            dep.undo.clear()
        self._refresh(dep)
        self._retire()
        self.wake_at = 0
        return []

    def on_deployment_changed(self, ev: DeploymentChanged) -> list[Command]:
        dep = self.deployments[ev.deployment]
        state = DeploymentState(ev.state)
        check_move(DEPLOYMENT, dep.id, dep.state, state)
        dep.state, dep.reason, dep.updated_at, dep.next_fire = state, ev.reason, ev.at, ev.next_fire
        if ev.fired is not None:  # a new round: the target is taken afresh, the rate and the counts start over
            dep.round += 1
            dep.round_started_at, dep.last_start, dep.notified, dep.succeeded, dep.executed = ev.at, None, 0, 0, 0
            dep.tally, dep.failures, dep.joining, dep.leaving = {}, collections.Counter(), set(), set()
        if ev.wave is not None:
            dep.wave = ev.wave
        self._deadlines(dep, ev.at)
        if state not in DEPLOYMENT_OPEN:
            dep.ended_at = ev.at
        if state in (_D.ABORTED, _D.CANCELED):
            dep.joining.clear()
        if state == _D.SUCCEEDED:
            holder = self.deployments.get(self.current.get(dep.spec.component, ""))
            if holder is None or holder.seq < dep.seq:
                self.current[dep.spec.component] = dep.id
                if holder is not None:  # it no longer takes nodes that join: this one does
                    holder.joining.clear()
                    self._refresh(holder)
        elif state == _D.ABORTED:
            dep.abort_reason = ev.reason
            if dep.spec.rollback == "on-abort":
                dep.undo = {n for n, ex in dep.executions.items() if ex.round == dep.round and ex.state == _E.SUCCEEDED}
        self._refresh(dep)
        self._retire()
        return []

    def on_execution_changed(self, ev: ExecutionChanged) -> list[Command]:
        dep = self.deployments[ev.deployment]
        state = ExecutionState(ev.state)
        ex = dep.executions.get(ev.node)
        check_move(EXECUTION, f"{dep.id}/{ev.node}", ex.state if ex is not None else None, state)
        if state == _E.QUEUED:
            self._queue(dep, ev)
            self._refresh(dep)
            return []
        assert ex is not None  # check_move allows only QUEUED for a node without an execution
        self._count(dep, ex, -1)
        before = ex.state
        ex.state, ex.reason, ex.updated_at = state, ev.reason, ev.at
        ex.failure = ev.failure or ex.failure
        node = self.nodes.get(ev.node)
        if ev.run is not None:
            ex.run = ev.run
            ex.runs.append(ev.run)
            del ex.runs[:-RUNS_KEPT]
            dep.run_counts[ev.node] = dep.run_counts.get(ev.node, 0) + 1
        if state == _E.IN_PROGRESS:
            if before == _E.QUEUED:
                ex.started_at = ev.at
                ex.version_before = node.versions.get(dep.spec.component) if node is not None else None
                dep.last_start = ev.at
                dep.notified += 1
                ex.deadline = ev.at + dep.spec.in_progress_timeout_ms
            elif ev.retry:
                ex.retries += 1
                ex.deadline = ev.at + dep.spec.in_progress_timeout_ms
            # else: started again after its node went down; the deadline of the attempt to update it holds
        elif state == _E.VERIFYING:
            ex.verify_from, ex.deadline = ev.at, ev.at + dep.spec.verify_ms
            ex.verify_boot, ex.outage_at = (node.boot if node is not None else None), None
        elif state == _E.ROLLING_BACK:
            ex.deadline = ev.at + dep.spec.in_progress_timeout_ms
            dep.undo.discard(ev.node)
        elif before == _E.SUCCEEDED:  # stays succeeded: its rollback must not run (machine.py's ROLLBACK_SKIPPED)
            dep.undo.discard(ev.node)
        else:
            ex.deadline = None
            self._inventory(dep, ex, node, state, ev.version)
        if state in EXECUTION_TERMINAL:
            dep.leaving.discard(ev.node)
            dep.stopping.discard(ev.node)
        self._count(dep, ex, +1)
        self._refresh(dep)
        self._retire()
        return []

    def node_left_online(self, node_id: str, at: int) -> None:
        """The node was suspected, failed, went offline or was removed: a verify window it is in saw an outage."""
        for dep_id in sorted(self.active):
            ex = self.deployments[dep_id].executions.get(node_id)
            if ex is not None and ex.state == _E.VERIFYING and ex.outage_at is None:
                ex.outage_at = at

    def _queue(self, dep: Deployment, ev: ExecutionChanged) -> None:
        """A node enters the round: at its fire, or later as it joins the target (into the last wave)."""
        old = dep.executions.pop(ev.node, None)
        if old is not None:
            self._count(dep, old, -1)
        dep.queued += 1
        ex = Execution(ev.node, dep.round, ev.wave or dep.waves, dep.queued, reason=ev.reason,
                       queued_at=ev.at, updated_at=ev.at, runs=old.runs if old is not None else [])
        ex.deadline = ev.at + dep.spec.timeout_ms if dep.startable(ex) else None
        dep.executions[ev.node] = ex
        dep.joining.discard(ev.node)
        self._count(dep, ex, +1)

    def _deadlines(self, dep: Deployment, at: int) -> None:
        """Queued executions: the --timeout deadline runs from when each may start, and stops while it may not."""
        for node_id in dep.live:
            ex = dep.executions[node_id]
            if ex.state == _E.QUEUED:
                if not dep.startable(ex):
                    ex.deadline = None
                elif ex.deadline is None:
                    ex.deadline = at + dep.spec.timeout_ms

    def _inventory(self, dep: Deployment, ex: Execution, node: Node | None, state: ExecutionState,
                   version: str | None) -> None:
        """A terminal state: succeeded records the new version on the node, rolled back the one before; canceled
        with a version records that (versions.py's UNKNOWN: an update stopped part-way)."""
        component = dep.spec.component
        if state == _E.SUCCEEDED:
            dep.succeeded += ex.round == dep.round
            if (dep.state == _D.ABORTED and dep.spec.rollback == "on-abort" and ex.round == dep.round
                    and ex.node not in dep.stopping):
                dep.undo.add(ex.node)
        recorded = state in (_E.SUCCEEDED, _E.ROLLED_BACK) or (state == _E.CANCELED and version is not None)
        if node is not None and recorded:
            if version is None:
                node.versions.pop(component, None)
            else:
                node.versions[component] = version
        ex.version = version if recorded else (node.versions.get(component) if node is not None else
                                               ex.version_before)

    def _count(self, dep: Deployment, ex: Execution, sign: int) -> None:
        """Keep the per-round counters and the indexes in step with one execution (removed with -1, added +1)."""
        component = dep.spec.component
        live = ex.state in EXECUTION_LIVE
        if sign > 0:
            (dep.live.add if live else dep.live.discard)(ex.node)
        if ex.state in EXECUTION_ACTIVE:
            dep.active += sign
            if sign > 0:  # an owner per key, never taken over: decide starts nothing on a key another one holds
                self.busy.setdefault((ex.node, component), dep.id)
            elif self.busy.get((ex.node, component)) == dep.id:
                del self.busy[(ex.node, component)]
        if ex.round != dep.round:
            return
        dep.tally.setdefault(ex.wave, collections.Counter())[ex.state] += sign
        if _executed(ex):
            dep.executed += sign
            if ex.failure is not None:
                dep.failures[ex.failure] += sign

    def _refresh(self, dep: Deployment) -> None:
        if dep.state in DEPLOYMENT_OPEN or dep.live or dep.joining or dep.leaving or dep.undo:
            self.active.add(dep.id)
            self.ended.pop(dep.id, None)
        else:
            self.active.discard(dep.id)
            if dep.id not in self.ended:
                self.ended[dep.id] = None
                self.ended_grew = True

    def _retire(self) -> None:
        """Past RETAIN_ENDED ended deployments, the one that ended first shrinks to its summary; a component's
        newest and current deployments stay whole (they decide who takes nodes that join)."""
        if not self.ended_grew:
            return
        self.ended_grew = False
        while len(self.ended) > RETAIN_ENDED:
            keep = set(self.current.values()) | set(self.newest.values())
            oldest = next((dep_id for dep_id in self.ended if dep_id not in keep), None)
            if oldest is None:
                return
            from .views import summary

            del self.ended[oldest]
            self.archived[oldest] = {**summary(self.deployments.pop(oldest)), "archived": True}
            while len(self.archived) > RETAIN_ARCHIVED:
                del self.archived[next(iter(self.archived))]

    # -- the target as nodes come and go -------------------------------------------------------------------------

    def tracking(self) -> list[Deployment]:
        """Deployments that take nodes newly matching their target: those rolling out, and each component's
        current (newest succeeded) one unless a newer one of the component is still open."""
        out = [self.deployments[d] for d in sorted(self.active) if self.deployments[d].state in (_D.RUNNING, _D.PAUSED)]
        for component, dep_id in sorted(self.current.items()):
            dep, newest = self.deployments[dep_id], self.deployments[self.newest[component]]
            if dep.state == _D.SUCCEEDED and (newest is dep or newest.state not in DEPLOYMENT_OPEN):
                out.append(dep)
        return out

    def matches(self, dep: Deployment, node: Node | None) -> bool:
        return (node is not None and not node.removed
                and dep.spec.target.matches(node.id, node.labels, node.profile, node.caps))

    def node_changed(self, node_id: str) -> None:
        """A birth (labels may have changed), a removal or a delete: who joins, who leaves."""
        node = self.nodes.get(node_id)
        for dep in self.tracking():
            ex = dep.executions.get(node_id)
            if self.matches(dep, node):
                dep.leaving.discard(node_id)
                fresh = ex is None or (ex.round < dep.round and ex.state in EXECUTION_TERMINAL)
                if fresh and node is not None and node.versions.get(dep.spec.component) != dep.spec.version:
                    dep.joining.add(node_id)
            else:
                dep.joining.discard(node_id)
                if ex is not None and ex.state == _E.QUEUED:
                    dep.leaving.add(node_id)
            self._refresh(dep)
            self.wake_at = 0
        self._retire()

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide(self, now: int, full: bool = True, liveness: bool = True, heard_since: int = 0) -> list[Event]:
        """What is due at `now` (hub/deployments/decide.py). `full=False` (a wake between timer scans): fire times,
        joins and starts, without looking at each execution's run. `heard_since`: when the hub could last hear
        nodes again (hub/state.py's `loaded_at`): a node not heard from since proves nothing."""
        from .decide import decide

        out, wake = decide(self, now, full, liveness, heard_since)
        self.wake_at = now if out else wake  # decisions enable more: ask again at once
        return out

    # -- snapshots -----------------------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {"seq": self.seq, "deployments": [_dump(dep) for dep in self.deployments.values()],
                "ended": list(self.ended), "archived": [[dep_id, data] for dep_id, data in self.archived.items()]}

    def load(self, data: dict[str, Any]) -> None:
        self.seq = int(data["seq"])
        for raw in data["deployments"]:
            dep = Deployment(**{name: raw[name] for name in _DEPLOYMENT}, spec=spec_from_record(raw["record"]),
                             record=raw["record"])
            for name in _NODE_SETS:
                setattr(dep, name, set(raw[name]))
            dep.state = DeploymentState(dep.state)
            for item in raw["executions"]:
                ex = Execution(**{name: item[name] for name in _EXECUTION})
                ex.state = ExecutionState(ex.state)
                dep.executions[ex.node] = ex
                self._count(dep, ex, +1)
            self.deployments[dep.id] = dep
            self.newest[dep.spec.component] = dep.id
            if dep.state == _D.SUCCEEDED:
                self.current[dep.spec.component] = dep.id  # in creation order: the newest succeeded stays
            self._refresh(dep)
        self.ended = dict.fromkeys(data["ended"])  # the order they ended in, which _refresh cannot know
        self.ended_grew = False
        self.archived = {dep_id: summary for dep_id, summary in data["archived"]}


_DEPLOYMENT = ("id", "actor", "created_at", "seq", "state", "reason", "updated_at", "ended_at", "next_fire", "round",
               "round_started_at", "wave", "abort_reason", "last_start", "notified", "succeeded", "queued",
               "run_counts")
_NODE_SETS = ("joining", "leaving", "undo", "stopping")
_EXECUTION = ("node", "round", "wave", "seq", "state", "reason", "run", "runs", "retries", "version_before",
              "version", "failure", "queued_at", "started_at", "updated_at", "deadline", "verify_from",
              "verify_boot", "outage_at")
_NOT_EXECUTED = frozenset({_E.REMOVED, _E.CANCELED})


def _executed(ex: Execution) -> bool:
    """Ended in a way the abort criteria count: not removed or canceled, and not timed out before it started (a
    node that never got its turn did not fail the update)."""
    return (ex.state in EXECUTION_TERMINAL and ex.state not in _NOT_EXECUTED
            and not (ex.state == _E.TIMED_OUT and ex.started_at is None))


def _dump(dep: Deployment) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(dep, name) for name in _DEPLOYMENT}
    out.update({name: sorted(getattr(dep, name)) for name in _NODE_SETS})
    out.update(state=str(dep.state), record=dep.record, run_counts=dict(dep.run_counts),
               executions=[{**{name: getattr(ex, name) for name in _EXECUTION}, "state": str(ex.state),
                            "runs": list(ex.runs)} for ex in dep.executions.values()])
    return out

