"""The JSON mirror and per-node metrics end to end: Mosquitto, a real hub process, real agents with a telemetry
overlay. Evidence comes from the wire: an independent MQTT connection records both the signed node messages
(verified with protocols' Receiver and the nodes' own keys) and the mirror, so the mirror is checked against what the
agents signed, not against the hub's API. Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from agent.runtime.keys import load_key
from protocols import Birth, Keyring, Message, Receiver, Telemetry
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.system.test_enrollment_e2e import wait  # bounded, and usable after the hub has stopped
from tests.unit.test_vectors import _pycose_python
from tests.wire import Observer

FLEET = "mirror"
ROOT = Path(__file__).resolve().parents[2]
VERIFY = ROOT / "docs" / "examples" / "integrations" / "verify_envelope.py"
JSON_ROOT = f"fleetflow/v1/{FLEET}/json"
INTERVAL = 1.0


class TimedObserver(Observer):
    """An Observer that also notes when each message arrived (for the per-node rate limit)."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self.arrivals: list[tuple[float, str, bytes]] = []
        self._times = threading.Lock()
        super().__init__(broker, *filters)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._times:
            self.arrivals.append((time.monotonic(), message.topic, bytes(message.payload)))
        super()._on_message(client, userdata, message)

    def timed(self, topic: str) -> list[tuple[float, bytes]]:
        with self._times:
            return [(at, payload) for at, t, payload in self.arrivals if t == topic]


def latest(observer: Observer, topic: str) -> bytes | None:
    payloads = [p for t, p in observer.messages if t == topic]
    return payloads[-1] if payloads else None


def mirrored(observer: Observer, node: str, kind: str) -> dict[str, Any]:
    """The latest mirror message on a node's topic, decoded; {} for none yet, or a cleared topic."""
    payload = latest(observer, f"{JSON_ROOT}/node/{node}/{kind}")
    return dict(json.loads(payload)) if payload else {}


def signed(observer: Observer, keys: Keyring, kind: str, node: str) -> list[tuple[str, Message]]:
    """Every signed message of one kind from one node, verified with its key (a forgery would raise). A fresh
    receiver each time: its replay window would refuse what an earlier call read."""
    topic = f"fleetflow/v1/{FLEET}/node/{node}/{kind}"
    receiver = Receiver(FLEET, keys)
    return [(topic, receiver.receive(topic, payload, int(time.time() * 1000)))
            for t, payload in list(observer.messages) if t == topic]


