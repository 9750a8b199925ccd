"""The hub's Sparkplug B bridge through a real Mosquitto: a third-party subscriber decodes every message with the
generated protobuf classes and checks the Sparkplug 3.0 rules as a host application would, while real agents come,
change and die, the hub is killed -9 and restarted, and a primary host comes and goes."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from hub.sparkplug import sparkplug_b_pb2 as pb
from tests.brokers import HOST, Broker
from tests.hubprocess import HubProcess

pytestmark = pytest.mark.slow

GROUP = "Plant 1"  # a space is a valid Sparkplug id character
FLEET = "spfleet"
BD_SEQ, REBIRTH, DRAIN = "bdSeq", "Node Control/Rebirth", "Device Control/Drain"
WAIT_S = 20.0  # below the bridge's full resync (60 s): what these tests see comes from the hub's hooks
EDGE_KINDS = ("NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH")  # what the edge node publishes


@dataclass
class Seen:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def kind(self) -> str:
        return self.topic.split("/")[2]

    @property
    def device(self) -> str | None:
        parts = self.topic.split("/")
        return parts[4] if len(parts) == 5 else None

    def decoded(self) -> pb.Payload:
        return pb.Payload.FromString(self.payload)


def value(metric: pb.Payload.Metric) -> Any:
    kind = metric.WhichOneof("value")
    return None if kind is None else getattr(metric, kind)


class Host:
    """A Sparkplug host application in miniature, on its own connection: it records every message (with the QoS and
    retain flag it was delivered with), resolves data aliases through the births, and publishes commands."""

    def __init__(self, broker: Broker, topic_filter: str = "spBv1.0/#") -> None:
        self.seen: list[Seen] = []
        self.changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="")
        self.client.on_message = self._on_message
        subscribed, connected = threading.Event(), threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(HOST, broker.port, keepalive=60)
        self.client.loop_start()
        assert connected.wait(15), "the host could not connect"
        self.client.subscribe(topic_filter, qos=1)
        assert subscribed.wait(15), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.changed:
            self.seen.append(Seen(message.topic, bytes(message.payload), message.qos, bool(message.retain)))
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; seen: "
                                         f"{[(s.kind, s.device) for s in self.seen][-20:]}")
                self.changed.wait(min(left, 0.2))

    def of(self, kind: str, device: str | None = None, since: int = 0) -> list[Seen]:
        return [s for s in self.seen[since:] if s.kind == kind and (device is None or s.device == device)]

    def values(self, device: str) -> dict[str, Any]:
        """A device's metrics as a host knows them: its latest DBIRTH, then each DDATA resolved by alias."""
        names: dict[int, str] = {}
        current: dict[str, Any] = {}
        for message in self.seen:
            if message.device != device or message.kind not in ("DBIRTH", "DDATA"):
                continue
            payload = message.decoded()
            if message.kind == "DBIRTH":
                names = {m.alias: m.name for m in payload.metrics}
                current = {m.name: value(m) for m in payload.metrics}
            else:
                current.update({names[m.alias]: value(m) for m in payload.metrics})
        return current

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def command(*metrics: pb.Payload.Metric) -> bytes:
    payload = pb.Payload(timestamp=int(time.time() * 1000))
    payload.metrics.extend(metrics)
    return payload.SerializeToString()


def bd_seq_of(message: Seen) -> int:
    return int(next(value(m) for m in message.decoded().metrics if m.name == BD_SEQ))


