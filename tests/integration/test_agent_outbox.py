"""The outbox across a broker outage and kill -9 (real processes); when it is full, and the fsync that comes before
anything of it leaves the device (the real hub and agent in one process, on the in-memory broker)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.runtime.memory import MemoryBroker, MemoryTransport
from agent.runtime.transport import Session, Will
from protocols import Ack, ProtocolError, cbor, envelope, open_envelope
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.memoryfleet import MemoryFleet, run_fleet
from tests.nodewire import observed
from tests.waiting import wait


def outbox_results(data: Path) -> int:
    db = sqlite3.connect(data / "outbox.sqlite")
    try:
        return int(db.execute("SELECT COUNT(*) FROM entries WHERE type = 'result'").fetchone()[0])
    finally:
        db.close()


def outbox_counter(data: Path, name: str) -> int:
    db = sqlite3.connect(data / "outbox.sqlite")
    try:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


THREE_NAPS = """
name: three-naps
version: 1.0.0
steps:
  - {id: s0, uses: sleep, with: {seconds: 1.0}, retry: {max_attempts: 1}}
  - {id: s1, uses: sleep, with: {seconds: 1.3}, retry: {max_attempts: 1}}
  - {id: s2, uses: sleep, with: {seconds: 1.6}, retry: {max_attempts: 1}}
