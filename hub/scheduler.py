"""Placement: filter the nodes that can run a step, then score them. Pure and deterministic (ties break by node id).

Filter: online, not draining or removed, healthy enough, the step's executor enabled, its selector matched, free
slots, its resources within what the node announced minus what its running attempts hold, affinity and
anti-affinity, and not a node that just refused it. Score: `spread` prefers the least loaded node, `bin-pack` the
most loaded one that still fits. The queue is served by priority (higher first), then deadline, then arrival.
A ready step that can never run (hub/runnable.py) is not placed but failed, so it neither loops nor waits forever.
"""

from __future__ import annotations

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


def fits(step: StepRun, node: Node, used: dict[str, float]) -> bool:
    res = step.spec.resources
    for name, need in (("cores", res.cores), ("memory_mb", res.memory_mb), ("disk_gb", res.disk_gb)):
        if need and name in node.resources and used[name] + need > node.resources[name]:
            return False
    return True


def candidates_for(core: Core, run: Run, step: StepRun, nodes: list[Node], free: dict[str, int],
                   used: dict[str, dict[str, float]], now: int) -> list[Node]:
    spec = step.spec
    placement = spec.placement
    selector = placement.selector
    affinity_node = None
    if placement.affinity:
        other = run.steps.get(placement.affinity)
        target = core.nodes.get(other.node) if other is not None and other.node else None
        if target is not None and target.state == Liveness.ONLINE:
            affinity_node = target.id  # a failed affinity target is ignored rather than blocking forever
    avoid = {run.steps[s].node for s in placement.anti_affinity if s in run.steps and run.steps[s].node}
    out = []
    for node in nodes:
        if free[node.id] <= 0 or spec.uses not in node.caps:
            continue
        if step.avoid.get(node.id, 0) > now:
            continue
        if affinity_node is not None and node.id != affinity_node:
            continue
        if node.id in avoid:
            continue
        if not selector.matches(node.id, node.labels, node.profile, node.caps):
            continue
        if not fits(step, node, used[node.id]):
            continue
        out.append(node)
    return out


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
    nodes = sorted((n for n in core.nodes.values() if eligible(core, n)), key=lambda n: n.id)
    if not nodes:
        return failed
    # a half-open breaker lets exactly one probe attempt through
    free = {n.id: (1 if n.breaker == Breaker.HALF_OPEN else n.slots) - len(n.attempts) for n in nodes}
    used = {n.id: _used(core, n) for n in nodes}
    load = {n.id: len(n.attempts) for n in nodes}
    ready.sort(key=lambda item: item[:4])
    out: list[Event] = failed
    fence = core.fence
    for *_, run, step in ready:
        if len(out) >= limit or not any(v > 0 for v in free.values()):
            break
        options = candidates_for(core, run, step, nodes, free, used, now)
        if not options:
            continue
        problem = cannot_send(step)  # checked when placing, so a long queue costs nothing per pass
        if problem is not None:
            out.append(StepUnrunnable(now, run.id, step.id, problem))
            continue
        if step.spec.placement.strategy == "bin-pack":
            best = min(options, key=lambda n: (-(load[n.id] / max(1, n.slots)), n.id))
        else:
            best = min(options, key=lambda n: (load[n.id] / max(1, n.slots), n.id))
        fence += 1
        out.append(AttemptAssigned(now, run.id, step.id, f"a{fence}", fence, best.id))
        free[best.id] -= 1
        load[best.id] += 1
        res = step.spec.resources
        used[best.id]["cores"] += res.cores
        used[best.id]["memory_mb"] += res.memory_mb
        used[best.id]["disk_gb"] += res.disk_gb
    return out
