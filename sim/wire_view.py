"""The wire record as the checker reads it (sim/history.py): each message verified under its sender's key and
topic (once, on demand for the numerous kinds), copies told apart from originals, what a fault injected marked,
and the journal fact each message would make if the hub accepted it."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

from hub.events import Event, NodeBorn, NodeDied, ResultReported, StepReported
from protocols import Birth, Death, Message, StepEvent, StepResult

from .evidence import Evidence, Injected, open_record, sender_of

FactKey = tuple[Any, ...]


def message_key(message: Message) -> FactKey | None:
    """The journal fact a message makes when the hub accepts it (None: a message whose facts are not counted)."""
    src, body = message.header.src, message.body
    if isinstance(body, StepResult):
        return ("result", src, body.attempt, body.fence, body.ok)
    if isinstance(body, StepEvent) and body.event != "progress":
        return ("step", src, body.attempt, body.fence, body.event)
    if isinstance(body, Birth):
        return ("birth", src, message.header.boot)
    if isinstance(body, Death):
        return ("death", src, message.header.boot, body.reason)
    return None


def event_key(event: Event) -> FactKey | None:
    if isinstance(event, ResultReported):
        return ("result", event.node, event.attempt, event.fence, event.ok)
    if isinstance(event, StepReported):
        return ("step", event.node, event.attempt, event.fence, event.event)
    if isinstance(event, NodeBorn):
        return ("birth", event.node, event.boot)
    if isinstance(event, NodeDied):
        return ("death", event.node, event.boot, event.reason)
    return None


class WireView:
    """The wire record decoded once: messages of the kinds the invariants read, verified; the rest on demand."""

    KINDS = ("evt", "cmd", "birth", "death")

    def __init__(self, evidence: Evidence) -> None:
        self.evidence = evidence
        self.messages: dict[int, Message] = {}    # verified, of KINDS
        self.unverified: dict[int, str] = {}      # why, for any kind checked so far
        self.first: dict[bytes, int] = {}         # payload -> its first wire index (later ones are copies)
        self.injected: dict[int, Injected] = {}   # wire index -> the fault that put it there
        self.by_signer: dict[str, list[int]] = collections.defaultdict(list)
        self.ms: list[int] = [evidence.ms(r.at) for r in evidence.wire]
        self._times: dict[str, list[int]] = {}
        self._results: dict[tuple[str, str, int, bool], list[int]] | None = None
        injected = {(i.topic, i.payload): i for i in evidence.faults.injected}
        for index, record in enumerate(evidence.wire):
            first = self.first.setdefault(record.payload, index)
            fault = injected.get((record.topic, record.payload))
            if fault is not None and (fault.kind != "replayed" or first != index):
                self.injected[index] = fault  # a replay's original stays the sender's own
            who = sender_of(record.topic)
            if who is None:
                continue
            self.by_signer[who[0]].append(index)
            if who[1] in self.KINDS:
                self.opened(index)

    def opened(self, index: int) -> Message | None:
        """The verified message at `index`, or None (and why, in `unverified`)."""
        if index in self.messages:
            return self.messages[index]
        if index in self.unverified:
            return None
        opened = open_record(self.evidence.wire[index], self.evidence.keys)
        if isinstance(opened, str):
            self.unverified[index] = opened
            return None
        self.messages[index] = opened
        return opened

    def genuine(self, index: int) -> Message | None:
        """The verified message at `index` when it is the sender's own and its first copy on the wire."""
        if self.first[self.evidence.wire[index].payload] != index or index in self.injected:
            return None
        return self.opened(index)

    def around(self, signer: str, ms: int, window_ms: int) -> list[int]:
        """Wire indexes of the messages on `signer`'s topics within `window_ms` of `ms`."""
        indexes = self.by_signer.get(signer, [])
        times = self._times.get(signer)
        if times is None:
            times = self._times[signer] = [self.ms[i] for i in indexes]
        return indexes[bisect.bisect_left(times, ms - window_ms):bisect.bisect_right(times, ms + window_ms)]

    def results(self) -> dict[tuple[str, str, int, bool], list[int]]:
        """(node, attempt, fence, ok) -> the wire indexes of the genuine results that carried it."""
        if self._results is None:
            found: dict[tuple[str, str, int, bool], list[int]] = collections.defaultdict(list)
            for index, message in sorted(self.messages.items()):
                body = message.body
                if isinstance(body, StepResult) and self.genuine(index) is not None:
                    found[(message.header.src, body.attempt, body.fence, body.ok)].append(index)
            self._results = dict(found)
        return self._results


def refs(indexes: Sequence[int]) -> str:
    """Wire indexes as the FAIL lines name them: `#12, #40`."""
    return ", ".join(f"#{i}" for i in indexes[:4]) + (" ..." if len(indexes) > 4 else "") if indexes else "none seen"


