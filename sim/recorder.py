"""The wire recorder of `fleetflow sim` and `fleetflow demo`: one more MQTT client, with its own client id, subscribed
to `fleetflow/v1/{fleet}/#` before any device starts, that keeps every message the broker delivers to it (arrival
time, topic, payload bytes) for the history checker (sim/history.py).

Its records have the form of the in-memory broker's wire log (agent/runtime/memory.py `WireRecord`), so the
deterministic simulation and a run against a real broker are judged by one checker. What a subscriber cannot know is
filled in plainly: the sender is the id the topic names (whether it signed it is for the checker to find out), a
Will looks like any other message, and every record reached the broker. While the recorder is disconnected (a broker
restart) messages pass unseen: each such gap is kept, so the checker knows where the record is incomplete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.runtime.memory import WireRecord
from agent.runtime.storage import write_private
from agent.runtime.timeouts import within
from agent.runtime.transport import BrokerSettings, MqttTransport, TransportError

log = logging.getLogger("fleetflow.sim.recorder")

RECONNECT_S = 0.1   # after a broker restart, the devices must not get far ahead of the recorder
SUBSCRIBED_S = 15.0  # the first subscription is in place within this, or the run does not start


@dataclass(frozen=True, slots=True)
class Gap:
    """Wall-clock ms during which the recorder was not subscribed."""

    start_ms: int
    end_ms: int


@dataclass
class Recording:
    epoch_ms: int                                   # wall clock at the start: a record's `at` counts seconds from it
    records: list[WireRecord] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """JSON lines, one per record in order (the checker's #n is line n + 1): ms, topic, payload as hex; then the
        gaps. What a FAIL line names can be looked up here (`fleetflow protocol inspect` opens a payload). Mode 0600:
        the payloads include enrollment replies, broker passwords and all."""
        lines = [json.dumps({"index": index, "ms": self.epoch_ms + round(record.at * 1000), "topic": record.topic,
                             "payload": record.payload.hex()}) + "\n" for index, record in enumerate(self.records)]
        lines += [json.dumps({"gap": [gap.start_ms, gap.end_ms]}) + "\n" for gap in self.gaps]
        write_private(path, "".join(lines).encode())


def claimed_sender(topic: str) -> str:
    """The id a topic names: `node/{id}/...` or `hub/...`."""
    parts = topic.split("/")
    if len(parts) >= 5 and parts[3] == "node":
        return parts[4]
    return parts[3] if len(parts) >= 4 else "?"


class WireRecorder:
    """`await recorder.start()` (returns once subscribed), then `recording = await recorder.stop()`."""

    def __init__(self, broker: str, fleet: str, client_id: str | None = None) -> None:
        self.fleet = fleet
        self.client_id = client_id or f"fleetflow-recorder-{os.getpid()}"
        self.transport = MqttTransport(BrokerSettings(broker, keepalive=5))
        self.recording = Recording(int(time.time() * 1000))
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lost_at: int | None = None  # wall ms when the subscription was lost, while it is

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wire recorder")
        try:
            await within(SUBSCRIBED_S, self._subscribed.wait())
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"the wire recorder could not subscribe to the broker within {SUBSCRIBED_S:g} s") \
                from None

    async def stop(self) -> Recording:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._close_gap()
        return self.recording

    def _record(self, topic: str, payload: bytes) -> None:
        records = self.recording.records
        at = time.time() - self.recording.epoch_ms / 1000
        records.append(WireRecord(at, claimed_sender(topic), topic, payload, 1, False, False, True, len(records)))

    def _close_gap(self) -> None:
        if self._lost_at is not None:
            self.recording.gaps.append(Gap(self._lost_at, int(time.time() * 1000)))
            log.info("wire recorder: nothing recorded for %d ms", self.recording.gaps[-1].end_ms - self._lost_at)
            self._lost_at = None

    async def _run(self) -> None:
        while True:
            try:
                async with self.transport.connect(self.client_id, None) as session:
                    await session.subscribe(f"fleetflow/v1/{self.fleet}/#", qos=1)
                    self._close_gap()
                    self._subscribed.set()
                    async for topic, payload in session.messages():
                        self._record(topic, payload)
            except TransportError as exc:
                log.info("wire recorder disconnected: %s", exc)
            if self._lost_at is None and self._subscribed.is_set():
                self._lost_at = int(time.time() * 1000)
            await asyncio.sleep(RECONNECT_S)