def check_session_rules(messages: list[Seen]) -> None:
    """seq 0 in each NBIRTH, +1 (mod 256) in every later N/D message, none in NDEATH; names and datatypes only in
    births, aliases everywhere but bdSeq and Node Control/Rebirth; QoS 0, never retained (NDEATH: the Will, QoS 1)."""
    previous: int | None = None
    for message in (m for m in messages if m.kind in EDGE_KINDS):  # not the host's own commands and STATE
        payload = message.decoded()
        assert not message.retain, message.topic
        if message.kind == "NDEATH":
            assert message.qos == 1 and not payload.HasField("seq")
            assert [m.name for m in payload.metrics] == [BD_SEQ]
            previous = None
            continue
        assert message.qos == 0, message.topic
        if message.kind == "NBIRTH":
            assert payload.seq == 0
        else:
            assert previous is not None and payload.seq == (previous + 1) % 256, (message.topic, previous, payload.seq)
        previous = payload.seq
        for metric in payload.metrics:
            if message.kind in ("NBIRTH", "DBIRTH"):
                assert metric.name and metric.HasField("datatype")
                assert metric.HasField("alias") == (metric.name not in (BD_SEQ, REBIRTH)), metric.name
            else:
                assert not metric.HasField("name") and not metric.HasField("datatype") and metric.HasField("alias")


def no_retained_messages(broker: Broker, topic_filter: str) -> bool:
    """Nothing retained under the filter: a fresh subscriber gets only our own sentinel, which the broker queues after
    any retained message the subscription brings."""
    host = Host(broker, topic_filter)
    try:
        host.publish(topic_filter.replace("#", "sentinel"), b"x", qos=1)
        host.wait(lambda: host.seen, "the sentinel")
        return [s.topic for s in host.seen] == [topic_filter.replace("#", "sentinel")]
    finally:
        host.close()


