"""A Sparkplug host's commands are operator actions, audited like the API's: the real hub and its Sparkplug bridge in
one process on the in-memory broker, a host application on its own connection. Every command the bridge acts on (a
rebirth, a drain) is one signed entry naming the host, the action, the device and the topic; refused commands are
counted and not audited; entries are written in a worker thread; a log that cannot be written loses the entry, never
the action. The same through Mosquitto and the real CLI: tests/system/test_sparkplug_acl_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.runtime.memory import MemoryBroker, MemoryTransport
from agent.runtime.transport import Session
from hub.audit import AuditLog, read_entries, verify
from hub.events import NodeBorn
from hub.service import Hub, HubConfig
from hub.sparkplug import sparkplug_b_pb2 as pb
from hub.sparkplug.edge import BORN, REBIRTH, DrainRequest, EdgeConfig, EdgeNode
from hub.sparkplug.settings import SparkplugSettings

T = TypeVar("T")
FLEET, HOST = "t", "scada"
DRAIN = "Device Control/Drain"
NCMD = f"spBv1.0/fleetflow/NCMD/{FLEET}"
DCMD = f"spBv1.0/fleetflow/DCMD/{FLEET}/%s"
WAIT_S = 60.0


def command(metric: pb.Payload.Metric) -> bytes:
    payload = pb.Payload(timestamp=1)
    payload.metrics.append(metric)
    return payload.SerializeToString()


def test_the_edge_node_says_when_it_answered_a_rebirth_request() -> None:
    """Only births a host's NCMD asked for are its action: not births a STATE brings, not a rebirth of false."""
    node = EdgeNode(EdgeConfig("fleetflow", FLEET, HOST))
    assert not node.connected(0, 1).rebirth
    asking = command(pb.Payload.Metric(name=REBIRTH, boolean_value=True))
    assert not node.received(NCMD, asking, 1).rebirth  # waiting for the host: its births will answer it
    assert not node.received(f"spBv1.0/STATE/{HOST}", b'{"online": true, "timestamp": 5}', 2).rebirth
    assert node.state == BORN
    assert not node.received(NCMD, command(pb.Payload.Metric(name=REBIRTH, boolean_value=False)), 3).rebirth
    answered = node.received(NCMD, asking, 4)
    assert answered.rebirth and [m.kind for m in answered.publish] == ["NBIRTH"]


