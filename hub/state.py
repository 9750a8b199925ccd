"""The hub's pure core: `Core.apply(event) -> commands` folds journaled events into state; `Core.decide(now)`
returns the decisions (placements, timeouts, liveness changes) the shell journals and applies next.

No I/O and no clock reads: time comes from events and from the `now` passed to `decide`. The core is three halves
(thirds, strictly): runs (hub/runs.py: runs, steps, attempts, the placement queue), the fleet (hub/fleet.py: nodes,
liveness, health, breakers), whose states move only through the tables of hub/transitions.py, and deployments
(hub/deployments/: rollouts of a versioned workflow node by node, which start and read runs and keep each node's
versions, with their own tables in hub/deployments/machine.py). This module composes them and
holds the rules that touch both: a node going down loses its attempts, a migration moves them, a birth names stale
ones, a result counts toward its node's breaker. Commands (assign, cancel) are what the shell must send after the
event is durable; on replay they are dropped. `to_snapshot`/`from_snapshot` convert the state to and from plain data
(hub/snapshot.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from .deployments.core import Deployments
from .events import (ActionTaken, AttemptAssigned, AttemptLost, BreakerChanged, DeploymentChanged,
                     DeploymentControlled, DeploymentCreated, Event, ExecutionChanged, HealthChanged, HubLoadChanged,
                     NodeBorn, NodeConflict, NodeDied, NodeDrainSet, NodeFailed, NodeRemoved, NodeSeen, NodeSuspected,
                     ReplayMarks, ResultReported, RunCancelRequested, RunSubmitted, RunTimedOut, StepReported,
                     StepUnrunnable)
from .fleet import CONFLICT_QUIET_MS, Command, Fleet, Node, SendAssign, SendCancel, SendConfig, SendDrain
from .health import Policy
from .runnable import unanswered
from .runs import STALE, Attempt, Counters, Run, Runs, StepRun, compile_workflow
from .transitions import (ATTEMPT_LIVE, RUN_TERMINAL, STEP_TERMINAL, AttemptState, IllegalTransition, Liveness,
                          NodeTrigger)

__all__ = ["ATTEMPT_LIVE", "CONFLICT_QUIET_MS", "RUN_TERMINAL", "STEP_TERMINAL", "Attempt", "Command", "Core",
           "IllegalTransition", "Node", "Run", "SendAssign", "SendCancel", "SendConfig", "SendDrain", "StepRun",
           "compile_workflow"]

UNANSWERED_MS = 10_000        # an assignment nobody accepted within this is lost (counted apart: hub/runnable.py)
TIMEOUT_GRACE_MS = 5_000      # the agent enforces step timeouts; the hub steps in only after this grace

T = TypeVar("T")


class _Held(Generic[T]):
    """An attribute of the core that one of its halves holds, read and written through."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, core: None, owner: type) -> _Held[T]: ...

    @overload
    def __get__(self, core: Core, owner: type) -> T: ...

    def __get__(self, core: Core | None, owner: type) -> T | _Held[T]:
        return self if core is None else getattr(getattr(core, self.part), self.name)

    def __set__(self, core: Core, value: T) -> None:
        setattr(getattr(core, self.part), self.name, value)


