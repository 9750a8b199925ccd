"""Invariants on the delivery of results, from device to journal (sim/history.py runs them): nothing a device sent
is lost, nothing acknowledged is missing from the journal, and outboxes drain. The agents' outbox files say what
each device still holds; an entry gone from one was acknowledged (agent/node.py removes step events and results on
the hub's ack only), so the outboxes of devices that crashed and never came back are read like the others.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from hub.events import Event, ResultReported
from protocols import Ack, StepResult

from .evidence import Evidence
from .verdict import Verdict
from .wire_view import WireView, refs

ResultKey = tuple[str, str, int, bool]  # (node, attempt, fence, ok)


def reported(journal: Iterable[Event]) -> dict[ResultKey, int]:
    """(node, attempt, fence, ok) of every journaled result -> where it was first journaled (its position, 1, 2, ...:
    the commit order)."""
    out: dict[ResultKey, int] = {}
    for position, event in enumerate(journal, start=1):
        if isinstance(event, ResultReported):
            out.setdefault((event.node, event.attempt, event.fence, event.ok), position)
    return out


def _held(evidence: Evidence) -> dict[str, set[int]]:
    """Node -> the eids its outbox still holds."""
    return {node: {entry.eid for entry in entries} for node, entries in evidence.outboxes.items()}


def _result(wire: WireView, index: int) -> StepResult:
    body = wire.messages[index].body
    assert isinstance(body, StepResult)
    return body


def _describe(evidence: Evidence, wire: WireView, key: ResultKey, indexes: list[int]) -> str:
    body = _result(wire, indexes[0])
    eids = sorted({_result(wire, i).eid for i in indexes})
    return (f"{key[0]}'s result of run {evidence.run_name(body.run)} step {body.step} attempt {body.attempt} fence "
            f"{body.fence} (ok={body.ok}, eid {', '.join(map(str, eids))}, {refs(indexes)})")


def results_journaled(evidence: Evidence, wire: WireView, verdict: Verdict) -> None:
    """Every result a device sent is journaled, or still in its outbox (on its way, or its device is gone)."""
    journaled, held = reported(evidence.journal), _held(evidence)
    problems, kept = [], 0
    results = wire.results()
    for key, indexes in results.items():
        if key in journaled:
            continue
        node = key[0]
        if node in held:
            if any(_result(wire, i).eid in held[node] for i in indexes):
                kept += 1
                continue
        elif evidence.wire[indexes[-1]].at > evidence.end - evidence.settle_s:
            continue  # no outbox to ask: a result this recent may still be on its way
        problems.append(f"{_describe(evidence, wire, key, indexes)} never journaled, and no longer in its outbox")
    verdict.figures["results"] = {"sent": len(results), "journaled": len(results) - kept - len(problems),
                                  "still_in_outboxes": kept}
    verdict.judged("results-journaled", problems, f"{len(results)} results sent, {len(results) - kept} journaled, "
                   f"{kept} still in outboxes", " result(s) lost")


def acked_journaled(evidence: Evidence, wire: WireView, verdict: Verdict) -> None:
    """Every result acknowledged was journaled: an ack the hub sent (on the wire), or the agent's own record (the
    entry is gone from its outbox; crashed agents included). Journaled before the ack is judged where the evidence
    says how far the journal was committed when the hub sent it (`Evidence.committed`: the deterministic simulation);
    a real broker's recording cannot say (an event's `at` is stamped before its commit), and there an ack only needs
    its result in the journal, which is read after the recording ends."""
    journaled, held = reported(evidence.journal), _held(evidence)
    by_eid: dict[tuple[str, int], list[ResultKey]] = collections.defaultdict(list)
    for key, indexes in wire.results().items():
        for index in indexes:
            by_eid[(key[0], _result(wire, index).eid)].append(key)
    problems: list[str] = []
    acked = 0
    for index, message in sorted(wire.messages.items()):
        body, node = message.body, message.header.dst
        if not isinstance(body, Ack) or node is None or wire.genuine(index) is None:
            continue
        for eid in body.eids:
            for key in dict.fromkeys(by_eid.get((node, eid), [])):  # step events share the eids: not theirs
                acked += 1
                position, committed = journaled.get(key), evidence.committed.get(index)
                if position is None or (committed is not None and position > committed):
                    when = "never" if position is None else \
                        f"later, as event {position} (the journal held {committed} events at the ack)"
                    problems.append(f"{_describe(evidence, wire, key, wire.results()[key])} acknowledged by #{index} "
                                    f"at {wire.ms[index]}, journaled {when}")
    recorded = 0
    for key, indexes in wire.results().items():
        node = key[0]
        if node not in held or any(_result(wire, i).eid in held[node] for i in indexes):
            continue
        recorded += 1
        if key not in journaled:
            problems.append(f"{_describe(evidence, wire, key, indexes)} gone from its outbox (acknowledged), never "
                            f"journaled")
    first = "first" if evidence.committed else "(the order is not known from a recording)"
    verdict.judged("acked-journaled", problems, f"{acked} acks of results, {recorded} results acknowledged by "
                   f"their devices, all journaled {first}", " acknowledged result(s) not journaled")


def outboxes_drained(evidence: Evidence, verdict: Verdict) -> None:
    """At a quiet end, the outbox of every device still running holds nothing older than the settling time."""
    settled_ms = evidence.epoch_ms + (evidence.end - evidence.settle_s) * 1000  # float: an open end is inf
    down = evidence.faults.down_at_end
    problems = [f"{node} still holds {entry.type} eid {entry.eid} of run {evidence.run_name(entry.body.get('run', '?'))}"
                f" step {entry.body.get('step')} attempt {entry.body.get('attempt')} from {entry.at_ms}"
                for node, entries in sorted(evidence.outboxes.items()) if node not in down
                for entry in entries if entry.at_ms <= settled_ms]
    kept_by_down = sum(len(entries) for node, entries in evidence.outboxes.items() if node in down)
    verdict.figures["held_by_devices_down"] = kept_by_down
    verdict.judged("outboxes-drained", problems, f"{len(evidence.outboxes) - len(down & set(evidence.outboxes))} "
                   f"running devices' outboxes empty ({kept_by_down} entries kept by devices powered off)",
                   " entries never acknowledged")