class HostApp:
    """A Sparkplug host application on the in-memory broker: records what it reads, publishes what it is told."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seen: list[tuple[str, bytes]] = []

    async def read(self) -> None:
        async for topic, payload in self.session.messages():
            self.seen.append((topic, payload))

    def births(self, kind: str) -> list[pb.Payload]:
        return [pb.Payload.FromString(p) for t, p in self.seen if t.split("/")[2] == kind]


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Hub, HostApp]]:
    """A hub with --sparkplug --sparkplug-host scada --sparkplug-commands, a node n1 online, and the host online."""
    broker = MemoryBroker()
    config = HubConfig(broker="mqtt://memory.invalid", fleet=FLEET, data=tmp_path / "hub",
                       sparkplug=SparkplugSettings(host=HOST, commands=True))
    (tmp_path / "hub").mkdir()
    hub = Hub(config, transport=MemoryTransport(broker, "hub"))
    hub.transport.incoming = lambda maxsize=0: hub.intake  # type: ignore[attr-defined]  # as Hub does for MQTT
    hub.sparkplug.transport = MemoryTransport(broker, "sparkplug")  # type: ignore[attr-defined]
    running = asyncio.create_task(hub.run(api=False, first_connection_required=False))
    async with MemoryTransport(broker, HOST).connect(HOST, None) as session:
        host = HostApp(session)
        reader = asyncio.create_task(host.read())
        try:
            await session.subscribe("spBv1.0/#", qos=1)
            # A node that sends nothing: a heartbeat period of an hour keeps it online however slow the machine.
            await hub.request([NodeBorn(hub.clock(), "n1", 1, "rpi4", hb=3600.0)])
            await session.publish(f"spBv1.0/STATE/{HOST}", b'{"online": true, "timestamp": 1}', qos=1, retain=True)
            await until(lambda: host.births("DBIRTH"), "n1's DBIRTH")
            yield hub, host
        finally:
            reader.cancel()
            hub.stop()
            await asyncio.wait_for(asyncio.gather(running, reader, return_exceptions=True), WAIT_S)


async def until(predicate: Callable[[], T], what: str) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not (value := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def refused(hub: Hub, reason: str) -> float:
    return hub.metrics.registry.get_sample_value("fleetflow_sparkplug_refused_total", {"reason": reason}) or 0.0


def test_commands_acted_on_are_audited_and_refused_ones_only_counted(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    append_all = AuditLog.append_all

    def watched(self: AuditLog, records: Any) -> list[Any]:
        threads.append(threading.current_thread())
        return append_all(self, records)

    monkeypatch.setattr(AuditLog, "append_all", watched)

    async def scenario() -> None:
        async with fleet(tmp_path) as (hub, host):
            drain = next(m.alias for m in host.births("DBIRTH")[0].metrics if m.name == DRAIN)
            # Refused: counted, and no entry.
            await host.session.publish(DCMD % "n1", b"\xff not protobuf", qos=1)
            await host.session.publish(DCMD % "ghost", command(pb.Payload.Metric(alias=drain, boolean_value=True)),
                                       qos=1)
            await until(lambda: refused(hub, "malformed") == 1 and refused(hub, "unknown-device") == 1,
                        "two refusals counted")
            # Acted on: a rebirth, and a drain.
            await host.session.publish(NCMD, command(pb.Payload.Metric(name=REBIRTH, boolean_value=True)), qos=1)
            await host.session.publish(DCMD % "n1", command(pb.Payload.Metric(alias=drain, boolean_value=True)),
                                       qos=1)
            await until(lambda: hub.core.nodes["n1"].draining, "n1 drained")
            await until(lambda: len(list(read_entries(hub.config.data))) == 2, "two audit entries")
            assert len(host.births("NBIRTH")) == 2
            # A drain the hub cannot do is audited with the status the API would answer, and why.
            await hub.sparkplug._drain_node(DrainRequest("gone", True), DCMD % "gone")  # type: ignore[attr-defined]

    asyncio.run(scenario())
    entries = [entry for _, entry in read_entries(tmp_path / "hub")]
    assert [(e["action"], e["target"], e["status"], e["from"]) for e in entries] == [
        ("sparkplug.rebirth", FLEET, 200, f"mqtt:{NCMD}"), ("node.drain", "n1", 200, f"mqtt:{DCMD % 'n1'}"),
        ("node.drain", "gone", 404, f"mqtt:{DCMD % 'gone'}")]
    assert {(e["who"], e["role"]) for e in entries} == {(f"sparkplug:{HOST}", "operator")}
    assert entries[1]["params"] == {"on": True}
    assert entries[2]["params"] == {"on": True, "error": "no node 'gone' has announced itself"}
    verdict = verify(tmp_path / "hub")
    assert verdict.ok and verdict.entries == 3, verdict.message
    # Written off the event loop's thread, as the API's entries are: the loop never waits on an fsync.
    assert len(threads) == 3 and threading.main_thread() not in threads


def test_an_audit_log_that_cannot_be_written_loses_the_entry_not_the_drain(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "fleetflow.hub.sparkplug")

    async def scenario() -> None:
        async with fleet(tmp_path) as (hub, host):
            blocked = tmp_path / "not-a-directory"
            blocked.write_text("")
            hub.sparkplug.audit = AuditLog(blocked, lambda: hub.key)  # type: ignore[attr-defined]
            drain = next(m.alias for m in host.births("DBIRTH")[0].metrics if m.name == DRAIN)
            await host.session.publish(DCMD % "n1", command(pb.Payload.Metric(alias=drain, boolean_value=True)),
                                       qos=1)
            await until(lambda: hub.core.nodes["n1"].draining, "n1 drained")
            await until(lambda: "audit log: cannot record node.drain n1 by sparkplug:scada" in caplog.text,
                        "the audit failure logged")

    asyncio.run(scenario())
