"""Why a queued step is not placed yet, in words an operator can act on.

The verdict is the scheduler's own: a step with a candidate in `scheduler.candidates_for` (over the nodes
`scheduler.eligible` admits) is about to be placed. Otherwise the same filters are asked one at a time, in the
order a person narrows a fleet down (online, selector, executor, size, affinity, then what holds right now:
draining, health, breaker, a recent refusal, slots, resources in use), and the first that leaves no node names the
reason. Pure and deterministic like the scheduler: the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import yaml

from .runnable import FleetOffer
from .scheduler import PLACEABLE_HEALTH, _used, candidates_for, eligible, fits
from .transitions import Breaker, Liveness, StepState

if TYPE_CHECKING:
    from .fleet import Node
    from .runs import Run, StepRun
    from .state import Core
    from .workflow import Resources, Selector

MAX_EXPLAINED = 100   # queued steps explained per run and request: the API answers on the hub's event loop
MAX_NAMED = 5         # nodes named in one reason; the rest are counted
_NO_USE = {"cores": 0.0, "memory_mb": 0.0, "disk_gb": 0.0}


class _Fleet:
    """What every step of one request is checked against, built once: the nodes, and the scheduler's view of the
    ones it may place on (free slots and resources held, as `scheduler.place` computes them)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.nodes = sorted((n for n in core.nodes.values() if not n.removed), key=lambda n: n.id)
        self.eligible = [n for n in self.nodes if eligible(core, n)]
        # as in scheduler.place: a half-open breaker lets exactly one probe attempt through
        self.free = {n.id: (1 if n.breaker == Breaker.HALF_OPEN else n.slots) - len(n.attempts) for n in self.eligible}
        self.used = {n.id: _used(core, n) for n in self.eligible}
        self._offer: FleetOffer | None = None

    def offer(self) -> FleetOffer:
        self._offer = self._offer or FleetOffer(self.core)
        return self._offer


def waiting_reasons(core: Core, run: Run, now: int) -> dict[str, str]:
    """Why each queued step of `run` waits, by step id (at most MAX_EXPLAINED steps; the others say so)."""
    fleet = _Fleet(core)
    out: dict[str, str] = {}
    for step in run.steps.values():
        if step.state != StepState.QUEUED:
            continue
        if len(out) >= MAX_EXPLAINED:
            out[step.id] = f"queued (only the first {MAX_EXPLAINED} queued steps of a run are explained)"
        else:
            out[step.id] = _why(fleet, run, step, now)
    return out


def why_waiting(core: Core, run: Run, step: StepRun, now: int) -> str | None:
    """Why this step is not placed yet; None unless it is queued."""
    return _why(_Fleet(core), run, step, now) if step.state == StepState.QUEUED else None


def _why(fleet: _Fleet, run: Run, step: StepRun, now: int) -> str:
    core = fleet.core
    if step.ready_at > now:
        return _backoff(core, step, now)
    if fleet.eligible and candidates_for(core, run, step, fleet.eligible, fleet.free, fleet.used, now):
        return "about to be placed: a node can take it"
    return _blocked(fleet, run, step, now) + _deadline(fleet, step, now)


def _backoff(core: Core, step: StepRun, now: int) -> str:
    last = core.attempts.get(step.attempts[-1]) if step.attempts else None
    after = f" (attempt {last.id} on {last.node} {last.state}{f': {last.reason}' if last.reason else ''})" if last else ""
    return f"backing off: ready in {_seconds(step.ready_at - now)}{after}"


def _deadline(fleet: _Fleet, step: StepRun, now: int) -> str:
    """The unrunnable rule (hub/runnable.py): a step no node of the fleet could ever take fails after the grace."""
    if fleet.offer().missing(step) is None:
        return ""
    fails_at = step.ready_at + int(fleet.core.policy.unrunnable.grace * 1000)
    if fails_at > now:
        return f"; it fails in {_seconds(fails_at - now)} unless a node that can take it joins"
    return "; it fails at the next placement pass"


