"""Placement: filter the nodes that can run a step, then score them. Pure and deterministic (ties break by node id).

Filter: online, not draining or removed, healthy enough, the step's executor enabled, its selector matched, free
slots, its resources within what the node announced minus what its running attempts hold, affinity and
anti-affinity, and not a node that just refused it. Score: `spread` prefers the least loaded node, `bin-pack` the
most loaded one that still fits. The queue is served by priority (higher first), then deadline, then arrival.
A ready step that can never run (hub/runnable.py) is not placed but failed, so it neither loops nor waits forever.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

from .events import AttemptAssigned, Event, StepUnrunnable
from .runnable import FleetOffer, cannot_send
from .transitions import Breaker, Health, Liveness

if TYPE_CHECKING:
    from .fleet import Node
    from .runs import Run, StepRun
    from .state import Core

PLACEABLE_HEALTH = frozenset({Health.HEALTHY, Health.DEGRADED})


def eligible(core: Core, node: Node) -> bool:
    """Alive, not draining, removed or throttled, healthy enough, and its breaker not open (half-open: one probe)."""
    if node.state != Liveness.ONLINE or node.draining or node.removed or node.throttled:
        return False
    if node.health not in PLACEABLE_HEALTH or node.breaker == Breaker.OPEN:
        return False
    return node.breaker != Breaker.HALF_OPEN or not node.attempts


def _used(core: Core, node: Node) -> dict[str, float]:
    used = {"cores": 0.0, "memory_mb": 0.0, "disk_gb": 0.0}
    for attempt_id in node.attempts:
        attempt = core.attempts[attempt_id]
        res = core.runs[attempt.run].steps[attempt.step].spec.resources
        used["cores"] += res.cores
        used["memory_mb"] += res.memory_mb
        used["disk_gb"] += res.disk_gb
    return used


class _UsedByNode(dict[str, dict[str, float]]):
    """What each node's running attempts hold, worked out for a node when a step with resources first asks."""

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core

    def __missing__(self, node_id: str) -> dict[str, float]:
        used = self[node_id] = _used(self.core, self.core.nodes[node_id])
        return used


def fits(step: StepRun, node: Node, used: dict[str, float]) -> bool:
    res = step.spec.resources
    for name, need in (("cores", res.cores), ("memory_mb", res.memory_mb), ("disk_gb", res.disk_gb)):
        if need and name in node.resources and used[name] + need > node.resources[name]:
            return False
    return True


def admission(core: Core, run: Run, step: StepRun, now: int) -> Callable[[Node, dict[str, int],
                                                                           dict[str, dict[str, float]]], bool]:
    """Whether a node (with the pass's free slots and used resources) may take `step`: what is the same for every
    node is worked out once, so a scan over thousands of nodes pays only the per-node checks."""
    spec = step.spec
    placement = spec.placement
    selector = placement.selector
    everywhere = not (selector.labels or selector.profile is not None or selector.capabilities or selector.nodes)
    affinity_node = None
    if placement.affinity:
        other = run.steps.get(placement.affinity)
        target = core.nodes.get(other.node) if other is not None and other.node else None
        if target is not None and target.state == Liveness.ONLINE:
            affinity_node = target.id  # a failed affinity target is ignored rather than blocking forever
    avoid = {run.steps[s].node for s in placement.anti_affinity if s in run.steps and run.steps[s].node}
    refused_until = step.avoid
    uses = spec.uses
    res = spec.resources
    sized = bool(res.cores or res.memory_mb or res.disk_gb)

    def admits(node: Node, free: dict[str, int], used: dict[str, dict[str, float]]) -> bool:
        node_id = node.id
        if free[node_id] <= 0 or uses not in node.caps:
            return False
        if refused_until and refused_until.get(node_id, 0) > now:
            return False
        if (affinity_node is not None and node_id != affinity_node) or node_id in avoid:
            return False
        if not everywhere and not selector.matches(node_id, node.labels, node.profile, node.caps):
            return False
        return not sized or fits(step, node, used[node_id])

    return admits


