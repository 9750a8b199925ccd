"""What the dashboard shows, as plain data read from the hub's core: fleet rows, a node's page, a run's graph.

The same shapes go out on the live stream (hub/ui/feed.py) and in the snapshots the pages load first, so a page
applies an update by replacing one row. Reads only: nothing here changes the core or reads a clock (the caller
passes `now`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..transitions import STEP_TERMINAL, Health, Liveness

if TYPE_CHECKING:
    from ..fleet import Node
    from ..protocol import NodeView
    from ..service import Hub
    from ..state import Core, Run

ATTEMPTS_SHOWN = 50  # a node page lists this many of the node's latest attempts


def _last(node: Node, kind: str) -> dict[str, Any] | None:
    return next((entry for entry in reversed(node.history) if entry.get("kind") == kind), None)


def liveness_reason(node: Node) -> str:
    """Why the node is in its liveness state. Take-downs and returns are in its history; a suspicion and a return
    from it are not (no reason is journaled for them), so they are named by what causes them."""
    entry = _last(node, "liveness")
    if entry is not None and entry.get("state") == node.state:
        return str(entry.get("reason", ""))
    if node.state == Liveness.SUSPECTED:
        return "missed heartbeats"
    if node.state == Liveness.ONLINE:
        return "heard again" if entry is not None else "heartbeats arriving"
    return ""


def health_cause(node: Node) -> dict[str, Any] | None:
    """The metric and figures behind the node's health, from its latest health change (None: never changed)."""
    entry = _last(node, "health")
    if entry is None:
        return None
    return {"metric": entry.get("metric", ""), "value": entry.get("value"), "threshold": entry.get("threshold"),
            "reason": entry.get("reason", ""), "at": entry.get("at"), "recovered": node.health == Health.HEALTHY}


def fleet_row(core: Core, views: dict[str, NodeView], node_id: str) -> dict[str, Any] | None:
    """One node as the fleet table shows it; None for a node the hub no longer holds (deleted)."""
    node = core.nodes.get(node_id)
    if node is None:
        return None
    view = views.get(node_id)
    running = sorted(f"{a.run}/{a.step}" for a in (core.attempts.get(i) for i in node.attempts) if a is not None)
    return {"id": node_id, "liveness": node.state, "liveness_reason": liveness_reason(node),
            "changed_at": node.changed_at, "health": node.health, "health_cause": health_cause(node),
            "last_seen": node.last_seen, "hb": node.hb, "profile": node.profile,
            "version": view.version if view is not None else None, "running": running,
            "labels": dict(node.labels), "draining": node.draining, "throttled": node.throttled,
            "breaker": node.breaker, "removed": node.removed, "conflict": node.conflict is not None}


def fleet_snapshot(hub: Hub) -> dict[str, Any]:
    """Every node's row, and the journal position they reflect (`seq`: resume the live stream after it)."""
    core, views = hub.core, hub.views
    rows = [fleet_row(core, views, node_id) for node_id in sorted(core.nodes)]
    return {"seq": core.seq, "now": hub.clock(), "fleet": hub.config.fleet, "overloaded": core.overloaded,
            "nodes": rows}


def attempts_on(core: Core, node_id: str, limit: int = ATTEMPTS_SHOWN) -> list[dict[str, Any]]:
    """The node's latest attempts (of runs the hub still holds in full), newest first."""
    mine = sorted((a for a in core.attempts.values() if a.node == node_id), key=lambda a: a.fence, reverse=True)
    return [{"id": a.id, "run": a.run, "step": a.step, "fence": a.fence, "state": a.state, "reason": a.reason,
             "assigned_at": a.assigned_at, "started_at": a.started_at, "ended_at": a.ended_at} for a in mine[:limit]]


def run_row(core: Core, run_id: str) -> dict[str, Any] | None:
    """A run as the runs list shows it; None for a run the hub no longer holds."""
    from ..api import archived_summary, run_summary

    run = core.runs.get(run_id)
    if run is not None:
        states = [step.state for step in run.steps.values()]
        return {**run_summary(run), "steps": len(states), "migrations": run.migrations,
                "steps_done": sum(1 for s in states if s in STEP_TERMINAL)}
    if run_id in core.archived:
        return archived_summary(core, run_id)
    return None


def run_graph(core: Core, run: Run, now: int) -> dict[str, Any]:
    """The run with its steps and attempts (as `GET /runs/{id}`), each step also with the edges of its graph: the
    steps it needs, the for_each step it is an instance of, the step a compensation undoes after."""
    from ..api import run_detail

    detail = run_detail(core, run, now)
    for step in detail["steps"]:
        held = run.steps[step["id"]]
        step.update(needs=list(held.spec.needs), parent=held.parent, uses=held.spec.uses,
                    migratable=held.spec.migratable, node=held.node)
    detail["migrations"] = run.migrations
    return detail
