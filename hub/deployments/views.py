"""The JSON of `GET /deployments` (a summary per deployment) and `GET /deployments/{id}` (with its waves and each
node's execution), which `fleetflow deployments list|show` print. States are their lower-case words; times are epoch
milliseconds. docs/deployments.md documents every field. An archived deployment (hub/deployments/core.py keeps only
its summary) shows as that summary with `"archived": true` and no settings, waves or executions."""

from __future__ import annotations

import collections
from typing import Any

from .core import Deployment, Execution
from .machine import EXECUTION_TERMINAL, ExecutionState

# The settings `show` lists (the request's fields as journaled, without the workflow itself).
SETTINGS = ("rate", "base_rate", "increment_factor", "grow_after_notified", "grow_after_succeeded", "max_concurrent",
            "waves", "wave_success", "pause_between", "abort_type", "abort_min_executed", "abort_threshold",
            "retries", "timeout", "in_progress_timeout", "verify", "rollback", "at", "cron", "window")


def _counts(executions: list[Execution]) -> dict[str, int]:
    counted = collections.Counter(str(ex.state) for ex in executions)
    return {state.value: counted[state.value] for state in ExecutionState if counted[state.value]}


def summary(dep: Deployment) -> dict[str, Any]:
    spec = dep.spec
    return {"id": dep.id, "state": str(dep.state), "reason": dep.reason, "component": spec.component,
            "version": spec.version, "target": list(spec.target.selectors),
            "counts": _counts(list(dep.executions.values())), "nodes": len(dep.executions), "round": dep.round,
            "wave": dep.wave or None, "abort_reason": dep.abort_reason, "next_fire": dep.next_fire,
            "created_at": dep.created_at, "updated_at": dep.updated_at, "ended_at": dep.ended_at, "actor": dep.actor,
            "archived": False}


def execution(ex: Execution, run_count: int) -> dict[str, Any]:
    return {"node": ex.node, "state": str(ex.state), "version": ex.version, "version_before": ex.version_before,
            "reason": ex.reason, "failure": ex.failure, "wave": ex.wave, "round": ex.round, "runs": list(ex.runs),
            "run_count": run_count, "retries": ex.retries, "queued_at": ex.queued_at, "started_at": ex.started_at,
            "updated_at": ex.updated_at, "deadline": ex.deadline}


def waves(dep: Deployment) -> list[dict[str, Any]]:
    """The current round's waves: how many nodes each holds, how many ended and succeeded, and which is running."""
    by_wave: dict[int, list[Execution]] = collections.defaultdict(list)
    for ex in dep.executions.values():
        if ex.round == dep.round:
            by_wave[ex.wave].append(ex)
    out = []
    for index, size in enumerate(dep.spec.waves.sizes, 1):
        members = by_wave.get(index, [])
        done = sum(ex.state in EXECUTION_TERMINAL for ex in members)
        status = ("current" if index == dep.wave and done < len(members) else
                  "done" if members and done == len(members) else "waiting" if index > dep.wave else "empty")
        out.append({"wave": index, "size": size, "nodes": len(members), "done": done,
                    "succeeded": sum(ex.state == ExecutionState.SUCCEEDED for ex in members),
                    "counts": _counts(members), "status": status})
    return out


def detail(dep: Deployment) -> dict[str, Any]:
    record = dep.record
    ordered = sorted(dep.executions.values(), key=lambda ex: (ex.round, ex.seq))
    return {**summary(dep), "settings": {name: record.get(name) for name in SETTINGS},
            "waves": waves(dep), "executions": [execution(ex, dep.run_counts.get(ex.node, 0)) for ex in ordered]}


def archived_detail(summary_: dict[str, Any]) -> dict[str, Any]:
    return {**summary_, "settings": {}, "waves": [], "executions": []}
