"""Enrollment races and leaks, end to end: Mosquitto, a real hub process (no --auto-accept), real agents, and an
attacker who publishes messages signed with the project's own signing code.

Evidence comes from the wire (the hub's signed answers on the node's cmd topic, read with an independent MQTT
connection) and from the hub's registry file, not from the API that is under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nacl.signing
import pytest

from agent.runtime.keys import write_new_key
from agent.runtime.clock import now_ms
from protocols import (
    Ack,
    Enroll,
    Heartbeat,
    Signer,
    Topic,
    cbor,
    envelope,
    kid_for,
    open_envelope,
)
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.waiting import wait
from tests.wire import Observer, Publisher

FLEET = "enr"
TOKEN = "e2e-enroll-token-5d1c0a9b7e3f"



def verdicts(observer: Observer, hub_key: bytes, node: str) -> list[Ack]:
    """The hub's enroll answers to `node`, as sent: every ack on its cmd topic, verified with the hub's key."""
    topic = Topic.node(FLEET, node, "cmd").value
    out = []
    for payload in observer.on(f"/node/{node}/cmd"):
        body = open_envelope(payload, topic, hub_key).body
        if isinstance(body, Ack) and body.enroll is not None:
            out.append(body)
    return out


def accepted_keys(hub: HubProcess) -> dict[str, str]:
    """Accepted node keys from the hub's registry file (written atomically, read as a person would)."""
    path = hub.data / "nodes.json"
    raw = json.loads(path.read_text()) if path.exists() else {}
    return {d["id"]: d["key"] for d in raw.get("nodes", {}).values() if d["state"] == "accepted"}


def unknown_key_refusals(hub: HubProcess) -> float:
    """Messages refused for an untrusted kid, whether at the hub's intake screening or at full verification."""
    return hub.metric('fleetflow_rejected_total{reason="unknown-key"}')


def publish(publisher: Publisher, out: Any) -> None:
    publisher.publish(out.topic, out.payload, qos=1).wait_for_publish(10)


def agent_public_key(agent: AgentProcess) -> bytes:
    path = agent.data / "node.key.pub"
    return bytes.fromhex(wait(lambda: path.read_text().strip() if path.exists() else "", 15, "the agent's key"))


@pytest.fixture
def wire(mosquitto: Broker) -> Any:
    observer = Observer(mosquitto, f"fleetflow/v1/{FLEET}/node/+/enroll", f"fleetflow/v1/{FLEET}/node/+/cmd")
    publisher = Publisher(mosquitto)
    yield observer, publisher
    observer.close()
    publisher.close()