def test_the_hub_is_a_sparkplug_edge_node(mosquitto: Broker, tmp_path: Path) -> None:
    host = Host(mosquitto)
    node_topic = f"spBv1.0/{GROUP}/%s/{FLEET}"
    telemetry = tmp_path / "n1-telemetry.json"
    telemetry.write_text(json.dumps({"cpu": 10, "mem": 20, "disk": 30}))
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=(
        "--auto-accept", "--sparkplug", "--sparkplug-group", GROUP, "--sparkplug-commands",
        "--sparkplug-deadband", "cpu=5,mem=1"))
    try:
        hub.start()
        nbirth = host.wait(lambda: host.of("NBIRTH"), "the NBIRTH")[0]
        assert nbirth.topic == node_topic % "NBIRTH" and bd_seq_of(nbirth) == 0  # bdSeq starts at 0
        agent = hub.agent("n1", "--telemetry", "0.2", "--telemetry-file", str(telemetry))
        # DBIRTH when the node is born, then its telemetry as the host resolves it (a birth and data by alias).
        host.wait(lambda: host.values("n1").get("Telemetry/CPU") == 10.0, "n1's CPU at 10")
        dbirth = host.of("DBIRTH", "n1")[0].decoded()
        names = [m.name for m in dbirth.metrics]
        assert {"Telemetry/CPU", "Telemetry/Memory", "Telemetry/Disk", "Telemetry/Temperature", "Status/Liveness",
                "Status/Health", "Status/Running Steps", DRAIN, "Properties/Agent Version", "Properties/Profile",
                "Properties/Labels"} == set(names)
        assert host.values("n1")["Status/Liveness"] == "online" and host.values("n1")["Properties/Agent Version"]
        # Report by exception: a CPU move inside its deadband (5) is not sent; memory past its own (1) is.
        data_before = len(host.seen)
        telemetry.write_text(json.dumps({"cpu": 13, "mem": 25, "disk": 30}))
        host.wait(lambda: host.values("n1").get("Telemetry/Memory") == 25.0, "memory at 25")
        assert host.values("n1")["Telemetry/CPU"] == 10.0
        cpu_alias = next(m.alias for m in dbirth.metrics if m.name == "Telemetry/CPU")
        assert all(m.alias != cpu_alias for s in host.of("DDATA", "n1", data_before) for m in s.decoded().metrics)
        telemetry.write_text(json.dumps({"cpu": 40, "mem": 25, "disk": 30}))
        host.wait(lambda: host.values("n1").get("Telemetry/CPU") == 40.0, "CPU at 40")

        # Bad commands are counted and ignored; the bridge goes on.
        drain_alias = next(m.alias for m in dbirth.metrics if m.name == DRAIN)
        dcmd = f"spBv1.0/{GROUP}/DCMD/{FLEET}/n1"
        host.publish(node_topic % "NCMD", b"\xff\xfe not protobuf")
        host.publish(dcmd, command(pb.Payload.Metric(name="Device Control/Reboot", boolean_value=True)))
        host.publish(dcmd, command(pb.Payload.Metric(alias=drain_alias, string_value="yes")))
        hub.wait(lambda: (hub.metric('fleetflow_sparkplug_refused_total{reason="malformed"}'),
                          hub.metric('fleetflow_sparkplug_refused_total{reason="unknown-metric"}'),
                          hub.metric('fleetflow_sparkplug_refused_total{reason="wrong-type"}')) == (1, 1, 1),
                 WAIT_S, "three refusals counted")
        assert not hub.get("/nodes/n1")["draining"]
        # A DCMD of Device Control/Drain drains the node; the DDATA that follows reports it.
        host.publish(dcmd, command(pb.Payload.Metric(alias=drain_alias, boolean_value=True)))
        host.wait(lambda: host.values("n1").get(DRAIN) is True, "Drain reported true")
        assert hub.get("/nodes/n1")["draining"] is True

        # A rebirth request: the whole birth sequence again, with the same bdSeq.
        since = len(host.seen)
        host.publish(node_topic % "NCMD", command(pb.Payload.Metric(name=REBIRTH, boolean_value=True)))
        host.wait(lambda: host.of("DBIRTH", "n1", since), "the DBIRTH after the rebirth")
        again = host.of("NBIRTH", since=since)
        assert len(again) == 1 and bd_seq_of(again[0]) == 0 and again[0].decoded().seq == 0
        rebirth = host.of("DBIRTH", "n1", since)[0]
        assert rebirth.decoded().seq == 1 and host.values("n1")[DRAIN] is True

        # A node that falls silent (stopped, no Will) is suspected, then declared failed by the hub's own decisions:
        # a DDATA with its liveness, then its DDEATH.
        silent = hub.agent("n2")
        host.wait(lambda: host.values("n2").get("Status/Liveness") == "online", "n2 born")
        silent.signal(signal.SIGSTOP)
        try:
            host.wait(lambda: host.values("n2").get("Status/Liveness") == "suspected", "n2 suspected")
            host.wait(lambda: host.of("DDEATH", "n2"), "n2's DDEATH once it is declared failed")
        finally:
            silent.stop()
        # The agent is killed: its death reaches the hub, and the device dies.
        agent.kill()
        host.wait(lambda: host.of("DDEATH", "n1"), "n1's DDEATH")
        check_session_rules(host.seen)

        # The hub is killed -9: the broker publishes the Will, an NDEATH with the bdSeq of the NBIRTH.
        hub.kill()
        ndeath = host.wait(lambda: host.of("NDEATH"), "the NDEATH Will")[0]
        assert ndeath.topic == node_topic % "NDEATH" and bd_seq_of(ndeath) == bd_seq_of(nbirth) == 0
        assert ndeath.qos == 1 and not ndeath.decoded().HasField("seq")
        assert no_retained_messages(mosquitto, f"spBv1.0/{GROUP}/#")

        # Restarted, the hub's next session carries the next bdSeq (kept in its data directory); stopped cleanly, it
        # publishes that session's NDEATH itself before disconnecting.
        since = len(host.seen)
        hub.start()
        reborn = host.wait(lambda: host.of("NBIRTH", since=since), "the NBIRTH after the restart")[0]
        assert bd_seq_of(reborn) == 1
        hub.stop()
        goodbye = host.wait(lambda: host.of("NDEATH", since=since), "the NDEATH of a clean stop")[0]
        assert bd_seq_of(goodbye) == 1
        check_session_rules(host.seen[since:])
    finally:
        hub.stop()
        host.close()