"""


def test_results_survive_broker_outage_and_kill9(mosquitto: Broker, tmp_path: Path) -> None:
    broker = mosquitto
    hub = HubProcess(broker, "f-outage", tmp_path / "hub").start()
    # Heartbeats 10 s apart: the hub declares a node failed after 3 silent heartbeats, so through this outage it keeps
    # waiting for these very attempts, and the results that come back from the outbox are the ones it accepts.
    agent = AgentProcess(broker, hub.fleet, "n1", tmp_path / "n1" / "data", hub.public_key,
                         ("--heartbeat", "10", "--max-concurrent", "4")).start()
    hub.agents.append(agent)
    try:
        with observed(broker, agent) as before:
            first_boot = wait(lambda: before.of("birth"), 20, "birth")[0].header.boot
            run_id = hub.submit(THREE_NAPS)
            wait(lambda: len(before.events("started")) == 3, 10, "three started")
            broker.kill()  # at once, while the steps run: their results can only go to disk (an acked one would not)
            assert not before.results(), "a step ended before the broker went down: its result may have been acked"
        try:
            wait(lambda: outbox_results(agent.data) == 3, 15, "three results on disk")
            agent.kill()  # kill -9 with the results only on disk
            agent.start()  # restarts while the broker is still down: its first connection fails, so it exits (1)
            assert agent.wait_exit(30) == 1, agent.log()[-2000:]
        finally:
            broker.start()
        with observed(broker, agent) as after:
            hub.wait(lambda: hub.get("/health")["connected"], 30, "the hub back on the broker")
            agent.start()  # as a service manager's Restart= does
            run = hub.wait_run(run_id, 30)
            assert run["state"] == "succeeded", run
            # The hub accepted the results the outbox kept: each step has the one attempt it assigned before.
            assigned = {s["id"]: [a["id"] for a in s["attempts"]] for s in run["steps"]}
            assert all(len(ids) == 1 for ids in assigned.values()), assigned
            wait(lambda: outbox_results(agent.data) == 0, 10, "acknowledged results deleted")
            results = after.results()  # acknowledged, so nothing more is sent: each result once, in order
            assert [(r.step, r.attempt) for r in results] == [(s, assigned[s][0]) for s in ("s0", "s1", "s2")]
            assert all(r.ok for r in results)
            eids = [r.eid for r in results]
            assert eids == sorted(eids)
            # one boot per start and per session; the killed start and the failed one each took one
            assert after.of("result")[0].header.boot > first_boot + 1
            assert not after.refused
    finally:
        hub.stop()


class AcksLost:
    """A node's link that loses every acknowledgement of its events on the way in while `losing` (assignments and
    everything else arrive): its results then wait in its outbox, unacknowledged, however often they are sent."""

    def __init__(self, link: MemoryTransport, hub_key: bytes) -> None:
        self.link, self.hub_key, self.losing = link, hub_key, True

    def is_ack(self, topic: str, payload: bytes) -> bool:
        try:
            body = open_envelope(payload, topic, self.hub_key).body
        except ProtocolError:
            return False  # not the hub's: the agent judges it
        return isinstance(body, Ack) and body.enroll is None  # an enrollment verdict is an Ack too: it arrives

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str, will: Will | None) -> AsyncIterator[Session]:
        async with self.link.connect(client_id, will) as session:
            yield _LosingSession(session, self)


class _LosingSession:
    def __init__(self, session: Session, link: AcksLost) -> None:
        self.session, self.link = session, link

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        await self.session.publish(topic, payload, qos, retain)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        await self.session.subscribe(topic_filter, qos)

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        async for topic, payload in self.session.messages():
            if not (self.link.losing and self.link.is_ack(topic, payload)):
                yield topic, payload

    async def closed(self) -> None:
        await self.session.closed()


# Twelve steps with results of ~600 bytes: more than the outbox below holds unacknowledged.
FILL = {"name": "fill", "version": "1.0.0",
        "steps": [{"id": f"s{i}", "uses": "echo", "with": {"blob": "x" * 500}} for i in range(12)]}


def test_full_outbox_sheds_telemetry_keeps_results_and_refuses_work(tmp_path: Path) -> None:
    data = tmp_path / "n1"

    async def scenario(fleet: MemoryFleet) -> None:
        link = AcksLost(MemoryTransport(fleet.broker, "n1"), fleet.hub.public_key)
        # 2 slots x (1 KiB step limit + 1 KiB) are reserved, so new work is admitted below 8000 - 4096 bytes.
        fleet.start_agent("n1", link, outbox_max_bytes=8000, max_step_bytes=1024, max_concurrent=2, heartbeat=0.5,
                          telemetry=0.1)
        wire = fleet.wire("n1")
        await fleet.wait(lambda: fleet.online("n1"), 30, "n1 online")
        run_id = await fleet.submit(FILL)
        refused = await fleet.wait(lambda: wire.events("refused"), 60, "a refusal")
        assert refused[0].reason == "outbox-full"

        def finished_admitted() -> set[str]:
            """The attempts the agent admitted, once each of them has its result out."""
            started = {e.attempt for e in wire.events("started")}
            return started if started == {r.attempt for r in wire.results()} else set()

        admitted = await fleet.wait(finished_admitted, 30, "admitted steps done")
        assert len(admitted) >= 2
        assert outbox_results(data) == len(admitted)  # every admitted step's result is kept
        steps = fleet.hub.core.runs[run_id].steps.values()
        assert {a for s in steps if s.state == "succeeded" for a in s.attempts} == admitted  # the hub had them all

        fleet.broker.partition("n1", notice_after=2.0)  # offline: telemetry has to wait in the full outbox: shed
        await fleet.wait(lambda: outbox_counter(data, "shed") >= 5, 60, "telemetry shed while offline")
        fleet.broker.heal("n1")
        await fleet.wait(lambda: (hb := fleet.hub.views["n1"].heartbeat) is not None and hb.shed >= 5, 120,
                         "the shed count in a heartbeat the hub read")
        await fleet.wait(lambda: all(sum(r.attempt == a for r in wire.results()) >= 2 for a in admitted), 30,
                         "unacknowledged results sent again in the new session")
        assert outbox_results(data) == len(admitted)
        succeeded = [s for s in steps if s.state == "succeeded"]
        assert {a for s in succeeded for a in s.attempts} == admitted, "each result accepted once"

        link.losing = False  # acknowledgements get through again: the results are deleted, and work resumes
        await fleet.wait(lambda: outbox_results(data) == 0, 60, "results deleted after their ack")
        assert await fleet.wait(lambda: fleet.finished(run_id), 300, "the run") == "succeeded"

    run_fleet(tmp_path, scenario)


def test_a_step_event_leaves_the_device_only_after_an_fsync_that_covers_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Power loss must not take back what the hub was told: every step event and result on the wire was in the outbox
    when an fsync began, and that fsync had returned before the message reached the broker."""
    brokers: list[MemoryBroker] = []
    syncs: list[tuple[int, int]] = []  # per fsync: (the outbox's last eid as it began, the wire's length as it ended)
    real_sync = Outbox.sync

    def recorded_sync(self: Outbox) -> None:
        last = self._db.execute("SELECT COALESCE(MAX(eid), 0) FROM entries").fetchone()[0]
        real_sync(self)
        syncs.append((last, len(brokers[0].wire)))

    monkeypatch.setattr(Outbox, "sync", recorded_sync)

    async def scenario(fleet: MemoryFleet) -> None:
        brokers.append(fleet.broker)
        fleet.start_agent("n1", max_concurrent=4)
        await fleet.wait(lambda: fleet.online("n1"), 30, "n1 online")
        run_id = await fleet.submit(FILL)
        assert await fleet.wait(lambda: fleet.finished(run_id), 120, "the run") == "succeeded"

    run_fleet(tmp_path, scenario)
    checked = 0
    for index, record in enumerate(brokers[0].wire):
        if not record.reached or not record.topic.endswith("/n1/evt"):
            continue
        eid = cbor.loads(envelope.parse(record.payload).payload)["eid"]
        assert any(last >= eid and ended <= index for last, ended in syncs), (
            f"entry {eid} reached the broker (wire record {index}) before an fsync covering it returned: {syncs}")
        checked += 1
    assert checked >= 2 * len(FILL["steps"])  # a started and a result per step, at least
