"""The runs an execution starts: the deployment's workflow pinned to one node, and its rollback.

A run of the workflow on node N is the workflow with every step's placement selector given `nodes: [N]` (its other
constraints kept) and its compensations left out: undoing is the deployment's rollback, a run of its own, so a
failed run is not compensated twice. The rollback is one run on N of the compensations of the steps that completed,
in reverse topological order (the saga's order), each after the one before. Both are the workflow's spec as
journaled in `RunSubmitted`, so a run keeps the version it started with whatever is deployed later.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from protocols import is_valid_id

from ..workflow import STEP_ID, topological_order, workflow_from_data

_STEP_ID_MAX = 48  # the longest step id hub/workflow.py accepts
assert re.fullmatch(STEP_ID, "s" * _STEP_ID_MAX) and not re.fullmatch(STEP_ID, "s" * (_STEP_ID_MAX + 1))


def run_id(deployment: str, node: str, n: int) -> str:
    """`{deployment}.{node}.{n}`; a node id too long for that to be an id is replaced by a hash of it."""
    plain = f"{deployment}.{node}.{n}"
    if is_valid_id(plain):
        return plain
    return f"{deployment}.h{hashlib.sha256(node.encode()).hexdigest()[:16]}.{n}"


def _pin(step: dict[str, Any], node: str) -> dict[str, Any]:
    placement = step.setdefault("placement", {})
    placement.setdefault("selector", {})["nodes"] = [node]
    return step


def pinned_spec(workflow: dict[str, Any], node: str) -> dict[str, Any]:
    spec = copy.deepcopy(workflow)
    for step in spec["steps"]:
        _pin(step, node)
        step["compensate"] = None
    return spec


def rollback_spec(workflow: dict[str, Any], node: str, completed: set[str]) -> dict[str, Any]:
    """The run that undoes the steps in `completed` (those with a compensation), newest in the saga's order first.
    `completed` must name at least one such step."""
    order = topological_order(workflow_from_data(workflow))
    by_id = {step["id"]: step for step in workflow["steps"]}
    steps: list[dict[str, Any]] = []
    for index, step_id in enumerate(reversed(order)):
        step = by_id[step_id]
        undo = step.get("compensate")
        if step_id not in completed or undo is None:
            continue
        name = f"undo-{step_id}" if len(step_id) + 5 <= _STEP_ID_MAX else f"undo-{index}"
        steps.append(_pin({"id": name, "uses": undo["uses"], "with": copy.deepcopy(undo.get("with", {})),
                           "timeout": undo.get("timeout", 300.0), "needs": [steps[-1]["id"]] if steps else [],
                           "placement": copy.deepcopy(step.get("placement", {})),
                           "resources": copy.deepcopy(step.get("resources", {})),
                           "retry": copy.deepcopy(step.get("retry", {}))}, node))
    if not steps:
        raise ValueError("nothing to roll back")
    return {"name": workflow["name"], "version": workflow["version"],
            "description": f"rollback of {workflow['name']} {workflow['version']}",
            "inputs": copy.deepcopy(workflow.get("inputs", {})), "steps": steps,
            "priority": workflow.get("priority", 0)}
