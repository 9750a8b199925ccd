"""Each sender's order restored from (boot, seq), for messages that reach the core by several paths at once.

With `hub run --ingest-workers N`, Mosquitto hands the messages of a shared subscription to the N workers in turn, so
two messages of one node can overtake each other on their way to the core. `ReorderBuffer` releases every sender's
messages in (boot, seq) order, a boot's death certificate (seq 0, the Last Will) after everything of its boot:

- the next seq of the current boot is released at once, with whatever it unblocks;
- a seq past a gap waits, until the gap fills, `timeout_ms` passes (the missing message was lost, shed, or sent
  before the hub listened), the sender holds `per_sender` messages, or the buffer `total`: then the gap is skipped;
- a newer boot releases everything of the older one first (its session is over);
- what arrives behind what was released (a duplicate, an older boot, a seq whose gap was skipped, anything of a boot
  after its death) is released at once as `late`: the core never accepts it, but the replay window still judges it
  (a broker's duplicate is refused as a replay and read by the clone watch, hub/clones.py).

The buffer is pure: the caller passes `now` (ms) and reads what comes out. It starts each sender from the core's
replay mark, so after a restart it waits for the seq after the last one the hub accepted. It only orders; the
replay window (protocols/replay.py, durable as the journal's marks) stays the one judge of what is accepted once.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from protocols import Death, Message, RemoteProtocolError, Replayed, ReplayWindow

T = TypeVar("T")
Mark = tuple[int, int, bool]  # (boot, highest seq accepted, death certificate seen), as ReplayWindow.mark()

# How long messages wait for an earlier one of their node before the gap is given up. A real gap is rare (a QoS 0
# message the broker dropped); a false one is not: under load a worker's messages reach the core later than another's
# (its broker queue and its socket to the core run deeper), and a gap given up too soon turns the earlier message,
# still on its way, into a late one, refused. bench/ingest.py at saturation with two workers: at 250 ms, 18,000 gaps
# given up and 26,000 messages refused as late in 6 s (28% of what came in); at 1 s and at 2 s, none.
DEFAULT_TIMEOUT_MS = 2000
DEFAULT_PER_SENDER = 64
DEFAULT_TOTAL = 20_000


class ArrivedLate(RemoteProtocolError):
    """Released out of order by the reorder buffer: applying it would put a node's messages out of order."""

    reason = "late"


def would_accept(window: ReplayWindow | None, message: Message) -> bool:
    """Whether the replay window would accept this message now (without moving the window)."""
    header = message.header
    if window is None:
        return True
    if isinstance(message.body, Death):
        return header.boot == window.boot and not window.death_seen
    try:
        window.check(header.boot, header.seq)
    except Replayed:
        return False
    return header.seq != 0


class Released(NamedTuple, Generic[T]):
    """A message the buffer lets go; `late`: behind its sender's order (for the replay window, never applied). A named
    tuple: one is built per message."""

    item: T
    late: bool = False


@dataclass(slots=True)
class _Sender(Generic[T]):
    boot: int
    top: int                      # highest seq released in `boot`
    ended: bool                   # the death of `boot` was released: nothing more of it is in order
    pending: dict[int, tuple[T, int]] = field(default_factory=dict)  # seq -> (item, arrived at)
    death: tuple[T, int] | None = None
    generation: int = 0           # the heap entries of older generations are stale

    def held(self) -> int:
        return len(self.pending) + (self.death is not None)

    def oldest(self) -> int:
        times = [at for _, at in self.pending.values()]
        if self.death is not None:
            times.append(self.death[1])
        return min(times)


