"""A history as text, one line per event, ordered by time: what the simulation did (faults, crashes, restarts),
every message the broker carried and every delivery, and the journal. `python bench/dst.py --seed S --history`
prints it; it is the same, byte for byte, for a seed on every run (nothing in it depends on key bytes or wall time).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from agent.runtime.memory import WireRecord
from hub.events import Event, RunSubmitted

from .evidence import Evidence, open_record


def _value(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"  # keys and kids: never printed, a history must not depend on them
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(" + " ".join(_value(getattr(value, f.name)) for f in dataclasses.fields(value)) + ")"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def describe(obj: Any, skip: tuple[str, ...] = ()) -> str:
    """`field=value ...` of a message body or journal event, without the noise (empty values, skipped fields)."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value in (None, (), {}, ""):
            continue
        parts.append(f"{f.name.rstrip('_')}={_value(value)}")
    return " ".join(parts)


def wire_line(index: int, record: WireRecord, keys: dict[str, bytes]) -> str:
    opened = open_record(record, keys)
    what = f"#{index} {record.sender}"
    if record.will:
        what += " (will)"
    if not record.reached:
        what += " LOST before the broker"
    if isinstance(opened, str):
        return f"wire    {what} {record.topic} unverified: {opened}"
    h = opened.header
    target = f" -> {h.dst}" if h.dst else ""
    return (f"wire    {what}{target} {h.type} {h.src}/{h.boot}.{h.seq}{' retained' if record.retain else ''} "
            f"{describe(opened.body)}").rstrip()


def journal_line(event: Event) -> str:
    if isinstance(event, RunSubmitted):
        return f"journal {type(event).__name__} run={event.run} workflow={event.spec.get('name')} deadline={event.deadline}"
    return f"journal {type(event).__name__} {describe(event, skip=('at',))}".rstrip()


def render(evidence: Evidence, sim_events: Sequence[tuple[float, int, str]]) -> list[str]:
    """The whole history, ordered by simulated time. At one instant the broker's log order, which is causal,
    decides; a simulation event carries the broker's count when it happened. A journal event's time is the hub
    clock rounded to the ms: it is placed half a ms later, after the delivery that caused it."""
    lines: list[tuple[float, float, float, str]] = [(at, seq + 0.5, at, f"sim     {text}") for at, seq, text in sim_events]
    lines += [(r.at, r.seq, r.at, wire_line(i, r, evidence.keys)) for i, r in enumerate(evidence.wire)]
    lines += [(d.at, d.seq, d.at, f"deliver #{d.message} -> {d.receiver}{' (duplicate)' if d.duplicate else ''}")
              for d in evidence.deliveries]
    for event in evidence.journal:
        at = (event.at - evidence.epoch_ms) / 1000
        lines.append((at + 0.0005, float("inf"), at, journal_line(event)))
    # sorted() is stable: journal events of one instant keep their journal order.
    return [f"{at:10.3f} {text}" for _, _, at, text in sorted(lines, key=lambda line: line[:2])]