def test_births_wait_for_the_primary_host(mosquitto: Broker, tmp_path: Path) -> None:
    host = Host(mosquitto)
    state_topic = "spBv1.0/STATE/scada"
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=("--auto-accept", "--sparkplug", "--sparkplug-host",
                                                               "scada"))
    waiting = 'fleetflow_sparkplug_session{fleetflow_sparkplug_session="waiting"}'
    try:
        hub.start()
        hub.wait(lambda: hub.metric(waiting) == 1, WAIT_S, "the bridge waiting for the primary host")
        # A STATE that is not the documented JSON is counted and ignored: still waiting.
        host.publish(state_topic, b"online!", qos=1)
        hub.wait(lambda: hub.metric('fleetflow_sparkplug_refused_total{reason="bad-state"}') == 1, WAIT_S,
                 "the bad STATE counted")
        assert hub.metric(waiting) == 1 and not host.of("NBIRTH")
        # The primary host comes online (retained, as the specification has it): births.
        online_at = int(time.time() * 1000)
        host.publish(state_topic, json.dumps({"online": True, "timestamp": online_at}).encode(), qos=1, retain=True)
        nbirth = host.wait(lambda: host.of("NBIRTH"), "the NBIRTH once the host is online")[0]
        first = bd_seq_of(nbirth)
        # The death of an older host session, delivered late, changes nothing: a rebirth request right after it is
        # answered by an NBIRTH of the same bdSeq, and no NDEATH comes first.
        since = len(host.seen)
        host.publish(state_topic, json.dumps({"online": False, "timestamp": online_at - 1}).encode(), qos=1)
        host.publish(f"spBv1.0/fleetflow/NCMD/{FLEET}", command(pb.Payload.Metric(name=REBIRTH, boolean_value=True)))
        host.wait(lambda: host.of("NBIRTH", since=since), "the rebirth")
        published = [s for s in host.seen[since:] if s.kind in EDGE_KINDS]
        assert published[0].kind == "NBIRTH" and bd_seq_of(published[0]) == first
        # The host goes offline: NDEATH at once, then a new session (new bdSeq) that waits again.
        since = len(host.seen)
        host.publish(state_topic, json.dumps({"online": False, "timestamp": online_at}).encode(), qos=1, retain=True)
        ndeath = host.wait(lambda: host.of("NDEATH", since=since), "the NDEATH when the host goes offline")[0]
        assert bd_seq_of(ndeath) == first
        hub.wait(lambda: hub.metric("fleetflow_sparkplug_bdseq") == first + 1 and hub.metric(waiting) == 1, WAIT_S,
                 "a new session waiting for the host")
        assert not host.of("NBIRTH", since=since)
        # The host comes back with a newer session: births again, in the new session.
        host.publish(state_topic, json.dumps({"online": True, "timestamp": online_at + 1}).encode(), qos=1,
                     retain=True)
        again = host.wait(lambda: host.of("NBIRTH", since=since), "the NBIRTH when the host is back")[0]
        assert bd_seq_of(again) == first + 1
        check_session_rules(host.seen)
    finally:
        hub.stop()
        host.close()


def test_seq_wraps_past_255_on_the_wire(mosquitto: Broker, tmp_path: Path) -> None:
    """Over 256 messages in one session (drain toggled by DCMD, each reported by a DDATA): seq goes 255 -> 0."""
    host = Host(mosquitto)
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=("--auto-accept", "--sparkplug",
                                                               "--sparkplug-commands"))
    try:
        hub.start()
        hub.agent("n1")
        host.wait(lambda: host.values("n1").get(DRAIN) is False, "n1 born")
        alias = next(m.alias for m in host.of("DBIRTH", "n1")[0].decoded().metrics if m.name == DRAIN)
        dcmd = f"spBv1.0/fleetflow/DCMD/{FLEET}/n1"
        for i in range(260):
            on = i % 2 == 0
            host.publish(dcmd, command(pb.Payload.Metric(alias=alias, boolean_value=on)))
            host.wait(lambda: host.values("n1").get(DRAIN) is on, f"Drain {on} (toggle {i})")
        seqs = [s.decoded().seq for s in host.seen if s.kind in EDGE_KINDS and s.kind != "NDEATH"]
        assert len(seqs) > 256 and 0 in seqs[1:]
        check_session_rules(host.seen)
    finally:
        hub.stop()
        host.close()