def test_the_json_mirror_projects_the_signed_messages_is_retained_and_clears_removed_nodes(
        mosquitto: Broker, tmp_path: Path) -> None:
    wire = TimedObserver(mosquitto, f"fleetflow/v1/{FLEET}/node/+/birth", f"fleetflow/v1/{FLEET}/node/+/tel",
                         f"{JSON_ROOT}/#")
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub",
                     args=("--auto-accept", "--json-mirror", "--json-mirror-interval", str(INTERVAL),
                           "--node-metrics", "--node-metrics-max", "1")).start()
    try:
        # Under the rpi4 profile's `high` thresholds: both stay healthy throughout.
        overlays = {"n1": {"cpu": 12.5, "mem": 40.0, "disk": 70.0, "temp": 55.5},
                    "n2": {"cpu": 60.0, "mem": 10.0, "disk": 20.0, "temp": 35.0}}
        for node, overlay in overlays.items():
            (tmp_path / f"{node}.json").write_text(json.dumps(overlay))
            hub.agent(node, "--telemetry", "0.2", "--telemetry-file", str(tmp_path / f"{node}.json"),
                      "--profile", "rpi4", "--label", f"site={node}-site")
        hub.wait_nodes(2)

        keys = Keyring([(n, bytes(load_key(hub.data.parent / n / "data" / "node.key").verify_key))
                        for n in overlays])
        for node in overlays:
            wait(lambda: mirrored(wire, node, "state").get("liveness") == "online", 15, f"{node}'s mirrored state")
            state = mirrored(wire, node, "state")
            births = signed(wire, keys, "birth", node)
            assert births, f"no signed birth of {node} on the wire"
            header, birth = births[-1][1].header, births[-1][1].body
            assert isinstance(birth, Birth)
            assert state == {"node": node, "liveness": "online", "health": "healthy", "labels": dict(birth.labels),
                             "profile": birth.profile, "running": 0, "draining": False, "version": birth.version,
                             "boot": header.boot, "changed_at": state["changed_at"]}
            assert birth.labels["site"] == f"{node}-site" and birth.profile == "rpi4"  # the profile adds labels
            # The mirrored sample is one the node signed: same sample time, same figures, the overlay's included.
            telemetry = wait(lambda: mirrored(wire, node, "telemetry"), 15, f"{node}'s mirrored telemetry")
            samples = {(m.body.at or m.header.ts): dict(m.body.metrics) for _, m in signed(wire, keys, "tel", node)
                       if isinstance(m.body, Telemetry)}
            assert samples.get(telemetry["at"]) == telemetry["metrics"], (telemetry, sorted(samples))
            assert {k: telemetry["metrics"][k] for k in overlays[node]} == overlays[node]

        # A change in what the device reports reaches the mirror, while one node's telemetry topic gets at most one
        # update per interval although the agent sends five samples a second.
        (tmp_path / "n1.json").write_text(json.dumps({**overlays["n1"], "temp": 66.0}))
        wait(lambda: mirrored(wire, "n1", "telemetry").get("metrics", {}).get("temp") == 66.0, 15, "temp 66 mirrored")
        times = [at for at, _ in wire.timed(f"{JSON_ROOT}/node/n1/telemetry")]
        assert 2 <= len(times) <= (times[-1] - times[0]) / INTERVAL + 2, times  # slack for delivery jitter
        assert len(signed(wire, keys, "tel", "n1")) > 2 * len(times)

        # Retained: a subscriber arriving now gets the hub state and each node's state and telemetry at once.
        late = Observer(mosquitto, f"{JSON_ROOT}/#")
        wait(lambda: len({t for t, _ in late.messages}) >= 5, 10, "the retained mirror")
        assert json.loads(latest(late, f"{JSON_ROOT}/hub/state") or b"{}")["online"] is True
        assert mirrored(late, "n2", "state") == mirrored(wire, "n2", "state")  # the latest, as retained
        late.close()

        # The captured birth verifies with a generic COSE library, through the documented example script.
        topic, _ = signed(wire, keys, "birth", "n1")[-1]
        envelope = [p for t, p in wire.messages if t == topic][-1]
        out = subprocess.run([str(_pycose_python()), str(VERIFY), "--public-key", keys_hex(hub, "n1"), "--topic",
                              topic, "--hex", envelope.hex()], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["type"] == "birth" and json.loads(out.stdout)["src"] == "n1"

        # Per-node gauges: on, and capped at one node (the first by id); the other is counted as left out.
        text = hub.get("/metrics")
        assert 'fleetflow_node_cpu_percent{node="n1",profile="rpi4"} 12.5' in text
        assert 'node="n2"' not in text and hub.metric("fleetflow_node_metrics_left_out") == 1

        # Revoked: the mirror clears n2's retained topics (empty payloads); a late subscriber gets nothing of n2.
        hub.post("/nodes/n2/revoke")
        wait(lambda: latest(wire, f"{JSON_ROOT}/node/n2/state") == b"" and
             latest(wire, f"{JSON_ROOT}/node/n2/telemetry") == b"", 15, "n2's mirror cleared")
        late = Observer(mosquitto, f"{JSON_ROOT}/#")
        wait(lambda: {f"{JSON_ROOT}/node/n1/state", f"{JSON_ROOT}/node/n1/telemetry"} <= {t for t, _ in late.messages},
             10, "n1's retained mirror")
        assert not [t for t, _ in late.messages if "/n2/" in t]
        late.close()
    finally:
        hub.stop()
    # A clean stop says so on the hub state (a crash leaves it to the mirror connection's Last Will).
    wait(lambda: json.loads(latest(wire, f"{JSON_ROOT}/hub/state") or b"{}").get("online") is False, 15,
         "the mirrored hub state offline")
    wire.close()


def keys_hex(hub: HubProcess, node: str) -> str:
    return bytes(load_key(hub.data.parent / node / "data" / "node.key").verify_key).hex()


def test_a_killed_hub_leaves_its_mirror_offline_by_the_last_will(mosquitto: Broker, tmp_path: Path) -> None:
    wire = Observer(mosquitto, f"{JSON_ROOT}/hub/state")
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=("--json-mirror",)).start()
    try:
        wait(lambda: json.loads(latest(wire, f"{JSON_ROOT}/hub/state") or b"{}").get("online") is True, 15,
             "the mirrored hub state online")
        hub.kill()
        wait(lambda: json.loads(latest(wire, f"{JSON_ROOT}/hub/state") or b"{}").get("online") is False, 15,
             "the Last Will")
    finally:
        hub.stop()
        wire.close()


def test_the_mirror_and_the_node_gauges_are_off_by_default(mosquitto: Broker, tmp_path: Path) -> None:
    wire = Observer(mosquitto, f"{JSON_ROOT}/#", f"fleetflow/v1/{FLEET}/node/+/tel")
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub").start()
    try:
        hub.agent("n1", "--telemetry", "0.2")
        hub.wait_nodes(1)
        # The hub has taken telemetry from n1 (an enabled mirror publishes the state at the birth, before that).
        hub.wait(lambda: any(n.get("telemetry") for n in hub.get("/nodes")), 15, "telemetry at the hub")
        assert "fleetflow_node_cpu_percent" not in hub.get("/metrics")
    finally:
        hub.stop()
    # Over the hub's whole life (start, a node's birth and telemetry, a clean stop): nothing under json/.
    assert wire.on("/tel") and not [t for t, _ in wire.messages if t.startswith(JSON_ROOT)]
    wire.close()
