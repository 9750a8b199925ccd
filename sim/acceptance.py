"""Invariants on what the hub accepted (sim/history.py runs them): everything it acted on verifies under its sender's
key and topic, every message a fault forged or replayed was refused (judged message by message, never by a hub-wide
count), and every device a fault took away was declared gone.

What the hub accepted shows in its journal (the facts a message makes: a result, a step event, a birth, a death, a
node seen again), in its acks, and in its replay marks (the boot and highest sequence number it accepted from each
sender). Each must be backed by a verified message of that sender, each message backing one fact: a byte-for-byte
copy (a replay, or a broker's redelivery) is the same message, so a replay the hub took shows as one fact more than
there were messages. Where the wire record has a gap (the recorder was reconnecting), a fact with no message is not
held against the hub: it is counted apart.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from hub.events import NodeDied, NodeFailed, NodeSeen
from protocols import Ack, Message, StepEvent, StepResult

from .evidence import Evidence, claimed
from .verdict import Verdict
from .wire_view import FactKey, WireView, event_key, message_key, refs

SEEN_WINDOW_MS = 10_000   # a node journaled as seen again sent something this close to that moment
DETECTION_SLACK_MS = 500  # the fault's clock read and the hub's differ by this much at most


@dataclass(frozen=True)
class _Unbacked:
    """Something the hub accepted with no verified message behind it."""

    kind: str          # fact, seen, ack, mark
    sender: str
    key: FactKey       # what an injected message would have to say to explain it
    ms: int
    what: str


def _facts(evidence: Evidence, wire: WireView) -> list[_Unbacked]:
    supply: dict[FactKey, list[int]] = collections.defaultdict(list)
    for index in sorted(wire.messages):
        message = wire.genuine(index)
        key = message_key(message) if message is not None else None
        if key is not None:
            supply[key].append(index)
    demand: dict[FactKey, list[int]] = collections.defaultdict(list)
    for event in evidence.journal:
        key = event_key(event)
        if key is not None:
            demand[key].append(event.at)
    out = []
    for key, times in demand.items():
        backing = supply.get(key, [])
        if len(times) > len(backing):
            out.append(_Unbacked("fact", key[1], key, times[len(backing)],
                                 f"the journal holds {len(times)} {key[0]} fact(s) {key[1:]} at {times}, the wire "
                                 f"{len(backing)} message(s) ({refs(backing)})"))
    return out


def _seen(evidence: Evidence, wire: WireView) -> list[_Unbacked]:
    out = []
    for event in evidence.journal:
        if isinstance(event, NodeSeen) and not any(wire.genuine(i) is not None
                                                   for i in wire.around(event.node, event.at, SEEN_WINDOW_MS)):
            out.append(_Unbacked("seen", event.node, ("seen", event.node), event.at,
                                 f"{event.node} journaled as seen again at {event.at}, with no verified message of it "
                                 f"within {SEEN_WINDOW_MS // 1000} s"))
    return out


def _evt_eids(wire: WireView) -> set[tuple[str, int]]:
    sent = set()
    for index, message in wire.messages.items():
        if isinstance(message.body, (StepEvent, StepResult)) and wire.genuine(index) is not None:
            sent.add((message.header.src, message.body.eid))
    return sent


def _acks(wire: WireView) -> list[_Unbacked]:
    sent = _evt_eids(wire)
    out = []
    for index, message in sorted(wire.messages.items()):
        body, node = message.body, message.header.dst
        if isinstance(body, Ack) and node is not None and wire.genuine(index) is not None:
            out += [_Unbacked("ack", node, ("ack", node, eid), wire.ms[index],
                              f"#{index} acknowledges eid {eid} of {node}, which {node} never sent")
                    for eid in body.eids if (node, eid) not in sent]
    return out


def _marks(evidence: Evidence, wire: WireView) -> list[_Unbacked]:
    """Each replay mark must be a boot one of the sender's verified messages carried, and a sequence number one of
    them carried, unless it is past the last one recorded (the journal is read after the record ends)."""
    out = []
    for sender, (boot, top, _) in sorted((evidence.marks or {}).items()):
        booted = backed = False
        for index in reversed(wire.by_signer.get(sender, [])):  # newest first: the mark is near the end
            said = claimed(evidence.wire[index].payload)
            if said is None or said.header.boot != boot:
                continue
            if said.header.seq == top or not booted:
                if wire.genuine(index) is None:
                    continue
                # The mark itself; or, for the newest message of the boot, a mark past it moved on after the record.
                backed = said.header.seq == top or (not booted and said.header.seq < top)
                booted = True
                if backed:
                    break
        last_ms = wire.ms[wire.by_signer[sender][-1]] if wire.by_signer.get(sender) else evidence.epoch_ms
        if not booted:
            out.append(_Unbacked("mark", sender, ("mark", sender, boot), last_ms,
                                 f"the hub's replay mark for {sender} is boot {boot}, which no verified message of "
                                 f"{sender} carries"))
        elif not backed:
            out.append(_Unbacked("mark", sender, ("mark", sender, boot, top), last_ms,
                                 f"the hub's replay mark for {sender} is boot {boot} seq {top}, which no verified "
                                 f"message of {sender} carries"))
    return out


def _explains(unbacked: _Unbacked, said: Message, ms: int) -> bool:
    """Whether an injected message saying `said`, on the wire at `ms`, would have made the hub accept this."""
    src = said.header.src
    if unbacked.sender != src:
        return False
    if unbacked.kind == "fact":
        return message_key(said) == unbacked.key
    if unbacked.kind == "seen":
        return abs(unbacked.ms - ms) <= SEEN_WINDOW_MS
    if unbacked.kind == "ack":
        return isinstance(said.body, (StepEvent, StepResult)) and ("ack", src, said.body.eid) == unbacked.key
    return said.header.boot == unbacked.key[2] and (len(unbacked.key) == 3 or said.header.seq == unbacked.key[3])


def wire_verifies(evidence: Evidence, wire: WireView, verdict: Verdict) -> dict[int, str]:
    """The check; returns the injected messages the hub accepted (wire index -> what it accepted)."""
    problems = [f"#{index} on {evidence.wire[index].topic} does not verify ({why}) and no fault injected it"
                for index, why in sorted(wire.unverified.items()) if index not in wire.injected]
    unbacked = _facts(evidence, wire) + _seen(evidence, wire) + _acks(wire) + _marks(evidence, wire)
    # A mark has no time of its own: only a sequence number the recorder may have missed while away is excused.
    in_gaps = [u for u in unbacked if (bool(evidence.gaps) and len(u.key) == 4 if u.kind == "mark"
                                       else evidence.in_gap(u.ms))]
    problems += [u.what for u in unbacked if u not in in_gaps]
    accepted: dict[int, str] = {}
    for index in sorted(wire.injected):
        said = claimed(evidence.wire[index].payload)
        if said is not None:
            for u in unbacked:
                if u not in in_gaps and _explains(u, said, wire.ms[index]):
                    accepted[index] = u.what
    verdict.figures["unbacked_in_recording_gaps"] = len(in_gaps)
    checked = len(wire.messages) + len(wire.unverified)
    verdict.judged("wire-verifies", problems, f"{checked} results, step events, commands, births and deaths verified; "
                   "everything the hub accepted is backed by them"
                   + (f" ({len(in_gaps)} facts fall in recording gaps)" if in_gaps else ""),
                   " unverified or unbacked")
    return accepted


def refusals(evidence: Evidence, wire: WireView, accepted: dict[int, str], verdict: Verdict) -> None:
    """Each injected message on its own: on the wire, truly forged (it does not verify) or truly replayed (a copy
    of an earlier message), and refused."""
    problems, refused = [], 0
    on_wire: dict[tuple[str, bytes], list[int]] = collections.defaultdict(list)
    for index in sorted(wire.injected):
        record = evidence.wire[index]
        on_wire[(record.topic, record.payload)].append(index)
    for fault in evidence.faults.injected:
        indexes = on_wire.get((fault.topic, fault.payload), [])
        said = claimed(fault.payload)
        what = (f"{fault.kind} {said.header.type} under {said.header.src} (boot {said.header.boot} seq "
                f"{said.header.seq})" if said is not None else f"{fault.kind} message on {fault.topic}")
        if not indexes:
            if not evidence.gaps:
                problems.append(f"{what}: never seen on the wire")
            continue
        if fault.kind == "forged" and any(wire.opened(i) is not None for i in indexes):
            problems.append(f"{what} ({refs(indexes)}) verifies under {said.header.src if said else '?'}'s key: "
                            f"not a forgery")
        elif fault.kind == "replayed" and wire.first[fault.payload] in indexes:
            problems.append(f"{what} ({refs(indexes)}): no earlier copy on the wire, so not a replay")
        taken = [f"#{i}: {accepted[i]}" for i in indexes if i in accepted]
        if taken:
            problems.append(f"{what} accepted: {'; '.join(taken)}")
        else:
            refused += 1
    total = len(evidence.faults.injected)
    verdict.figures["injected"] = {"messages": total, "refused": refused}
    verdict.judged("refusals", problems, f"{refused}/{total} injected messages refused, each on its own",
                   " injected message(s) not refused")


def _declared_gone(evidence: Evidence, node: str, since_ms: int) -> int | None:
    for event in evidence.journal:
        if isinstance(event, (NodeDied, NodeFailed)) and event.node == node and event.at >= since_ms - DETECTION_SLACK_MS:
            return event.at
    return None


def detections(evidence: Evidence, verdict: Verdict) -> None:
    for invariant, faulted, figure, verb in (("killed-detected", evidence.faults.killed, "detection_ms", "powered off"),
                                             ("partition-detected", evidence.faults.partitioned,
                                              "partition_detection_ms", "cut off")):
        # A power cut the device's agent outlived did not happen as planned: the run proves nothing about it.
        problems = [f"{node}: its power cut did not take (its agent still ran after the simulator's cancellations)"
                    for node in evidence.faults.cut_failed] if invariant == "killed-detected" else []
        if not faulted and not problems:
            continue
        times: list[int] = []
        for node, at in sorted(faulted.items()):
            gone = _declared_gone(evidence, node, at)
            if gone is None:
                problems.append(f"{node} {verb} at {at}, never declared failed or dead in the journal after that")
            else:
                times.append(max(0, gone - at))
        if times:
            ordered = sorted(times)
            verdict.figures[figure] = {"max": ordered[-1], "mean": round(sum(times) / len(times)),
                                       "p99": ordered[-(-99 * len(ordered) // 100) - 1]}  # nearest rank
        verdict.judged(invariant, problems, f"{len(times)}/{len(faulted)} detected"
                       + (f", detection max {max(times)} ms" if times else ""), " undetected")