class Core:
    """The halves, `work` (hub/runs.py), `fleet` (hub/fleet.py) and `deploys` (hub/deployments/), and what belongs
    to the fold itself (`seq`, `windows`, `loaded_at`). The attributes below live in a half and are read and written
    through here, so the shell, the scheduler and the API keep asking one object."""

    runs: _Held[dict[str, Run]] = _Held("work")
    attempts: _Held[dict[str, Attempt]] = _Held("work")
    live: _Held[set[str]] = _Held("work")
    active: _Held[set[str]] = _Held("work")
    keys: _Held[dict[str, str]] = _Held("work")
    finished: _Held[dict[str, None]] = _Held("work")
    archived: _Held[dict[str, tuple[Any, ...]]] = _Held("work")
    queue: _Held[dict[tuple[str, str], None]] = _Held("work")
    fence: _Held[int] = _Held("work")
    done_seq: _Held[int] = _Held("work")
    counters: _Held[Counters] = _Held("work")
    nodes: _Held[dict[str, Node]] = _Held("fleet")
    breaker_watch: _Held[set[str]] = _Held("fleet")
    overloaded: _Held[bool] = _Held("fleet")
    policy: _Held[Policy] = _Held("fleet")

    def __init__(self, policy: Policy | None = None) -> None:
        self.fleet = Fleet(policy or Policy())
        self.work = Runs(self.fleet.nodes)
        self.deploys = Deployments(self.fleet.nodes, self.work)  # the third half (hub/deployments/)
        self.seq = 0                                   # events applied
        self.windows: dict[str, dict[str, Any]] = {}   # the replay windows journaled last (ReplayMarks)
        self.loaded_at = 0                             # not journaled: when the hub could last hear nodes again
        work, fleet, deploys = self.work, self.fleet, self.deploys
        self._handlers: dict[type[Event], Callable[[Any], list[Command]]] = {
            RunSubmitted: self._on_run_submitted,
            RunCancelRequested: work.on_run_cancel_requested,
            RunTimedOut: work.on_run_timed_out,
            StepReported: work.on_step_reported,
            ResultReported: self._on_result_reported,
            AttemptAssigned: work.on_attempt_assigned,
            AttemptLost: work.on_attempt_lost,
            StepUnrunnable: work.on_step_unrunnable,
            NodeBorn: self._on_node_born,
            NodeSeen: fleet.on_node_seen,
            NodeSuspected: self._on_node_suspected,
            NodeFailed: self._on_node_failed,
            NodeDied: self._on_node_died,
            NodeRemoved: self._on_node_removed,
            NodeDrainSet: fleet.on_node_drain_set,
            NodeConflict: fleet.on_node_conflict,
            ReplayMarks: self._on_replay_marks,
            HealthChanged: fleet.on_health_changed,
            ActionTaken: self._on_action_taken,
            BreakerChanged: fleet.on_breaker_changed,
            HubLoadChanged: fleet.on_hub_load_changed,
            DeploymentCreated: deploys.on_deployment_created,
            DeploymentControlled: deploys.on_deployment_controlled,
            DeploymentChanged: deploys.on_deployment_changed,
            ExecutionChanged: deploys.on_execution_changed,
        }

    # -- the fold ------------------------------------------------------------------------------------------------

    def apply(self, event: Event) -> list[Command]:
        self.seq += 1
        return self._handlers[type(event)](event)

    def fold(self, events: list[Event]) -> Core:
        for event in events:
            self.apply(event)
        return self

    def touch(self, node_id: str, now: int) -> bool:
        """A message from a node arrived (heartbeats are not journaled). True if a NodeSeen should be journaled."""
        return self.fleet.touch(node_id, now)

    def after_load(self, now: int) -> None:
        """After a restart, or after a spell when the hub could not keep up (liveness was suspended), nobody has
        been heard from for certain: give every node a fresh heartbeat window."""
        for node in self.nodes.values():
            node.last_seen = max(node.last_seen, now)
        self.loaded_at = now

    def current(self, attempt_id: str, node: str, fence: int) -> Attempt | None:
        """The attempt if it is the live, current attempt of its step on that node with that fence."""
        return self.work.current(attempt_id, node, fence)

    def live_attempts(self) -> list[Attempt]:
        return [self.attempts[a] for a in sorted(self.live)]

    def to_snapshot(self) -> dict[str, Any]:
        """The state as plain data (dicts, lists, str, int, float, bool, None), versioned: hub/snapshot.py."""
        from .snapshot import dump

        return dump(self)

    @classmethod
    def from_snapshot(cls, data: Any, policy: Policy | None = None) -> Core:
        """The core a snapshot describes; `SnapshotError` if it is of another version or malformed."""
        from .snapshot import load

        return load(cls(policy), data)

    # -- where runs and the fleet meet ---------------------------------------------------------------------------

    def _on_run_submitted(self, ev: RunSubmitted) -> list[Command]:
        return self.work.on_run_submitted(ev, self.seq)

    def _on_result_reported(self, ev: ResultReported) -> list[Command]:
        if self.current(ev.attempt, ev.node, ev.fence) is not None:
            self.fleet.on_result_reported(ev)  # only a result the hub accepts counts toward the node's breaker
        return self.work.on_result_reported(ev)

    def _on_node_born(self, ev: NodeBorn) -> list[Command]:
        self.fleet.on_node_born(ev)
        self.deploys.node_changed(ev.node)  # its labels may now match (or no longer match) a deployment's target
        stale = tuple(ref for ref in ev.running if self.current(ref.attempt, ev.node, ref.fence) is None)
        return [SendCancel(ev.node, stale, STALE)] if stale else []

    def _on_node_suspected(self, ev: NodeSuspected) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None and node.state == Liveness.ONLINE:
            self.deploys.node_left_online(ev.node, ev.at)
        return self.fleet.on_node_suspected(ev)

    def _on_node_failed(self, ev: NodeFailed) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None or node.state == Liveness.FAILED:
            return []
        return self._take_down(node, NodeTrigger.FAILED, ev.reason, ev.at)

    def _on_node_died(self, ev: NodeDied) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None or ev.boot != node.boot or node.state in (Liveness.FAILED, Liveness.OFFLINE):
            return []  # a will left from an older session never kills a newer one
        trigger = NodeTrigger.SHUT_DOWN if ev.reason == "shutdown" else NodeTrigger.FAILED
        return self._take_down(node, trigger, f"death certificate ({ev.reason})", ev.at)

    def _on_node_removed(self, ev: NodeRemoved) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is None:
            return []
        node.removed = True
        commands = (self._take_down(node, NodeTrigger.REMOVED, ev.reason or "removed", ev.at)
                    if node.state != Liveness.FAILED else [])
        if ev.forget:
            self.fleet.forget(ev.node)
        self.deploys.node_changed(ev.node)
        return commands

    def _take_down(self, node: Node, trigger: NodeTrigger, reason: str, at: int) -> list[Command]:
        """The node is gone: its attempts are lost. Migratable ones, and ones that never started, go elsewhere at
        once; the others count as a failed attempt under their retry policy."""
        self.fleet.take_down(node, trigger, reason, at)
        self.deploys.node_left_online(node.id, at)  # a verify window it is in saw an outage
        commands: list[Command] = []
        for attempt_id in sorted(node.attempts, key=lambda a: self.attempts[a].fence):
            attempt = self.attempts[attempt_id]
            step = self.runs[attempt.run].steps[attempt.step]
            counts = not (step.spec.migratable or attempt.state in (AttemptState.ASSIGNED, AttemptState.ACCEPTED))
            lost = AttemptLost(at, attempt_id, f"node {node.id} {node.state}: {reason}", counts)
            commands += self.work.on_attempt_lost(lost)
        return commands

    def _on_action_taken(self, ev: ActionTaken) -> list[Command]:
        commands = self.fleet.on_action_taken(ev)
        node = self.nodes.get(ev.node)
        return self._migrate(node, ev) if ev.action == "migrate" and node is not None else commands

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
            if (len(node.migrations) >= limits.max_migrations_per_node
                    or run.migrations >= limits.max_migrations_per_run):
                node.remember({"at": ev.at, "kind": "action", "action": "migrate-skipped",
                               "reason": f"limit reached for {attempt_id} (node or run migration limit)"})
                continue
            node.migrations.append(ev.at)
            run.migrations += 1
            step.avoid[node.id] = ev.at + int(self.policy.cooldown * 1000)
            commands += self.work.on_attempt_lost(AttemptLost(ev.at, attempt_id, f"migrated off {node.id}: {ev.reason}",
                                                              False))
        return commands

    def _on_replay_marks(self, ev: ReplayMarks) -> list[Command]:
        self.windows = dict(ev.windows)
        return []

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide(self, now: int, placement_limit: int = 1000, timers: bool = True, liveness: bool = True) -> list[Event]:
        """Everything due at `now`: liveness changes, lost attempts, run deadlines, breakers, deployments (fire
        times, executions' outcomes and deadlines, aborts, waves, starts), then placements.

        Timers scan every node and live attempt; a caller deciding after every small batch may pass `timers=False`
        for most calls (the hub scans at most every 100 ms: timer precision, not correctness). Deployments are also
        asked between scans when they say they are due (`deploys.wake_at`: a rate's next start)."""
        from .scheduler import place

        out: list[Event] = []
        if timers:
            out.extend(self._timers(now, liveness))
        if timers or now >= self.deploys.wake_at:
            out.extend(self.deploys.decide(now, full=timers, liveness=liveness, heard_since=self.loaded_at))
        if not out:
            out.extend(place(self, now, placement_limit))
        return out

    def _timers(self, now: int, liveness: bool = True) -> list[Event]:
        """`liveness=False` while the hub itself is behind (its intake is full or lags): silence may then be ours, so
        no node is suspected or failed, no assignment counts as unanswered and no step times out until it catches
        up."""
        out: list[Event] = self.fleet.liveness_decisions(now) if liveness else []
        for attempt in self.live_attempts() if liveness else []:
            # Measured from when the hub could hear again (a restart, a spell behind): answers and results sent
            # meanwhile still arrive from the nodes' outboxes. An attempt accepted but never started counts from its
            # assignment, so it cannot sit until the run deadline.
            since = attempt.assigned_at if attempt.started_at is None else attempt.started_at
            waited = now - max(since, self.loaded_at)
            if attempt.state == AttemptState.ASSIGNED:
                if waited > UNANSWERED_MS:
                    out.extend(unanswered(self, attempt, now))
                continue
            timeout = self.runs[attempt.run].steps[attempt.step].spec.timeout
            if waited > timeout * 1000 + TIMEOUT_GRACE_MS:  # the agent enforces the timeout; this is its silence
                out.append(AttemptLost(now, attempt.id, f"timed out after {timeout:g} s (no result)"))
        for run in (self.runs[r] for r in sorted(self.active)):
            if now >= run.deadline:
                out.append(RunTimedOut(now, run.id))
        out.extend(self.fleet.breaker_decisions(now))
        return out
