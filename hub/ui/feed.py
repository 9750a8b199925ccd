"""The live stream behind `GET /events` (Server-Sent Events): what changed, from the events the hub applies.

The hub calls `LiveFeed.applied` for every journaled event it applies (one of its observers, like the JSON mirror),
right after the core applied it, so `core.seq` is then that event's journal sequence number. The feed notes which
nodes, runs and hub state the event changed, and sends each changed thing's current state (never the event itself),
at most once per second per node or run (`COALESCE_S`): 5,000 nodes failing together make 5,000 row updates, not
15,000 events, and a node that flaps sends its latest state once a second.

Resuming. Every batch of updates ends with `id: N`: N is the journal sequence up to which the consumer now has the
state of everything (the watermark: below the oldest change still held back by the coalescing). A consumer that
reconnects with `Last-Event-ID: N` (browsers send it by themselves; a first connection may pass `?after=N` from a
snapshot's `seq`) gets the current state of every node and run changed after N, from an in-memory tail of the last
`TAIL` changes, then the live updates: nothing is missed, some things may come twice. Only the last update of a
batch carries the id, so a connection cut in the middle of a batch resumes before it. When N is older than the tail
(a long disconnection, or a hub restarted since: the tail starts empty), or not a position this hub has reached, the
stream says `reload` and ends: fetch the snapshot again and resume from its `seq`. docs/dashboard.md documents the
stream for other consumers.

It also keeps each node's last hour of telemetry for the charts (hub/ui/telemetry.py): telemetry is not journaled,
so it is not on the stream; the node page asks for it.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from protocols import Telemetry

from ..events import ActionTaken, AttemptAssigned, HubLoadChanged, NodeDied, NodeFailed, NodeRemoved
from ..mirror import touched_nodes
from .telemetry import TelemetryHistory
from .views import fleet_row, run_row

if TYPE_CHECKING:
    from ..events import Event
    from ..service import Hub

NODE: Final = "node"
RUN: Final = "run"
HUB: Final = "hub"
Key = tuple[str, str]  # (NODE, node id), (RUN, run id), (HUB, "")

COALESCE_S: Final = 1.0        # per node and per run, at most one update a second
TAIL: Final = 100_000          # (seq, thing changed) pairs kept for consumers that resume
FLUSH_GAP_S: Final = 0.05      # a burst of changes goes out in one batch, at most 20 batches a second
QUEUE_BATCHES: Final = 512     # batches waiting for one slow consumer; beyond, it is told to reload
RETRY_MS: Final = 1000         # how long a browser waits before it reconnects
TAKE_DOWNS: Final = (NodeFailed, NodeDied, NodeRemoved, ActionTaken)  # events that may move a node's attempts


class Coalescer:
    """What changed and what went out, as plain data with the time passed in (pure: no clock, no I/O).

    `note` records a change (the event's sequence number and what it changed) in the tail, and while consumers are
    connected (`tracking`) marks it due; `collect` gives what may go out now, each thing at most once per `spacing`
    seconds; `watermark` is the sequence up to which everything noted has gone out; `since` is what changed after a
    sequence, or None when the tail no longer reaches back that far."""

    def __init__(self, applied: int, tail: int = TAIL, spacing: float = COALESCE_S) -> None:
        self.applied = applied       # seq of the latest event noted (the core's)
        self.start = applied         # the tail holds every change after this
        self.tail: deque[tuple[int, Key]] = deque(maxlen=tail)
        self.spacing = spacing
        self.tracking = False
        self.dirty: dict[Key, int] = {}       # thing -> seq of its oldest change not yet sent
        self.sent_at: dict[Key, float] = {}   # thing -> when it last went out
        self._pruned = -math.inf

    def note(self, seq: int, keys: Iterable[Key]) -> None:
        self.applied = seq
        for key in keys:
            if len(self.tail) == self.tail.maxlen:
                self.start = self.tail[0][0]  # about to fall out: a resume from before it can no longer be served
            self.tail.append((seq, key))
            if self.tracking:
                self.dirty.setdefault(key, seq)

    def track(self, on: bool) -> None:
        """Consumers connected (or none left): only then is anything marked due."""
        self.tracking = on
        if not on:
            self.dirty.clear()
            self.sent_at.clear()

    def since(self, after: int) -> set[Key] | None:
        if after < self.start or after > self.applied:
            return None
        keys: set[Key] = set()
        for seq, key in reversed(self.tail):
            if seq <= after:
                break
            keys.add(key)
        return keys

    def collect(self, now: float) -> tuple[list[Key], float | None]:
        """What may go out at `now` (each then counts as sent), and in how many seconds the next thing held back
        is due (None: nothing is held back)."""
        due: list[Key] = []
        wait: float | None = None
        for key in list(self.dirty):
            # Measured as elapsed time, the way a consumer sees it: `sent + spacing <= now` can hold in floating point
            # while `now - sent` is a hair under the spacing.
            left = self.spacing - (now - self.sent_at.get(key, -math.inf))
            if left > 0:
                wait = left if wait is None else min(wait, left)
                continue
            del self.dirty[key]
            self.sent_at[key] = now
            due.append(key)
        if now - self._pruned >= self.spacing:  # a send time older than the spacing holds nothing back
            self._pruned = now
            self.sent_at = {k: t for k, t in self.sent_at.items() if t > now - self.spacing}
        return due, wait

    def watermark(self) -> int:
        oldest = min(self.dirty.values(), default=None)
        return self.applied if oldest is None else min(self.applied, oldest - 1)


def sse(event: str, data: Any, seq: int | None = None) -> bytes:
    """One Server-Sent Event. The data is one line of JSON (ASCII, so no line break a node wrote can end it)."""
    try:
        text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):  # bytes or a NaN somewhere: the API's own rules for them
        from ..api import SafeJSONResponse

        text = bytes(SafeJSONResponse(data).body).decode()
    return (f"event: {event}\n" + (f"id: {seq}\n" if seq is not None else "") + f"data: {text}\n\n").encode()


def render(hub: Hub, keys: Iterable[Key], seq: int) -> bytes:
    """The current state of each thing, as one batch whose last event carries `seq`."""
    core = hub.core
    events: list[tuple[str, Any]] = []
    for kind, ident in keys:
        if kind == NODE:
            events.append((NODE, fleet_row(core, hub.views, ident) or {"id": ident, "gone": True}))
        elif kind == RUN:
            events.append((RUN, run_row(core, ident) or {"id": ident, "gone": True}))
        else:
            events.append((HUB, {"overloaded": core.overloaded}))
    if not events:
        return b""
    last = len(events) - 1
    return b"".join(sse(name, data, seq if i == last else None) for i, (name, data) in enumerate(events))


@dataclass(eq=False)
class Subscriber:
    """One connected consumer: batches to write, and why it must reload (then its stream ends)."""

    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_BATCHES))
    reload: str | None = None

    def end(self, reload: str | None = None) -> None:
        self.reload = self.reload or reload
        while not self.queue.empty():  # what is queued is stale now: the reload, or nothing, replaces it
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class LiveFeed:
    """The hub's observer for the dashboard: changes noted on the core loop (cheap), sent by `run`."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.changes = Coalescer(hub.core.seq)
        self.telemetry = TelemetryHistory()
        self.subscribers: set[Subscriber] = set()
        # node -> runs with an attempt placed on it: a node going down changes those runs without naming them
        self._runs_on: dict[str, set[str]] = {}
        for attempt in hub.core.live_attempts():
            self._runs_on.setdefault(attempt.node, set()).add(attempt.run)
        self._wake = asyncio.Event()

    # -- the hub's side: on the core loop ---------------------------------------------------------------------------

    def applied(self, event: Event) -> None:
        keys = self._changed(event)
        self.changes.note(self.hub.core.seq, keys)
        if keys and self.changes.tracking:
            self._wake.set()

    def node_message(self, node_id: str, body: Any) -> None:
        if isinstance(body, Telemetry) and node_id in self.hub.core.nodes:
            self.telemetry.add(node_id, body.at or self.hub.clock(), body.metrics)

    def _changed(self, event: Event) -> set[Key]:
        core = self.hub.core
        keys: set[Key] = {(NODE, node) for node in touched_nodes(core, event)}
        attempt = core.attempts.get(getattr(event, "attempt", None) or "")
        run_id = getattr(event, "run", None) or (attempt.run if attempt is not None else None)
        if run_id:
            keys.add((RUN, run_id))
        if isinstance(event, AttemptAssigned):
            runs = self._runs_on.setdefault(event.node, set())
            runs.add(event.run)
            if len(runs) > 32:  # keep it to runs still going (finished ones are never pruned otherwise)
                runs.intersection_update(core.active)
        elif isinstance(event, TAKE_DOWNS):
            runs = self._runs_on.get(event.node, set())
            keys.update((RUN, r) for r in runs)
            runs.intersection_update(core.active)
            if isinstance(event, NodeRemoved) and event.forget:
                self.telemetry.forget(event.node)
                self._runs_on.pop(event.node, None)
        elif isinstance(event, HubLoadChanged):
            keys.add((HUB, ""))
        return keys

    # -- consumers ----------------------------------------------------------------------------------------------------

    def subscribe(self, after: int | None) -> tuple[Subscriber, bytes]:
        """A new consumer, and what it gets first: the retry delay, then (resuming after `after`) the current state of
        what changed since and `hello`, or `reload` (its stream then ends)."""
        subscriber = Subscriber()
        head = [f"retry: {RETRY_MS}\n\n".encode()]
        if after is not None:
            keys = self.changes.since(after)
            if keys is None:
                subscriber.end(f"cannot resume after {after}: this hub can resume from {self.changes.start} to "
                               f"{self.changes.applied}; load the snapshot again")
                return subscriber, b"".join(head)
        if not self.subscribers:
            self.changes.track(True)
        self.subscribers.add(subscriber)
        watermark = self.changes.watermark()
        if after is not None and keys:
            head.append(render(self.hub, sorted(keys), watermark))
        # After what it missed, so its id holds: a consumer that resumed has everything up to it. One that did not
        # (no position given) gets no id: it has nothing yet.
        head.append(sse("hello", {"seq": watermark, "coalesce_ms": int(COALESCE_S * 1000)},
                        watermark if after is not None else None))
        self._wake.set()
        return subscriber, b"".join(head)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        if not self.subscribers:
            self.changes.track(False)

    async def run(self, stop: asyncio.Event) -> None:
        """Send what changed to every consumer until `stop` (then their streams end)."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                wait: float | None = None
                if self.subscribers:
                    due, wait = self.changes.collect(loop.time())
                    if due:
                        self._broadcast(render(self.hub, due, self.changes.watermark()))
                self._wake.clear()
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait({woken, stopping}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not stop.is_set():
                    await asyncio.sleep(FLUSH_GAP_S)  # rate, not a wait for something: more changes join the batch
        finally:
            stopping.cancel()
            for subscriber in list(self.subscribers):
                subscriber.end()

    def _broadcast(self, batch: bytes) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber.queue.put_nowait(batch)
            except asyncio.QueueFull:
                self.unsubscribe(subscriber)
                subscriber.end("this consumer fell behind the stream; load the snapshot again")
