"""The fleet half of the hub's pure core: nodes (liveness, health, circuit breakers, conflict marks, adaptation
history), the commands the hub sends them, and the decisions about them (missed heartbeats, breakers).

No I/O and no clock reads: time comes from events and from the `now` the caller passes. What touches both nodes
and runs (a node going down loses its attempts, a migration moves them, a birth lists stale ones, a result counts
toward its node's breaker) is composed in hub/state.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols import AttemptRef

from .events import (ActionTaken, BreakerChanged, Event, HealthChanged, HubLoadChanged, NodeBorn, NodeConflict,
                     NodeDrainSet, NodeFailed, NodeSeen, NodeSuspected, ResultReported)
from .health import Policy
from .transitions import BREAKER, LIVENESS, REACHABLE, Breaker, BreakerTrigger, Health, Liveness, NodeTrigger

SUSPECT_AFTER_HEARTBEATS = 2
FAIL_AFTER_HEARTBEATS = 3
CONFLICT_QUIET_MS = 600_000  # a birth this long after the last evidence of a second device clears the node's mark
HISTORY = 50                 # health changes and actions kept per node for `nodes show`


# -- commands: what the shell sends once the events behind them are durable (dropped on replay) ----------------------

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
    refs: tuple[AttemptRef, ...]
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


# -- state ---------------------------------------------------------------------------------------------------------

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
    state: Liveness = Liveness.ONLINE
    last_seen: int = 0                 # not journaled: heartbeats are not events; reset to the load time on start
    attempts: set[str] = field(default_factory=set)
    draining: bool = False
    removed: bool = False
    changed_at: int = 0
    health: Health = Health.HEALTHY
    tel: float = 10.0
    throttled: bool = False
    breaker: Breaker = Breaker.CLOSED
    breaker_at: int = 0
    failures: list[int] = field(default_factory=list)     # times of recent step failures (breaker window)
    probe_successes: int = 0                               # successes while half-open
    probe_failed: bool = False
    migrations: list[int] = field(default_factory=list)   # times of recent migrations off this node
    history: list[dict[str, Any]] = field(default_factory=list)
    conflict: dict[str, Any] | None = None                 # two devices use this identity (hub/clones.py)
    versions: dict[str, str] = field(default_factory=dict)  # component -> version its deployments left (inventory)

    def remember(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[:-HISTORY]


class Fleet:
    """The nodes and what happens to them; `on_<event>` applies the journaled event of that name."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.nodes: dict[str, Node] = {}
        self.breaker_watch: set[str] = set()  # nodes with recent failures or a breaker not closed
        self.overloaded = False

    def touch(self, node_id: str, now: int) -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = max(node.last_seen, now)
        return node.state == Liveness.SUSPECTED

    # -- liveness ------------------------------------------------------------------------------------------------

    def on_node_born(self, ev: NodeBorn) -> Node:
        node = self.nodes.get(ev.node)
        if node is None:
            node = self.nodes[ev.node] = Node(ev.node)
        elif node.state != Liveness.ONLINE:
            LIVENESS.move(node, NodeTrigger.BORN)
            node.remember({"at": ev.at, "kind": "liveness", "state": node.state.value,
                           "reason": f"birth, boot {ev.boot}"})
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
        return node

    def on_node_conflict(self, ev: NodeConflict) -> list[Command]:
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

    def on_node_seen(self, ev: NodeSeen) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None and node.state == Liveness.SUSPECTED:
            LIVENESS.move(node, NodeTrigger.HEARD)
            node.changed_at = ev.at
        return []

    def on_node_suspected(self, ev: NodeSuspected) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None and node.state == Liveness.ONLINE:
            LIVENESS.move(node, NodeTrigger.SILENT)
            node.changed_at = ev.at
        return []

    def take_down(self, node: Node, trigger: NodeTrigger, reason: str, at: int) -> None:
        """The node is gone (failed, offline, removed); its attempts are the caller's to lose."""
        LIVENESS.move(node, trigger)
        node.changed_at = at
        node.remember({"at": at, "kind": "liveness", "state": node.state.value, "reason": reason})

    def forget(self, node_id: str) -> None:
        """Attempts keep the node's id as history; nothing looks the node up by it any more."""
        del self.nodes[node_id]
        self.breaker_watch.discard(node_id)

    def on_node_drain_set(self, ev: NodeDrainSet) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.draining = ev.on
        return []

    def liveness_decisions(self, now: int) -> list[Event]:
        out: list[Event] = []
        for node in self.nodes.values():
            silent = now - node.last_seen
            period = node.hb * 1000
            if node.state == Liveness.ONLINE and silent > SUSPECT_AFTER_HEARTBEATS * period:
                out.append(NodeSuspected(now, node.id))
            elif node.state == Liveness.SUSPECTED and silent > FAIL_AFTER_HEARTBEATS * period:
                out.append(NodeFailed(now, node.id, f"no heartbeat for {silent / 1000:.1f} s"))
        return out

    # -- adaptation ----------------------------------------------------------------------------------------------

    def on_health_changed(self, ev: HealthChanged) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.health = Health(ev.health)
            node.remember({"at": ev.at, "kind": "health", "health": ev.health, "metric": ev.metric,
                           "value": ev.value, "threshold": ev.threshold, "duration": ev.duration, "reason": ev.reason})
        return []

    def on_action_taken(self, ev: ActionTaken) -> list[Command]:
        """Every action but `migrate`, which moves attempts (hub/state.py does it after this records the action)."""
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
            BREAKER.move(node, BreakerTrigger.FORCED_OPEN)
            node.breaker_at = ev.at
            self.breaker_watch.add(node.id)  # so its cooldown is watched: nothing else would half-open it
        return []

    def on_result_reported(self, ev: ResultReported) -> None:
        """An accepted result (the caller checked it is the current attempt) counts toward its node's breaker."""
        node = self.nodes.get(ev.node)
        if node is None:
            return
        if ev.ok:
            node.probe_successes += node.breaker == Breaker.HALF_OPEN
        else:
            window = int(self.policy.breaker.window * 1000)
            node.failures = [t for t in node.failures if t > ev.at - window] + [ev.at]
            self.breaker_watch.add(node.id)
            node.probe_failed = node.probe_failed or node.breaker == Breaker.HALF_OPEN

    def on_breaker_changed(self, ev: BreakerChanged) -> list[Command]:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.breaker = Breaker(ev.state)  # a decision applies as recorded (hub/transitions.py)
            node.breaker_at = ev.at
            node.probe_successes, node.probe_failed = 0, False
            if node.breaker == Breaker.CLOSED:
                node.failures = []
                self.breaker_watch.discard(node.id)
            else:
                self.breaker_watch.add(node.id)
            node.remember({"at": ev.at, "kind": "breaker", "state": ev.state, "reason": ev.reason})
        return []

    def breaker_decisions(self, now: int) -> list[Event]:
        """Each watched breaker's next state, by BREAKER's table, from its node's failures, cooldown and probes."""
        policy = self.policy.breaker
        out: list[Event] = []
        for node in (self.nodes[n] for n in sorted(self.breaker_watch)):
            recent = [t for t in node.failures if t > now - policy.window * 1000]
            due = [(BreakerTrigger.TRIPPED, len(recent) >= policy.failures,
                    f"{len(recent)} step failures in {policy.window:g} s"),
                   (BreakerTrigger.COOLED, now - node.breaker_at >= policy.cooldown * 1000,
                    f"open for {policy.cooldown:g} s: one probe"),
                   (BreakerTrigger.PROBE_FAILED, node.probe_failed, "the probe step failed"),
                   (BreakerTrigger.PROBES_PASSED, node.probe_successes >= policy.successes,
                    f"{node.probe_successes} probe(s) succeeded")]
            for trigger, fired, reason in due:
                target = BREAKER.target(node.breaker, trigger)
                if target is not None and fired:
                    out.append(BreakerChanged(now, node.id, target.value, reason))
                    break
        return out

    def on_hub_load_changed(self, ev: HubLoadChanged) -> list[Command]:
        self.overloaded = ev.overloaded
        factor = self.policy.self_protection.telemetry_factor if ev.overloaded else 1.0
        return [SendConfig(n.id, n.tel * factor) for n in sorted(self.nodes.values(), key=lambda n: n.id)
                if n.state in REACHABLE]
