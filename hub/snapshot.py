"""Snapshots of the core as plain data (dicts, lists, str, int, float, bool, None), so a restart loads the latest
snapshot and replays only the events after it. The journal stores them CBOR-encoded (hub/journal.py).

The format is written out here field by field and versioned, so it is not the class layout and reading one runs no
code: a snapshot of another version, or a malformed one, raises `SnapshotError`, and the journal replays from an
older snapshot or from the first event instead (a snapshot is only a cache; the events are the truth). Workflows
are stored as their journaled specs, once per distinct workflow, and compiled again on load; the steps the core
made up (for_each instances, compensations) are rebuilt from the steps they came from. A change of this format
takes a new `VERSION`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .events import SnapshotError
from .fleet import Node
from .runs import Attempt, Counters, Run, StepRun, compensation_spec, compile_workflow, instance_spec
from .transitions import AttemptState, Breaker, Health, Liveness, RunState, StepState

if TYPE_CHECKING:
    from .state import Core

VERSION = 3  # 1 was a pickle of the Core object; 3 adds deployments and each node's versions

_ATTEMPT = ("id", "run", "step", "fence", "node", "state", "assigned_at", "started_at", "ended_at", "reason")
_STEP = ("id", "kind", "state", "attempts", "failures", "refusals", "unanswered", "ready_at", "output", "error", "node",
         "parent", "instances", "avoid", "done_seq")
_RUN = ("id", "inputs", "submitted_at", "deadline", "key", "seq", "state", "error", "finished_at", "compensations",
        "migrations")
_NODE = ("id", "boot", "profile", "labels", "slots", "resources", "hb", "state", "last_seen", "draining", "removed",
         "changed_at", "health", "tel", "throttled", "breaker", "breaker_at", "failures", "probe_successes",
         "probe_failed", "migrations", "history", "conflict", "versions")
_STATES = frozenset({"state", "health", "breaker"})  # StrEnums, written as their plain strings


def _plain(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: str(getattr(obj, name)) if name in _STATES else getattr(obj, name) for name in names}


def dump(core: Core) -> dict[str, Any]:
    """The core as plain data. It shares leaf values (inputs, outputs, labels) with the core: encode it at once."""
    work, fleet = core.work, core.fleet
    specs: list[dict[str, Any]] = []
    spec_of: dict[int, int] = {}  # id(workflow) -> index in specs: runs of one workflow share its compiled object
    runs = []
    for run in work.runs.values():
        index = spec_of.setdefault(id(run.workflow), len(specs))
        if index == len(specs):
            specs.append(run.spec)
        runs.append({**_plain(run, _RUN), "workflow": index, "steps": [_step(s) for s in run.steps.values()]})
    return {
        "version": VERSION,
        "seq": core.seq,
        "loaded_at": core.loaded_at,
        "windows": core.windows,
        "fence": work.fence,
        "done_seq": work.done_seq,
        "counters": {"stale_reports": work.counters.stale_reports, "refusals": work.counters.refusals,
                     "lost_attempts": work.counters.lost_attempts},
        "workflows": specs,
        "runs": runs,
        "attempts": [_plain(a, _ATTEMPT) for a in work.attempts.values()],
        "live": sorted(work.live),
        "active": sorted(work.active),
        "keys": dict(work.keys),
        "finished": list(work.finished),
        "archived": [[run_id, name, version, str(state), submitted, finished, error]
                     for run_id, (name, version, state, submitted, finished, error) in work.archived.items()],
        "queue": [[run_id, step_id] for run_id, step_id in work.queue],
        "overloaded": fleet.overloaded,
        "breaker_watch": sorted(fleet.breaker_watch),
        "nodes": [{**_plain(n, _NODE), "caps": sorted(n.caps), "attempts": sorted(n.attempts)}
                  for n in fleet.nodes.values()],
        "deployments": core.deploys.dump(),  # hub/deployments/core.py writes its own half
    }


def _step(step: StepRun) -> dict[str, Any]:
    out = _plain(step, _STEP)
    if step.kind == "compensation":  # what compensation_spec was given: the step it undoes, the one before it
        out["undoes"] = step.id.removeprefix("undo-")
        out["after"] = step.spec.needs[0] if step.spec.needs else None
    return out


def load(core: Core, data: Any) -> Core:
    """Fill a new core from `dump`'s output."""
    if not isinstance(data, dict):
        raise SnapshotError(f"a snapshot is a map, not {type(data).__name__}")
    version = data.get("version")
    if version != VERSION:
        raise SnapshotError(f"snapshot version {version!r}: this hub reads version {VERSION}")
    try:
        _restore(core, data)
    except Exception as exc:  # whatever bad data makes the rebuild raise (int(inf), a deep spec, a bad workflow)
        raise SnapshotError(f"malformed snapshot (version {VERSION}): {type(exc).__name__}: {exc}") from None
    return core


def _restore(core: Core, data: dict[str, Any]) -> None:
    work, fleet = core.work, core.fleet
    core.seq, core.loaded_at, core.windows = int(data["seq"]), int(data["loaded_at"]), dict(data["windows"])
    work.fence, work.done_seq = int(data["fence"]), int(data["done_seq"])
    work.counters = Counters(**data["counters"])
    for raw in data["nodes"]:
        node = Node(**{name: raw[name] for name in _NODE}, caps=frozenset(raw["caps"]), attempts=set(raw["attempts"]))
        node.state, node.health, node.breaker = Liveness(node.state), Health(node.health), Breaker(node.breaker)
        fleet.nodes[node.id] = node  # the same dict the runs half reads
    fleet.overloaded = bool(data["overloaded"])
    fleet.breaker_watch = set(data["breaker_watch"])
    workflows = [compile_workflow(spec) for spec in data["workflows"]]
    for raw in data["runs"]:
        run = Run(**{name: raw[name] for name in _RUN}, workflow=workflows[raw["workflow"]],
                  spec=data["workflows"][raw["workflow"]])
        run.state = RunState(run.state)
        for step in raw["steps"]:
            run.steps[step["id"]] = _step_of(run, step)
        work.runs[run.id] = run
    for raw in data["attempts"]:
        attempt = Attempt(**{name: raw[name] for name in _ATTEMPT})
        attempt.state = AttemptState(attempt.state)
        work.attempts[attempt.id] = attempt
    work.live, work.active, work.keys = set(data["live"]), set(data["active"]), dict(data["keys"])
    work.finished = dict.fromkeys(data["finished"])
    work.archived = {run_id: (name, version, RunState(state), submitted, finished, error)
                     for run_id, name, version, state, submitted, finished, error in data["archived"]}
    work.queue = {(run_id, step_id): None for run_id, step_id in data["queue"]}
    core.deploys.load(data["deployments"])  # after the nodes: executions read their inventory


def _step_of(run: Run, raw: dict[str, Any]) -> StepRun:
    """A step with its spec rebuilt: a workflow step's from the workflow; an instance's and a compensation's from the
    steps they came from (earlier in `run.steps`, as the core made them in that order)."""
    kind, step_id = raw["kind"], raw["id"]
    if kind == "instance":
        parent = run.steps[raw["parent"]]
        spec = instance_spec(parent.spec, step_id[len(parent.id) + 1:])
    elif kind == "compensation":
        spec = compensation_spec(run.steps[raw["undoes"]].spec, raw["after"])
    else:
        spec = run.workflow.step(step_id)
    step = StepRun(**{name: raw[name] for name in _STEP}, spec=spec)
    step.state = StepState(step.state)
    return step
