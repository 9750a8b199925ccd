"""The hub's intake: inbound MQTT messages between the broker connection and the core loop.

Bad traffic must never displace good. So a message is screened before it takes queue space (size, envelope, a
trusted kid owned by the node its topic names: no signature check yet), then queued in a lane by what it carries:

    state      birth, death, step events and results   never shed while the hub has memory for them
    heartbeat  liveness                                  shed only after every telemetry sample
    enroll     enrollment requests                       a few per node id (agents ask again with backoff)
    telemetry  metrics                                   shed first

Each sender has a quota per kind, so one node id flooded with forged signatures (a kid is public) fills only its
own share of that kind: a flood of forged step events for a node cannot crowd out its birth or death. Nothing is dropped uncounted: the MQTT client acknowledges a QoS 1 message once `put_nowait` returns, so
every message given to the intake is either queued or counted as shed (`shed`, by kind and reason). The core loop
takes batches lane by lane, state first, with a share kept for heartbeats so a state flood cannot starve liveness.

`pressure_ms`, `backlog_ms` and `oldest_ms` tell the hub it is behind, and then it suspends liveness decisions: a silence that
may be its own is never held against a node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from agent.runtime.logs import ThrottledLog
from agent.runtime.timeouts import within
from protocols import ProtocolError, Receiver

log = logging.getLogger("fleetflow.hub")

BACKLOG_LASTS_MS: Final = 500
LANES: Final = ("state", "heartbeat", "enroll", "telemetry")
KIND_LANE: Final = {"birth": "state", "death": "state", "evt": "state", "hb": "heartbeat", "enroll": "enroll",
                    "tel": "telemetry"}


@dataclass(frozen=True)
class IntakeLimits:
    """Queue bounds. Per-sender quotas (by message kind) isolate a flooded node id; the totals bound memory."""

    state_total: int = 100_000
    bulk_total: int = 50_000          # heartbeats and telemetry together
    enroll_total: int = 2_000
    per_sender: tuple[tuple[str, int], ...] = (("evt", 2_000), ("birth", 16), ("death", 16), ("hb", 512),
                                               ("tel", 64), ("enroll", 4))


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    at: int          # arrival, ms since the epoch
    sender: str
    kind: str
    opened: Any = None  # an ingest worker opened it (hub/ingest/): only the replay check is left


class Intake:
    """A bounded, prioritised queue that aiomqtt puts received messages in (`put_nowait`, `qsize`) and that the
    hub's core loop drains in batches with `take` (nobody iterates the client's messages)."""

    def __init__(self, fleet: str, receiver: Receiver, clock_ms: Callable[[], int],
                 limits: IntakeLimits = IntakeLimits()) -> None:
        self.prefix = f"fleetflow/v1/{fleet}/node/"
        self.receiver, self.clock_ms, self.limits = receiver, clock_ms, limits
        self._lanes: dict[str, collections.deque[Inbound]] = {lane: collections.deque() for lane in LANES}
        self._per_sender: collections.Counter[tuple[str, str]] = collections.Counter()  # (sender, kind) queued
        self._quota = dict(limits.per_sender)
        self._ready = asyncio.Event()
        self.refused: collections.Counter[str] = collections.Counter()          # by reason, at screening
        self.shed: collections.Counter[tuple[str, str]] = collections.Counter()  # by (kind, reason)
        self.queued: collections.Counter[str] = collections.Counter()            # by kind, ever queued
        self.pressure_ms = 0  # last time the queues themselves were full (not one sender over its quota)
        self.backlog_ms = 0   # last time the socket had stayed saturated for BACKLOG_LASTS_MS
        self._saturated_since: int | None = None
        self.log = ThrottledLog(log, clock=lambda: self.clock_ms() / 1000)  # the hub's clock, even for log pacing

    # -- the aiomqtt side ------------------------------------------------------------------------------------------

    def put_nowait(self, message: Any) -> None:
        payload = message.payload
        self.offer(str(message.topic), payload if isinstance(payload, bytes) else bytes(str(payload), "utf-8"))

    def qsize(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    # -- screening and queueing ------------------------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes, opened: Any = None, at: int | None = None) -> bool:
        """Screen and queue one message; False if it was refused or shed (and counted). One an ingest worker
        `opened` passed every check screening makes; `at`: when the worker received it."""
        if not topic.startswith(self.prefix):
            return False  # not ours to read (the broker only sends what the hub subscribed to)
        sender, _, kind = topic[len(self.prefix):].partition("/")
        lane = KIND_LANE.get(kind)
        if lane is None:
            return False  # our own commands, or a kind this hub does not read
        try:
            # A node's kid is public, so births and deaths (one per session, and what liveness hangs on) are verified
            # here: forgeries never take the queue space of the real ones.
            if opened is None:
                self.receiver.screen(topic, payload, verify=kind in ("birth", "death"))
        except ProtocolError as exc:
            self.refused[exc.reason] += 1
            self.log.warning(exc.reason, f"refused {exc.reason} at screening: {topic[:120]}: {exc}")
            return False
        limits, queue = self.limits, self._lanes[lane]
        if self._per_sender[(sender, kind)] >= self._quota.get(kind, 0):
            return self._shed(kind, "sender-quota", topic)
        if lane in ("heartbeat", "telemetry"):
            if len(self._lanes["heartbeat"]) + len(self._lanes["telemetry"]) >= limits.bulk_total:
                if lane == "telemetry" or not self._lanes["telemetry"]:
                    return self._shed(kind, "queue-full", topic)
                displaced = self._lanes["telemetry"].popleft()  # a heartbeat is worth more than a metrics sample
                self._forget(displaced)
                self._shed("tel", "displaced", displaced.topic)
        elif len(queue) >= (limits.enroll_total if lane == "enroll" else limits.state_total):
            return self._shed(kind, "queue-full", topic)
        queue.append(Inbound(topic, payload, self.clock_ms() if at is None else at, sender, kind, opened))
        self._per_sender[(sender, kind)] += 1
        self.queued[kind] += 1
        self._ready.set()
        return True

    def _shed(self, kind: str, reason: str, topic: str) -> bool:
        self.shed[(kind, reason)] += 1
        if reason != "sender-quota" and kind not in ("enroll", "tel") or reason == "displaced":
            # The hub itself cannot keep up. A sender over its own quota says nothing of the hub (and anyone may
            # send enrollments), so it must not suspend liveness for the whole fleet.
            self.pressure_ms = self.clock_ms()
        self.log.warning(f"shed {kind} {reason}", f"shed a {kind} message ({reason}): {topic[:120]}")
        return False

    # -- the core loop's side --------------------------------------------------------------------------------------

    def take(self, limit: int) -> list[Inbound]:
        """Up to `limit` messages, state first; a quarter of the batch is kept for heartbeats while they wait."""
        out: list[Inbound] = []
        heartbeat_share = limit // 4 if self._lanes["heartbeat"] else 0
        for lane in LANES:
            room = limit - len(out) - (heartbeat_share if lane == "state" else 0)
            queue = self._lanes[lane]
            while room > 0 and queue:
                item = queue.popleft()
                self._forget(item)
                out.append(item)
                room -= 1
        if not self.qsize():
            self._ready.clear()  # a request's wake-up is answered by this batch too
        return out

    def note_backlog(self, saturated: bool) -> None:
        """After each socket read: `saturated` if it read a full burst and more was still waiting. Only a backlog
        that lasts counts (a burst of junk now and then must not suspend liveness): the reads stayed saturated for
        BACKLOG_LASTS_MS without one that drained the socket."""
        if not saturated:
            self._saturated_since = None
            return
        now = self.clock_ms()
        if self._saturated_since is None:
            self._saturated_since = now
        elif now - self._saturated_since >= BACKLOG_LASTS_MS:
            self.backlog_ms = now

    def wake(self) -> None:
        """Something else (an operator request) is waiting for the core loop."""
        self._ready.set()

    def _forget(self, item: Inbound) -> None:
        key = (item.sender, item.kind)
        left = self._per_sender[key] - 1
        if left:
            self._per_sender[key] = left
        else:
            del self._per_sender[key]  # bounded by what is queued, not by every id ever seen

    async def wait(self, timeout: float) -> None:
        """Until something is queued, or `timeout` seconds."""
        if self.qsize():
            return
        try:
            await within(timeout, self._ready.wait())
        except asyncio.TimeoutError:
            pass

    def oldest_ms(self) -> int | None:
        """Arrival time of the oldest message waiting in the state and heartbeat lanes (what liveness hangs on)."""
        heads = [q[0].at for q in (self._lanes["state"], self._lanes["heartbeat"]) if q]
        return min(heads) if heads else None