def candidates_for(core: Core, run: Run, step: StepRun, nodes: list[Node], free: dict[str, int],
                   used: dict[str, dict[str, float]], now: int) -> list[Node]:
    admits = admission(core, run, step, now)
    return [node for node in nodes if admits(node, free, used)]


class _SpreadOrder:
    """The pass's nodes in spread order, least loaded first (load over slots, then id): the first node a step admits
    is the one `min` over all its candidates would choose, found without listing them all. An assignment moves
    its node back to its new place."""

    def __init__(self, nodes: list[Node], load: dict[str, int]) -> None:
        self.by_id = {n.id: n for n in nodes}
        self.keys = sorted(self.key(n, load[n.id]) for n in nodes)

    @staticmethod
    def key(node: Node, load: int) -> tuple[float, str]:
        return load / max(1, node.slots), node.id

    def first(self, admits: Callable[[Node], bool]) -> Node | None:
        by_id = self.by_id
        for _, node_id in self.keys:
            node = by_id[node_id]
            if admits(node):
                return node
        return None

    def moved(self, node: Node, load_before: int, load_after: int) -> None:
        self.keys.pop(bisect.bisect_left(self.keys, self.key(node, load_before)))
        bisect.insort(self.keys, self.key(node, load_after))


def place(core: Core, now: int, limit: int = 1000) -> list[Event]:
    if not core.queue:
        return []
    failed: list[Event] = []
    grace = core.policy.unrunnable.grace * 1000  # after a restart too: what the fleet offers is in the journal
    fleet: FleetOffer | None = None  # built on first need: most passes have no step waiting past the grace
    ready = []
    for run_id, step_id in core.queue:
        run = core.runs[run_id]
        step = run.steps[step_id]
        if step.ready_at <= now:
            if now - step.ready_at >= grace:
                fleet = fleet or FleetOffer(core)
                problem = fleet.missing(step)
                if problem is not None:
                    failed.append(StepUnrunnable(now, run_id, step_id, problem))
                    continue
            ready.append((-step.spec.placement.priority - run.workflow.priority, run.deadline, run.seq, step_id,
                          run, step))
    if not ready:  # every queued step waits for its retry time: no need to look at the fleet
        return failed
    nodes = sorted((n for n in core.nodes.values() if eligible(core, n)), key=lambda n: n.id)
    if not nodes:
        return failed
    # a half-open breaker lets exactly one probe attempt through
    free = {n.id: (1 if n.breaker == Breaker.HALF_OPEN else n.slots) - len(n.attempts) for n in nodes}
    used = _UsedByNode(core)
    load = {n.id: len(n.attempts) for n in nodes}
    ready.sort(key=lambda item: item[:4])
    out: list[Event] = failed
    fence = core.fence
    spread: _SpreadOrder | None = None  # built on the first spread step
    open_slots = sum(v for v in free.values() if v > 0)
    for *_, run, step in ready:
        if len(out) >= limit or open_slots <= 0:
            break
        admits = admission(core, run, step, now)
        best: Node | None
        if step.spec.placement.strategy == "bin-pack":
            options = [n for n in nodes if admits(n, free, used)]
            best = min(options, key=lambda n: (-(load[n.id] / max(1, n.slots)), n.id)) if options else None
        else:
            spread = spread or _SpreadOrder(nodes, load)
            best = spread.first(lambda n: admits(n, free, used))
        if best is None:
            continue
        problem = cannot_send(step)  # checked when placing, so a long queue costs nothing per pass
        if problem is not None:
            out.append(StepUnrunnable(now, run.id, step.id, problem))
            continue
        fence += 1
        out.append(AttemptAssigned(now, run.id, step.id, f"a{fence}", fence, best.id))
        open_slots -= 1  # the node admitted the step: it had a free slot
        free[best.id] -= 1
        load[best.id] += 1
        if spread is not None:
            spread.moved(best, load[best.id] - 1, load[best.id])
        res = step.spec.resources
        used[best.id]["cores"] += res.cores
        used[best.id]["memory_mb"] += res.memory_mb
        used[best.id]["disk_gb"] += res.disk_gb
    return out
