"""`hub run --ingest-workers 2` on a real Mosquitto: the broker hands a shared subscription's messages to the two
workers in turn, yet every node's messages are applied in the order it sent them, and none twice, even when the
broker delivers some of them again. Judged from the journal file (`fleetflow journal export`), not from the API."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import nacl.signing
import psutil

from agent.protocol import AgentProtocol, HubTrust, NodeFacts
from tests.brokers import Broker
from tests.cli import ok
from tests.hubprocess import HubProcess
from tests.waiting import wait
from tests.wire import Publisher

FLEET = "fw"
NODES = [f"node-{i}" for i in range(6)]
STEPS = 40  # step events per node, each under an attempt id that says its place: node-3.a007
FACTS = NodeFacts("rpi4", "test", {}, ("echo",), 2, {"cpu": 4.0})


def journal(data: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in ok("journal", "export", "--data", data).splitlines()]


def test_two_workers_keep_each_nodes_order_and_accept_nothing_twice(tmp_path: Path) -> None:
    broker = Broker("mosquitto", tmp_path / "broker").start()
    hub = HubProcess(broker, FLEET, tmp_path / "hub" / "data", args=("--ingest-workers", "2"))
    publisher: Publisher | None = None
    try:
        hub.start()
        keys = {node: nacl.signing.SigningKey.generate() for node in NODES}
        for node, key in keys.items():
            ok("nodes", "add", node, bytes(key.verify_key).hex(), "--data", hub.data)
        # Sent at once: until the workers hear of the new keys (within a second), the core opens those messages
        # itself; either way they go through the reorder buffer.

        sent: list[tuple[str, bytes]] = []
        per_node: dict[str, list[tuple[str, bytes]]] = {}
        for node, key in keys.items():
            agent = AgentProtocol(key, FLEET, node, boot=1, hub=HubTrust(None), facts=FACTS, intervals=(5.0, 10.0),
                                  enrolled=True)
            messages = [agent.birth((), 0, 1_000)]
            messages += [agent.outbox_entry("step", {"run": "r1", "step": "s", "attempt": f"{node}.a{k:03d}",
                                                     "fence": 1, "event": "started"}, k, 1_000 + k)
                         for k in range(1, STEPS + 1)]
            per_node[node] = [(m.topic, m.payload) for m in messages]
        for k in range(STEPS + 1):  # the nodes interleaved, each in its own order
            sent += [per_node[node][k] for node in NODES]
        rng = random.Random(17)
        # The broker delivers some messages again (QoS 1 redelivery): right behind themselves, and much later.
        with_copies: list[tuple[str, bytes]] = []
        for index, message in enumerate(sent):
            with_copies.append(message)
            if rng.random() < 0.15:
                with_copies.append(message)
            if rng.random() < 0.15:
                with_copies.append(sent[rng.randrange(index + 1)])
        publisher = Publisher(broker)
        publisher.publish_all(with_copies, qos=1)

        def reported() -> list[dict[str, object]]:
            events = [e for e in journal(hub.data) if e["kind"] == "step_reported"]
            return events if len(events) >= len(NODES) * STEPS else []

        wait(reported, 90, "every step event in the journal")
        # Whatever else was still on its way has had time to arrive: copies come in behind their originals.
        wait(lambda: hub.metric("fleetflow_ingest_reorder_held") == 0, 60, "nothing held for reordering")
        events = journal(hub.data)
        for node in NODES:
            attempts = [e["attempt"] for e in events if e["kind"] == "step_reported" and e["node"] == node]
            assert attempts == [f"{node}.a{k:03d}" for k in range(1, STEPS + 1)], node
            born = [e for e in events if e["kind"] == "node_born" and e["node"] == node]
            assert len(born) == 1
        marks = {e["sender"]: (e["boot"], e["top"]) for e in events if e["kind"] == "replay_mark"}
        assert marks == {node: (1, STEPS + 1) for node in NODES}
        # The copies went through the workers and the reorder buffer, and the replay window refused every one.
        assert hub.metric("fleetflow_ingest_workers") == 2
        copies = len(with_copies) - len(sent)
        assert hub.metric('fleetflow_rejected_total{reason="replayed"}') + \
            hub.metric('fleetflow_rejected_total{reason="late"}') == copies
        assert hub.metric("fleetflow_ingest_reorder_late") >= hub.metric('fleetflow_rejected_total{reason="replayed"}')
    finally:
        if publisher is not None:
            publisher.close()
        hub.stop()
        broker.stop()


def test_workers_learn_new_keys_skip_a_gap_after_its_timeout_and_resume_from_the_journaled_marks(
        tmp_path: Path) -> None:
    broker = Broker("mosquitto", tmp_path / "broker").start()
    hub = HubProcess(broker, FLEET, tmp_path / "hub" / "data", args=("--ingest-workers", "1"))
    publisher: Publisher | None = None
    try:
        hub.start()
        key = nacl.signing.SigningKey.generate()
        ok("nodes", "add", "late", bytes(key.verify_key).hex(), "--data", hub.data)  # the worker has not heard of it
        agent = AgentProtocol(key, FLEET, "late", boot=1, hub=HubTrust(None), facts=FACTS, intervals=(5.0, 10.0),
                              enrolled=True)
        publisher = Publisher(broker)
        sent = 0

        def step() -> tuple[str, bytes]:
            nonlocal sent
            sent += 1
            message = agent.outbox_entry("step", {"run": "r1", "step": "s", "attempt": f"late.a{sent:03d}", "fence": 1,
                                                  "event": "started"}, sent, 1_000 + sent)
            return message.topic, message.payload

        def applied(*numbers: int) -> bool:
            reported = {e["attempt"] for e in journal(hub.data) if e["kind"] == "step_reported"}
            return {f"late.a{n:03d}" for n in numbers} <= reported

        publisher.publish_all([(m.topic, m.payload) for m in [agent.birth((), 0, 1_000)]], qos=1)

        def opened_by_the_worker() -> bool:
            # The core opens what comes under a key the worker does not know yet; within a second it does.
            before = hub.metric("fleetflow_ingest_opened_by_core")
            publisher.publish_all([step()], qos=1)  # type: ignore[union-attr]
            wait(lambda: applied(sent), 30, f"step event {sent} in the journal")
            return hub.metric("fleetflow_ingest_opened_by_core") == before

        wait(opened_by_the_worker, 60, "a message of the node added while the hub ran opened by the worker")
        # A message lost on its way: those behind it wait for it (2 s), then go on without it.
        step()
        publisher.publish_all([step(), step()], qos=1)
        wait(lambda: applied(sent - 1, sent), 30, "the messages behind a gap applied")
        assert not applied(sent - 2)
        assert hub.metric("fleetflow_ingest_reorder_gaps_skipped") == 1
        # After a restart the buffer starts from each node's journaled mark: the next message waits for nothing.
        hub.stop()
        hub.start()
        publisher.publish_all([step()], qos=1)
        wait(lambda: applied(sent), 30, "the first message after the restart applied")
        assert hub.metric("fleetflow_ingest_reorder_gaps_skipped") == 0
        assert hub.metric("fleetflow_ingest_opened_by_core") == 0  # a worker starts with every key the hub trusts
    finally:
        if publisher is not None:
            publisher.close()
        hub.stop()
        broker.stop()


def test_a_worker_that_dies_stops_the_hub_for_its_supervisor(tmp_path: Path) -> None:
    broker = Broker("mosquitto", tmp_path / "broker").start()
    hub = HubProcess(broker, FLEET, tmp_path / "hub" / "data", args=("--ingest-workers", "1"))
    try:
        hub.start()
        assert hub.proc is not None
        (worker,) = psutil.Process(hub.proc.pid).children()
        worker.send_signal(signal.SIGKILL)
        assert hub.proc.wait(timeout=60) == 70  # crash-only: a supervisor restarts it from its journal
        assert "ingest worker 1 exited" in hub.log()
    finally:
        hub.stop()
        broker.stop()
