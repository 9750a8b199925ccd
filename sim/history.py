"""The history checker, Jepsen style: judges a run from what happened, never from the hub's API. Its evidence
(sim/evidence.py): every message of the run (the in-memory broker's log, or a recorder's subscription to a real
broker), the hub's journal read from its file, every agent's outbox file (crashed agents' too), the fault log and
the scenario's expectations. `fleetflow sim`, `fleetflow demo`, the deterministic simulation (bench/dst.py) and the
system tests all judge with `judge`; every FAIL names the run, step, attempt or fence, and the wire indexes (#n) of
the messages involved.

Invariants (id: what the verdict line says):
- runs-terminal: every submitted run is journaled and, folded from the journal, terminal at the end;
- runs-expected: and ended in a state its scenario expects (a run that should succeed and failed is a FAIL);
- accepted-once: no attempt has two accepted results, no step two accepted successful results nor two attempts
  that succeeded (on two devices), and an accepted result is from its step's newest attempt, node and fence;
- fences: per step, the journaled fences strictly increase and attempt ids are never reused; no agent holds a
  fence the hub never assigned;
- assign-journaled: every assignment sent was journaled, with the same run, step, fence, node; and journaled first
  (write-ahead) where the evidence says how far the journal was committed when the hub sent it (`committed`: the
  deterministic simulation). A real broker's recording cannot say: an event's `at` is stamped before its commit, so
  comparing it with wire time proves nothing, and the order is not judged there;
- results-journaled: every result a device sent reached the journal, unless its outbox still holds it;
- acked-journaled: every result acknowledged (an ack the hub sent, or the entry gone from the agent's outbox) was
  journaled; before the ack, judged as for assign-journaled;
- outboxes-drained: at a quiet end, no running device's outbox still holds a step event or result;
- wire-verifies: every message that does not verify under its sender's key and topic is one a fault injected, and
  everything the hub accepted (journaled facts, acks, replay marks) is backed by verified messages, each counted
  once (a byte-for-byte copy is the same message);
- refusals: every forged or replayed message a fault injected was refused, judged message by message;
- killed-detected, partition-detected: every device powered off or cut off was declared gone, after the fault, and
  every power cut took (a device whose agent outlived it fails the first: the fault never happened);
- replay: `Core().fold(journal)` gives the hub's final core (when it is known).

Acceptance is observed by folding the journal with the core class the hub ran: a result is accepted when applying
it changes its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hub.events import AttemptAssigned, Event, ResultReported, RunSubmitted
from hub.state import RUN_TERMINAL, Core
from protocols import Assign

from .acceptance import detections, refusals, wire_verifies
from .delivery import acked_journaled, outboxes_drained, results_journaled
from .evidence import Evidence, FaultLog
from .history_lines import render
from .verdict import TITLES, Verdict, Violation
from .wire_view import WireView, refs

__all__ = ["Evidence", "Verdict", "Violation", "check", "judge", "render"]


# -- folding the journal -------------------------------------------------------------------------------------------

@dataclass
class _Fold:
    core: Core
    accepted: list[tuple[ResultReported, AttemptAssigned | None]]  # with the step's newest assignment then


def _step_state(core: Core, step: tuple[str, str] | None) -> tuple[Any, ...] | None:
    """What a result can change: its step's state and the states of the step's attempts."""
    run = core.runs.get(step[0]) if step is not None else None
    if run is None or step is None or step[1] not in run.steps:
        return None
    found = run.steps[step[1]]
    return found.state, tuple(core.attempts[a].state for a in found.attempts if a in core.attempts)


def _fold(journal: Sequence[Event], core_class: type[Core]) -> _Fold:
    """Fold the journal; a result is accepted when applying it changed its step (its state, or an attempt's)."""
    core = core_class()
    newest: dict[tuple[str, str], AttemptAssigned] = {}
    step_of: dict[str, tuple[str, str]] = {}
    accepted: list[tuple[ResultReported, AttemptAssigned | None]] = []
    for event in journal:
        if isinstance(event, AttemptAssigned):
            newest[(event.run, event.step)] = event
            step_of[event.attempt] = (event.run, event.step)
        if isinstance(event, ResultReported):
            step = step_of.get(event.attempt)
            before = _step_state(core, step)
            core.apply(event)
            if before is not None and _step_state(core, step) != before:
                accepted.append((event, newest.get(step) if step is not None else None))
        else:
            core.apply(event)
    return _Fold(core, accepted)


def _run_state(core: Core, run_id: str) -> Any:
    if run_id in core.runs:
        return core.runs[run_id].state
    archived = core.archived.get(run_id)  # a summary: (workflow, version, state, submitted, finished, error)
    return archived[2] if archived is not None else None


def judge(evidence: Evidence) -> Verdict:
    """Every invariant that applies to this evidence, in order, with figures (runs and nodes by state, detection
    times, what the wire held, what was injected and refused)."""
    verdict = Verdict()
    wire = WireView(evidence)
    try:
        fold: _Fold | None = _fold(evidence.journal, evidence.core_class)
    except Exception as exc:  # a journal the hub's own core cannot fold: it could not restart from it either
        verdict.add(TITLES["replay"], False, f"folding the journal raised {type(exc).__name__}: {exc}", "replay")
        fold = None
    if fold is not None:
        states = [str(node.state) for node in fold.core.nodes.values()]
        verdict.figures["nodes"] = {state: states.count(state) for state in sorted(set(states))}
        _runs_terminal(evidence, fold.core, verdict)
        if evidence.expected:
            _runs_expected(evidence, fold.core, verdict)
        _accepted_once(evidence, fold, wire, verdict)
    _fences(evidence, verdict)
    _assign_journaled(evidence, wire, verdict)
    results_journaled(evidence, wire, verdict)
    acked_journaled(evidence, wire, verdict)
    if evidence.quiet_end:
        outboxes_drained(evidence, verdict)
    accepted_injected = wire_verifies(evidence, wire, verdict)
    if evidence.faults.injected:
        refusals(evidence, wire, accepted_injected, verdict)
    detections(evidence, verdict)
    if evidence.final_core is not None:
        _replay(evidence, verdict)
    verdict.figures["wire"] = {"messages": len(evidence.wire), "unverified": len(wire.unverified),
                               "recording_gaps": len(evidence.gaps),
                               "unrecorded_ms": sum(g.end_ms - g.start_ms for g in evidence.gaps)}
    return verdict


def check(evidence: Evidence) -> list[Violation]:
    """The invariants broken (the deterministic simulation's form of the verdict)."""
    return judge(evidence).violations


def _runs_terminal(evidence: Evidence, core: Core, verdict: Verdict) -> None:
    journaled = {e.run for e in evidence.journal if isinstance(e, RunSubmitted)}
    problems = []
    states: dict[str, int] = {}
    for run_id in evidence.submitted:
        state = _run_state(core, run_id)
        states[str(state)] = states.get(str(state), 0) + 1
        if run_id not in journaled:
            problems.append(f"{evidence.run_name(run_id)} never journaled")
        elif state not in RUN_TERMINAL:
            problems.append(f"{evidence.run_name(run_id)} is {state}")
    verdict.figures["runs"] = dict(sorted(states.items()))
    total = len(evidence.submitted)
    verdict.judged("runs-terminal", problems, f"{total}/{total} terminal", " run(s) not terminal")


def _failed_steps(core: Core, run_id: str) -> str:
    """Why a run did not succeed, step by step: each attempt's fence, node, state and reason."""
    run = core.runs.get(run_id)
    if run is None:
        return "archived"
    parts = []
    for step in run.steps.values():
        if step.state == "succeeded":
            continue
        attempts = [core.attempts[a] for a in step.attempts if a in core.attempts]
        said = ", ".join(f"{a.id} fence {a.fence} on {a.node} {a.state}" + (f" ({a.reason})" if a.reason else "")
                         for a in attempts) or "none"
        parts.append(f"{step.error or f'step {step.id} {step.state}'}; attempts {said}")
    return "; ".join(parts[:3]) or (run.error or "no step failed")


# How an attempt ends when a fault, not the step, ended it: its node failed or was cut off (lost), or its agent
# crashed while it ran and reported it so on restart (agent/runner.py).
INTERRUPTED = "interrupted: the agent stopped"


def _spent_by_faults(core: Core, run_id: str, faults: FaultLog) -> bool:
    """A run that should succeed may fail when the faults took every attempt its retries allowed: each failed step
    has attempts, and every one of them was lost or interrupted on a device a fault hit (killed or cut off; any device
    when a fault could reach them all). A step that failed on its own result, without an attempt, or on a device no
    fault touched, is not explained by the faults."""
    run = core.runs.get(run_id)
    if run is None:
        return False
    hit = set(faults.killed) | set(faults.partitioned)
    # A for_each parent fails with its instances: the instances' attempts tell.
    failed = [step for step in run.steps.values() if step.state == "failed" and not step.instances]
    for step in failed:
        attempts = [core.attempts.get(a) for a in step.attempts]
        if not attempts or any(a is None or not (a.state == "lost" or a.state == "failed" and
                                                 (a.reason or "").startswith(INTERRUPTED))
                               or not (faults.anywhere or a.node in hit) for a in attempts):
            return False
    return bool(failed)


def _runs_expected(evidence: Evidence, core: Core, verdict: Verdict) -> None:
    problems, spent = [], 0
    for run_id, states in sorted(evidence.expected.items()):
        state = _run_state(core, run_id)
        if state in RUN_TERMINAL and str(state) not in states:
            if state == "failed" and "succeeded" in states and _spent_by_faults(core, run_id, evidence.faults):
                spent += 1
                continue
            problems.append(f"{evidence.run_name(run_id)} {state}, expected {'/'.join(sorted(states))}: "
                            f"{_failed_steps(core, run_id)}")
    note = f" ({spent} failed only because the faults took every attempt)" if spent else ""
    verdict.judged("runs-expected", problems, f"{len(evidence.expected)} as expected{note}",
                   " run(s) ended otherwise")


def _accepted_once(evidence: Evidence, fold: _Fold, wire: WireView, verdict: Verdict) -> None:
    results = wire.results()
    problems = []
    succeeded: dict[tuple[str, str], ResultReported] = {}
    seen: set[str] = set()
    for result, newest in fold.accepted:
        sent = refs(results.get((result.node, result.attempt, result.fence, result.ok), []))
        if result.attempt in seen:
            problems.append(f"attempt {result.attempt} accepted twice (results {sent})")
        seen.add(result.attempt)
        if newest is None:
            problems.append(f"result of {result.attempt} accepted, but it was never assigned (results {sent})")
            continue
        where = f"run {evidence.run_name(newest.run)} step {newest.step}"
        if (result.attempt, result.fence, result.node) != (newest.attempt, newest.fence, newest.node):
            problems.append(f"{where}: accepted {result.attempt} fence {result.fence} from {result.node} (results "
                            f"{sent}), but the step's newest attempt is {newest.attempt} fence {newest.fence} on "
                            f"{newest.node}")
        if result.ok:
            first = succeeded.setdefault((newest.run, newest.step), result)
            if first.attempt != result.attempt:
                earlier = refs(results.get((first.node, first.attempt, first.fence, True), []))
                problems.append(f"{where}: successful results of {first.attempt} fence {first.fence} on "
                                f"{first.node} ({earlier}) and {result.attempt} fence {result.fence} on "
                                f"{result.node} ({sent}) both accepted")
    twice = {step for step, _ in _pairs(fold.accepted)}
    for run in fold.core.runs.values():  # what the hub holds, however it came to hold it: one success per step
        for step in run.steps.values():
            done = [fold.core.attempts[a] for a in step.attempts
                    if a in fold.core.attempts and fold.core.attempts[a].state == "succeeded"]
            if len(done) > 1 and (run.id, step.id) not in twice:
                said = " and ".join(f"{a.id} fence {a.fence} on {a.node} "
                                    f"({refs(results.get((a.node, a.id, a.fence, True), []))})" for a in done)
                problems.append(f"run {evidence.run_name(run.id)} step {step.id} succeeded on {len(done)} devices: "
                                f"{said}")
    verdict.judged("accepted-once", problems, f"{len(fold.accepted)} results accepted, each once",
                   " acceptance problem(s)")


def _pairs(accepted: list[tuple[ResultReported, AttemptAssigned | None]]) -> list[tuple[tuple[str, str], str]]:
    """(run, step) of the steps with two accepted successful results (already named once), with the second."""
    first: dict[tuple[str, str], str] = {}
    out = []
    for result, newest in accepted:
        if result.ok and newest is not None:
            step = (newest.run, newest.step)
            if first.setdefault(step, result.attempt) != result.attempt:
                out.append((step, result.attempt))
    return out


def _fences(evidence: Evidence, verdict: Verdict) -> None:
    problems = []
    last: dict[tuple[str, str], int] = {}
    attempts: set[str] = set()
    for event in evidence.journal:
        if not isinstance(event, AttemptAssigned):
            continue
        key = (event.run, event.step)
        if key in last and event.fence <= last[key]:
            problems.append(f"run {evidence.run_name(event.run)} step {event.step}: {event.attempt} got fence "
                            f"{event.fence} after {last[key]}")
        if event.attempt in attempts:
            problems.append(f"attempt id {event.attempt} assigned twice")
        last[key] = max(event.fence, last.get(key, event.fence))
        attempts.add(event.attempt)
    for node, fences in sorted(evidence.fences.items()):  # what each agent keeps: never beyond what was assigned
        for (run, step), fence in sorted(fences.items()):
            if fence > last.get((run, step), -1):
                problems.append(f"{node} holds fence {fence} for run {evidence.run_name(run)} step {step}; the hub "
                                f"assigned up to {last.get((run, step), 'none')}")
    verdict.judged("fences", problems, f"{len(last)} steps, fences increasing", " fence problem(s)")


def _assign_journaled(evidence: Evidence, wire: WireView, verdict: Verdict) -> None:
    """Every assignment sent is journaled as sent; and was committed before it was sent, where the evidence knows how
    far the journal was committed at each message the hub published (`Evidence.committed`)."""
    assigned: dict[str, tuple[AttemptAssigned, int]] = {}  # attempt -> its assignment, its position in the journal
    for position, event in enumerate(evidence.journal, start=1):
        if isinstance(event, AttemptAssigned):
            assigned.setdefault(event.attempt, (event, position))
    problems = []
    sent = 0
    for index, message in sorted(wire.messages.items()):
        body = message.body
        if not isinstance(body, Assign) or wire.genuine(index) is None:
            continue
        sent += 1
        journaled, position = assigned.get(body.attempt, (None, 0))
        committed = evidence.committed.get(index)
        if journaled is None:
            problems.append(f"#{index}: {body.attempt} of run {evidence.run_name(body.run)} step {body.step} "
                            f"fence {body.fence} sent to {message.header.dst}, never journaled")
        elif (journaled.run, journaled.step, journaled.fence, journaled.node) != (body.run, body.step, body.fence,
                                                                               message.header.dst):
            problems.append(f"#{index}: {body.attempt} sent as run {body.run} step {body.step} fence {body.fence} to "
                            f"{message.header.dst}, journaled as run {journaled.run} step {journaled.step} fence "
                            f"{journaled.fence} on {journaled.node}")
        elif committed is not None and position > committed:
            problems.append(f"#{index}: {body.attempt} (run {evidence.run_name(body.run)} step {body.step} fence "
                            f"{body.fence}) sent when the journal held {committed} events, journaled later as event "
                            f"{position}")
    first = "first" if evidence.committed else "(the order is not known from a recording)"
    verdict.judged("assign-journaled", problems, f"{sent} assignments sent, each journaled {first}", " assignment(s)")


def _states(core: Core) -> dict[str, str]:
    out = {f"run {run_id}": str(summary[2]) for run_id, summary in core.archived.items()}
    for run in core.runs.values():
        out[f"run {run.id}"] = run.state
        out.update({f"step {run.id}/{step.id}": step.state for step in run.steps.values()})
    out.update({f"attempt {attempt.id}": attempt.state for attempt in core.attempts.values()})
    return out


def _replay(evidence: Evidence, verdict: Verdict) -> None:
    assert evidence.final_core is not None
    try:
        replayed = _states(Core().fold(list(evidence.journal)))
    except Exception as exc:
        verdict.add(TITLES["replay"], False, f"Core().fold(journal) raised {type(exc).__name__}: {exc}", "replay")
        return
    final = _states(evidence.final_core)
    problems = [f"{what}: replay {replayed.get(what)}, hub {final.get(what)}"
                for what in sorted(set(replayed) | set(final)) if replayed.get(what) != final.get(what)]
    verdict.judged("replay", problems, f"{len(final)} states agree",
                   " difference(s) between the replayed journal and the hub's core")