def _blocked(fleet: _Fleet, run: Run, step: StepRun, now: int) -> str:
    if not fleet.nodes:
        return "no node has joined the fleet"
    spec = step.spec
    selector, uses = spec.placement.selector, spec.uses
    online = [n for n in fleet.nodes if n.state == Liveness.ONLINE]
    if not online:
        return f"no node is online ({_name_all(fleet.nodes, lambda n: n.state)})"

    def offline_that(test: Callable[[Node], bool]) -> str:
        """Nodes that would pass but are not online: the step runs when one comes back."""
        others = [n for n in fleet.nodes if n.state != Liveness.ONLINE and test(n)]
        return f" ({_name_all(others, lambda n: f'matches but is {n.state}')})" if others else ""

    def matched(n: Node) -> bool:
        return selector.matches(n.id, n.labels, n.profile, n.caps)

    wanted = f"selector {_flow(selector)}" if _flow(selector) != "{}" else ""
    left = [n for n in online if matched(n)]
    if not left:
        return f"no online node matches {wanted}{offline_that(matched)}"

    def offers(n: Node) -> bool:
        return matched(n) and uses in n.caps

    matching = f" matching {wanted}" if wanted else ""
    left = [n for n in left if uses in n.caps]
    if not left:
        return f"no online node{matching} offers executor {uses!r}{offline_that(offers)}"

    def holds(n: Node) -> bool:
        return offers(n) and fits(step, n, dict(_NO_USE))

    left_sized = [n for n in left if fits(step, n, dict(_NO_USE))]
    if not left_sized:
        sizes = _name_all(left, lambda n: _resources(n.resources) or "no resources announced")
        return (f"no online node{matching} offering {uses!r} has {_needs(spec.resources)} ({sizes})"
                f"{offline_that(holds)}")
    left = left_sized

    placement = spec.placement
    if placement.affinity:
        other = run.steps.get(placement.affinity)
        target = fleet.core.nodes.get(other.node) if other is not None and other.node else None
        # as the scheduler: an affinity to a lost node is dropped
        if target is not None and target.state == Liveness.ONLINE:
            if all(n.id != target.id for n in left):
                return (f"affinity: it must run on {target.id}, where step {placement.affinity} ran, and {target.id} "
                        f"does not match what it needs (selector, executor {uses!r}, resources)")
            left = [n for n in left if n.id == target.id]
    avoid = {run.steps[s].node: s for s in placement.anti_affinity if s in run.steps and run.steps[s].node}
    if avoid:
        kept = [n for n in left if n.id not in avoid]
        if not kept:
            return "anti_affinity: every node that could take it ran " + ", ".join(
                f"step {avoid[n.id]} ({n.id})" for n in left)
        left = kept
    return "no node that could take it can now: " + _name_all(left, lambda n: _busy(fleet, step, n, now))


def _busy(fleet: _Fleet, step: StepRun, node: Node, now: int) -> str:
    """Why a node fit for the step cannot take it right now: the scheduler's dynamic filters, in its order."""
    if node.draining:
        return "draining"
    if node.throttled:
        return "throttled (its health)"
    if node.health not in PLACEABLE_HEALTH:
        return node.health
    if node.breaker == Breaker.OPEN:
        return "circuit breaker open"
    if node.breaker == Breaker.HALF_OPEN and node.attempts:
        return "circuit breaker half-open, its probe step still running"
    if node not in fleet.eligible:
        return "not eligible for placement"  # a filter added to scheduler.eligible and not described here yet
    until = step.avoid.get(node.id, 0)
    if until > now:
        mine = [fleet.core.attempts[a] for a in step.attempts if a in fleet.core.attempts]
        last = next((a for a in reversed(mine) if a.node == node.id), None)
        what = f"its attempt {last.id} was {last.state}" + (f" ({last.reason})" if last.reason else "") if last else ""
        return f"avoided for {_seconds(until - now)}" + (f": {what}" if what else "")
    if fleet.free[node.id] <= 0:
        slots = 1 if node.breaker == Breaker.HALF_OPEN else node.slots
        return f"busy ({len(node.attempts)} of {slots} slot{'s' if slots != 1 else ''} in use)"
    if not fits(step, node, fleet.used[node.id]):
        used = fleet.used[node.id]
        free = {k: v - used.get(k, 0.0) for k, v in node.resources.items()}
        return f"not enough free resources (needs {_needs(step.spec.resources)}; free {_resources(free)})"
    return "can take it at the next placement pass"


# -- words -----------------------------------------------------------------------------------------------------

def _flow(selector: Selector) -> str:
    """A selector as its workflow file spells it: {capabilities: [gpu]}."""
    return str(yaml.safe_dump(selector.model_dump(exclude_defaults=True), default_flow_style=True,
                              width=1 << 16)).strip()


def _needs(resources: Resources) -> str:
    return _resources(resources.model_dump()) or "no resources"


def _resources(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(values.items()) if amount)


def _name_all(nodes: Iterable[Node], describe: Callable[[Node], str]) -> str:
    listed = list(nodes)
    named = "; ".join(f"{n.id} {describe(n)}" for n in listed[:MAX_NAMED])
    return named + (f"; and {len(listed) - MAX_NAMED} more" if len(listed) > MAX_NAMED else "")


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.1f} s"