class ReorderBuffer(Generic[T]):
    def __init__(self, mark_of: Callable[[Hashable], Mark | None], timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 per_sender: int = DEFAULT_PER_SENDER, total: int = DEFAULT_TOTAL) -> None:
        """`mark_of(sender)`: the core's replay mark for a sender the buffer has not seen yet (None: none)."""
        self.mark_of, self.timeout_ms, self.per_sender, self.total = mark_of, timeout_ms, per_sender, total
        self.held = 0           # messages waiting, every sender together
        self.gaps_skipped = 0   # gaps given up on (timeout or a bound)
        self.late = 0           # released out of order
        self._senders: dict[Hashable, _Sender[T]] = {}
        self._due: list[tuple[int, int, Hashable]] = []  # (when its oldest held message is due, generation, sender)

    def offer(self, sender: Hashable, boot: int, seq: int, item: T, now: int) -> list[Released[T]]:
        """One message (seq 0: a death certificate) of `sender`; returns what is released now, in order. The hub's
        sender is (node id, kid): a node given a new key may count its boots from 1 again, and its window with it."""
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = self._seed(sender)
        elif (seq == state.top + 1 and boot == state.boot and seq and not state.pending and state.death is None
              and not state.ended):
            # The common case, next in order with nothing held: what the steps below come to, taken directly.
            state.top = seq
            return [Released(item)]
        out: list[Released[T]] = []
        if boot < state.boot:
            return self._late(item)
        if boot > state.boot:
            out += [Released(held) for held in self._take_all(state)]
            state.boot, state.top, state.ended = boot, 0, False
        if state.ended or seq in state.pending or (seq != 0 and seq <= state.top) or (seq == 0 and state.death):
            return out + self._late(item)
        if seq == 0:
            state.death = (item, now)
            self.held += 1
        elif seq == state.top + 1:
            out.append(Released(item))
            state.top = seq
        else:
            state.pending[seq] = (item, now)
            self.held += 1
        waited = state.held()
        out += self._drain(state)
        if len(state.pending) > self.per_sender:
            out += self._skip_gap(state)
        if waited:  # what is held changed: its due time too
            self._schedule(sender, state)
        while self.held > self.total:
            out += self._release_oldest()
        return out

    def expire(self, now: int) -> list[Released[T]]:
        """Skip the gaps that have waited `timeout_ms`."""
        out: list[Released[T]] = []
        while self._due and self._due[0][0] <= now:
            _, generation, sender = heapq.heappop(self._due)
            state = self._senders[sender]
            if generation != state.generation:
                continue
            out += self._skip_gap(state)
            self._schedule(sender, state)
        return out

    def next_due(self) -> int | None:
        """When `expire` next has something to release (ms), if anything waits."""
        while self._due and self._due[0][1] != self._senders[self._due[0][2]].generation:
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else None

    # -- inside --------------------------------------------------------------------------------------------------

    def _seed(self, sender: Hashable) -> _Sender[T]:
        mark = self.mark_of(sender)
        return _Sender(-1, 0, False) if mark is None else _Sender(mark[0], mark[1], mark[2])

    def _late(self, item: T) -> list[Released[T]]:
        self.late += 1
        return [Released(item, late=True)]

    def _drain(self, state: _Sender[T]) -> list[Released[T]]:
        """What follows the released top without a gap; the death once nothing of its boot waits."""
        out: list[Released[T]] = []
        while state.top + 1 in state.pending:
            state.top += 1
            out.append(Released(state.pending.pop(state.top)[0]))
        if state.death is not None and not state.pending and state.top >= 1:
            out.append(Released(state.death[0]))
            state.death, state.ended = None, True
        self.held -= len(out)
        return out

    def _skip_gap(self, state: _Sender[T]) -> list[Released[T]]:
        """Give up on the first gap: release from the lowest seq waiting (or the death, if only it waits)."""
        if state.pending:
            state.top = min(state.pending) - 1
            self.gaps_skipped += 1
            return self._drain(state)
        if state.death is not None:
            item = state.death[0]
            state.death, state.ended = None, True
            self.held -= 1
            self.gaps_skipped += 1
            return [Released(item)]
        return []

    def _take_all(self, state: _Sender[T]) -> list[T]:
        """Everything held for a sender whose boot is over, in order, the death last."""
        items = [state.pending[seq][0] for seq in sorted(state.pending)]
        if state.death is not None:
            items.append(state.death[0])
        self.held -= len(items)
        state.pending, state.death = {}, None
        state.generation += 1
        return items

    def _schedule(self, sender: Hashable, state: _Sender[T]) -> None:
        state.generation += 1
        if state.held():
            heapq.heappush(self._due, (state.oldest() + self.timeout_ms, state.generation, sender))

    def _release_oldest(self) -> list[Released[T]]:
        while True:
            _, generation, sender = heapq.heappop(self._due)  # something is held, so something is scheduled
            state = self._senders[sender]
            if generation == state.generation:
                out = self._skip_gap(state)
                self._schedule(sender, state)
                return out
