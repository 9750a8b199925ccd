"""The hub's log at the moments an operator cares about, one line each: a node suspected, failed, back online or
joined; a step moved from one node to another, and why; a circuit breaker or health change; a run finished.

`apply_logged` applies an event to the core as `Core.apply` does and logs what it changed. Only the live hub calls
it: a journal replayed on start goes through `Core.apply` alone, so a restart does not log history again.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from .events import (AttemptAssigned, BreakerChanged, Event, HealthChanged, NodeBorn, NodeDied, NodeFailed, NodeSeen,
                     NodeSuspected)
from .transitions import AttemptState, Health, Liveness, RunState

if TYPE_CHECKING:
    from .fleet import Command
    from .state import Core

log = logging.getLogger("fleetflow.hub")
_NODE_EVENTS = (NodeBorn, NodeSeen, NodeSuspected, NodeFailed, NodeDied)
NodeEvent = NodeBorn | NodeSeen | NodeSuspected | NodeFailed | NodeDied


def apply_logged(core: Core, event: Event) -> list[Command]:
    node = core.nodes.get(event.node) if isinstance(event, _NODE_EVENTS) else None
    before = (node.state, node.last_seen, len(node.attempts)) if node is not None else None
    ended = len(core.finished) + len(core.archived)  # grows by one for each run that ends
    commands = core.apply(event)
    if isinstance(event, _NODE_EVENTS):
        _node_changed(core, event, before)
    elif isinstance(event, AttemptAssigned):
        _assigned(core, event)
    elif isinstance(event, BreakerChanged):
        log.warning("node %s: circuit breaker %s: %s", event.node, event.state.replace("_", "-"), event.reason)
    elif isinstance(event, HealthChanged):
        log.log(logging.INFO if event.health == Health.HEALTHY else logging.WARNING, "node %s is %s: %s", event.node,
                event.health, event.reason)
    ended = len(core.finished) + len(core.archived) - ended
    if ended > 0:
        for run_id in itertools.islice(reversed(core.finished), ended):
            _run_finished(core, run_id)
    return commands


def _node_changed(core: Core, event: NodeEvent, before: tuple[str, int, int] | None) -> None:
    node = core.nodes.get(event.node)
    if node is None:
        return
    was = before[0] if before is not None else None
    if was == node.state:
        return
    lost = f"; {before[2]} attempt(s) lost" if before is not None and before[2] else ""
    if isinstance(event, NodeBorn):
        if was is None:
            log.info("node %s joined: profile %s, %d slot(s), boot %d", node.id, node.profile or "-", node.slots,
                     event.boot)
        else:
            log.info("node %s recovered: online again (it was %s; birth, boot %d)", node.id, was, event.boot)
    elif isinstance(event, NodeSeen):
        log.info("node %s recovered: heard from again, online (it was %s)", node.id, was)
    elif isinstance(event, NodeSuspected):
        silent = (event.at - before[1]) / 1000 if before is not None else 0.0
        log.warning("node %s suspected: nothing heard for %.1f s (heartbeat every %g s)", node.id, silent, node.hb)
    elif isinstance(event, NodeFailed):
        log.warning("node %s failed: %s%s", node.id, event.reason, lost)
    elif isinstance(event, NodeDied):
        if node.state == Liveness.OFFLINE:
            log.info("node %s offline: it shut down%s", node.id, lost)
        else:
            log.warning("node %s failed: its death certificate says %s%s", node.id, event.reason, lost)


def _assigned(core: Core, event: AttemptAssigned) -> None:
    """A step placed again after its attempt was lost has moved: say from where, to where, and why."""
    step = core.runs[event.run].steps[event.step]
    previous = core.attempts.get(step.attempts[-2]) if len(step.attempts) > 1 else None
    if previous is not None and previous.state == AttemptState.LOST:
        log.info("step %s of run %s migrated from %s to %s (attempt %s): %s", event.step, event.run, previous.node,
                 event.node, event.attempt, previous.reason)


def _run_finished(core: Core, run_id: str) -> None:
    run = core.runs.get(run_id)
    if run is None or run.finished_at is None:
        return
    took = (run.finished_at - run.submitted_at) / 1000
    error = f": {run.error[:300]}" if run.error else ""
    log.log(logging.INFO if run.state == RunState.SUCCEEDED else logging.WARNING, "run %s (%s %s) %s in %.1f s%s",
            run.id, run.workflow.name, run.workflow.version, run.state, took, error)