def test_an_accept_of_the_reviewed_kid_is_refused_once_the_pending_key_was_swapped(
        mosquitto: Broker, tmp_path: Path, wire: Any) -> None:
    observer, publisher = wire
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=()).start()
    try:
        hub_key = bytes.fromhex(hub.public_key)
        real = Signer(nacl.signing.SigningKey.generate(), FLEET, "n1", boot=1)
        rogue = Signer(nacl.signing.SigningKey.generate(), FLEET, "n1", boot=1)
        publish(publisher, real.seal(Enroll(real.public_key, "rpi4"), now_ms()))
        wait(lambda: len(verdicts(observer, hub_key, "n1")) == 1, 15, "the answer to n1's request")
        reviewed = kid_for(real.public_key).hex()  # what the operator compared with the device
        # While the operator reviews, someone asks for the same id with another key.
        publish(publisher, rogue.seal(Enroll(rogue.public_key, "rpi4"), now_ms()))
        wait(lambda: len(verdicts(observer, hub_key, "n1")) == 2, 15, "the answer to the second request")

        response = httpx.post(f"{hub.url}/nodes/n1/accept", json={"kid": reviewed}, timeout=30,
                              headers={"Authorization": f"Bearer {hub.token}"})
        assert response.status_code == 409, response.text
        assert kid_for(rogue.public_key).hex() in response.json()["detail"]
        assert "n1" not in accepted_keys(hub)
        assert all(v.enroll == "pending" for v in verdicts(observer, hub_key, "n1"))
        # nothing the rogue key signs is trusted
        before = unknown_key_refusals(hub)
        publish(publisher, rogue.seal(Heartbeat(), now_ms()))
        hub.wait(lambda: unknown_key_refusals(hub) > before, 15, "the rogue heartbeat refused")
        # one fingerprint everywhere: the hub's log, the node view, the 409
        log = hub.log()
        assert f"fleetflow nodes accept n1 --kid {reviewed}" in log
        assert f"kid {reviewed} -> {kid_for(rogue.public_key).hex()}" in log  # the reset is logged
        assert hub.get("/nodes/n1")["kid"] == kid_for(rogue.public_key).hex()

        # The real node asks again; the operator checks again and accepts the key they reviewed.
        publish(publisher, real.seal(Enroll(real.public_key, "rpi4"), now_ms()))
        wait(lambda: len(verdicts(observer, hub_key, "n1")) == 3, 15, "the answer to the third request")
        out = subprocess.run([str(Path(sys.executable).parent / "fleetflow"), "nodes", "accept", "n1", "--kid",
                              reviewed, "--data", str(hub.data)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        last = wait(lambda: [v for v in verdicts(observer, hub_key, "n1") if v.enroll == "accepted"], 15,
                    "the accepted verdict")
        assert [v.kid for v in last] == [kid_for(real.public_key)]
        assert accepted_keys(hub) == {"n1": real.public_key.hex()}
    finally:
        hub.stop()


def test_a_sniffed_enroll_proof_enrolls_no_other_key_or_id(mosquitto: Broker, tmp_path: Path, wire: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    observer, publisher = wire
    monkeypatch.setenv("FLEETFLOW_ENROLL_TOKEN", TOKEN)  # hub and agent read it from the environment
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    write_new_key(data / "hub.key")  # so the agent can be given the hub's key before the hub first runs
    hub = HubProcess(mosquitto, FLEET, data, args=())
    hub_key = bytes.fromhex(hub.public_key)
    # The real agent asks while no hub listens; an eavesdropper on the broker keeps a copy.
    agent = AgentProcess(mosquitto, FLEET, "n1", tmp_path / "n1" / "data", hub.public_key, ("--heartbeat", "0.5"))
    agent.start()
    try:
        captured = wait(lambda: observer.on("/node/n1/enroll"), 20, "the agent's enroll on the wire")[0]
        agent.stop()
        real_key = agent_public_key(agent)
        hub.start()
        # The attacker keeps every field of the captured request but the key (and the id), signs with its own key.
        rogue = nacl.signing.SigningKey.generate()
        rogue_key = bytes(rogue.verify_key)
        payload = cbor.loads(envelope.parse(captured).payload)
        for node in ("n1", "n2"):
            topic = Topic.node(FLEET, node, "enroll").value
            forged = cbor.dumps({**payload, "src": node, "key": rogue_key})
            publisher.publish(topic, envelope.seal(forged, topic, rogue, kid_for(rogue_key)), qos=1).wait_for_publish(10)
        for node in ("n1", "n2"):
            answer = wait(lambda: verdicts(observer, hub_key, node), 15, f"the answer to the forged {node}")
            assert [v.enroll for v in answer] == ["pending"], node  # not admitted by the copied proof
            assert [v.kid for v in answer] == [kid_for(rogue_key)], node
        assert accepted_keys(hub) == {}
        assert "proof does not verify" in hub.log()

        # The real agent comes back: its own proof admits its own key (and the token's one use goes to it).
        agent.start()
        accepted = wait(lambda: [v.kid for v in verdicts(observer, hub_key, "n1") if v.enroll == "accepted"], 20,
                        "n1 accepted")
        assert accepted == [kid_for(real_key)]
        assert accepted_keys(hub) == {"n1": real_key.hex()}  # the registry is written before the answer is sent
        assert "enrolled with the enroll token" in hub.log() and "use 1 of 1" in hub.log()
        assert TOKEN.encode() not in captured  # and the token itself never travelled
    finally:
        agent.stop()
        hub.stop()


def test_a_node_whose_id_is_taken_is_told_so_and_logs_it(mosquitto: Broker, tmp_path: Path, wire: Any) -> None:
    observer, _ = wire
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=()).start()
    try:
        hub_key = bytes.fromhex(hub.public_key)
        other = bytes(nacl.signing.SigningKey.generate().verify_key)
        hub.post("/nodes", {"id": "n1", "public_key": other.hex()})  # n1 is enrolled with another key
        agent = hub.agent("n1")
        mine = kid_for(agent_public_key(agent))
        answer = wait(lambda: verdicts(observer, hub_key, "n1"), 20, "the hub's answer to n1")[0]
        assert answer.enroll == "taken"
        assert answer.kid == mine
        hub.wait(lambda: "node id n1 is taken" in agent.log(), 15, "the agent logging why it was refused")
        assert "rejected this node's enrollment" not in agent.log()  # the reason, not a generic refusal
        assert f"enrolled with kid {kid_for(other).hex()}, this request has kid {mine.hex()}" in hub.log()
        assert accepted_keys(hub) == {"n1": other.hex()}
    finally:
        hub.stop()
