"""Bad traffic never displaces good, and nothing the hub's MQTT client acknowledged vanishes uncounted. Real hub and
agent processes, a real Mosquitto, floods and bursts published by a third-party client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest

from protocols import Heartbeat, Signer
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.wire import Observer, Publisher

pytestmark = pytest.mark.slow
FLEET = "fl"


@pytest.fixture
def roomy_broker(tmp_path: Path) -> Iterator[Broker]:
    """The broker holds whatever the hub has not taken yet, so every message that goes missing is the hub's."""
    broker = Broker("mosquitto", tmp_path / "broker",
                    extra=("max_queued_messages 0", "max_inflight_messages 0", "max_queued_bytes 0")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def hub(roomy_broker: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(roomy_broker, FLEET, tmp_path / "hub") as process:
        yield process


def flood(broker: Broker, topics: list[str], payloads: list[bytes], seconds: float, stop: threading.Event) -> int:
    """Publish QoS 0 garbage and forgeries round-robin, as fast as one client can, for at most `seconds`."""
    publisher = Publisher(broker)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not stop.is_set():
            for topic in topics:
                publisher.publish(topic, payloads[sent % len(payloads)], qos=0)
                sent += 1
            if sent % 2000 == 0:
                time.sleep(0.001)  # let paho's network thread drain its buffer
    finally:
        publisher.close()
    return sent


def test_a_20_s_flood_does_not_fail_a_single_heartbeating_node(hub: HubProcess, roomy_broker: Broker) -> None:
    for node in ("n1", "n2", "n3"):
        hub.agent(node)
    hub.wait_nodes(3)
    kid_holder = Observer(roomy_broker, f"fleetflow/v1/{FLEET}/node/n1/hb")
    hub.wait(lambda: kid_holder.on("/hb"), 10, "a heartbeat of n1 to copy its kid from")
    genuine = kid_holder.on("/hb")[0]
    kid_holder.close()
    forged = genuine[:-64] + os.urandom(64)  # n1's real kid, a signature that does not verify
    garbage = [os.urandom(200), b"\xd2\x84" + os.urandom(120), forged, forged[:-1] + b"\x00"]
    topics = [f"fleetflow/v1/{FLEET}/node/{n}/{k}" for n in ("n1", "n2", "n3", "ghost") for k in ("hb", "tel", "evt")]
    stop = threading.Event()
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(flood(roomy_broker, topics, garbage, 20, stop)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(timeout=60)
    finally:
        stop.set()
    assert sum(counts) > 50_000, counts  # a flood, not a trickle
    seen = hub.get("/nodes/n1")["last_seen"]
    hub.wait(lambda: hub.get("/nodes/n1")["last_seen"] > seen + 2000, 60, "heartbeats after the flood")
    for node in hub.get("/nodes"):
        failed = [h for h in node.get("history", []) if h.get("kind") == "liveness" and h.get("state") == "failed"]
        assert not failed and node["liveness"] == "online", (node["id"], node.get("history"))


def test_a_burst_of_30000_valid_heartbeats_is_accepted_or_every_shed_one_counted(hub: HubProcess,
                                                                                 roomy_broker: Broker) -> None:
    keys = [nacl.signing.SigningKey(i.to_bytes(2, "big") * 16) for i in range(1, 201)]
    for i, key in enumerate(keys):
        hub.post("/nodes", {"id": f"b{i}", "public_key": bytes(key.verify_key).hex()})
    messages = []
    for seq in range(150):
        for i, key in enumerate(keys):  # interleaved, as 200 devices would send
            signer = Signer(key, FLEET, f"b{i}", boot=1, seq=seq)
            out = signer.seal(Heartbeat(), 1_000)
            messages.append((out.topic, out.payload))
    assert len(messages) == 30_000

    def counted() -> float:
        return (hub.metric('fleetflow_messages_total{type="hb",verdict="accepted"}')
                + hub.metric("fleetflow_intake_shed_total{kind=\"hb\"")
                + hub.metric("fleetflow_rejected_total"))

    publisher = Publisher(roomy_broker)
    try:
        publisher.publish_all(messages, qos=1)
    finally:
        publisher.close()
    hub.wait(lambda: counted() >= 30_000, 120, "every heartbeat accepted or counted")
    accepted = hub.metric('fleetflow_messages_total{type="hb",verdict="accepted"}')
    assert counted() == 30_000, (accepted, counted())
    assert hub.metric("fleetflow_rejected_total") == 0


def test_a_heartbeat_captured_before_a_hub_kill_is_refused_after_it(hub: HubProcess, roomy_broker: Broker) -> None:
    hub.agent("n1")
    hub.wait_nodes(1)
    spy = Observer(roomy_broker, f"fleetflow/v1/{FLEET}/node/n1/hb")
    hub.wait(lambda: spy.on("/hb"), 10, "a heartbeat to capture")
    captured = spy.on("/hb")[-1]
    spy.close()
    accepted = hub.metric('fleetflow_messages_total{type="hb",verdict="accepted"}')
    hub.wait(lambda: hub.metric('fleetflow_messages_total{type="hb",verdict="accepted"}') > accepted + 1, 10,
             "the hub to accept the captured heartbeat and the next")
    for agent in hub.agents:
        agent.kill()  # the node is gone: only the replay could speak for it
    hub.kill()
    hub.start()
    replayer = Publisher(roomy_broker)
    try:
        replayer.publish_all([(f"fleetflow/v1/{FLEET}/node/n1/hb", captured)], qos=1)
    finally:
        replayer.close()
    hub.wait(lambda: hub.metric('fleetflow_rejected_total{reason="replayed"}') >= 1, 20, "the replay refused")
    assert hub.metric('fleetflow_messages_total{type="hb",verdict="accepted"}') == 0
