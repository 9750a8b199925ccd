"""The pure Sparkplug edge node (hub/sparkplug/edge.py): every message is decoded with the generated protobuf classes
and checked against the Sparkplug 3.0 rules (bdSeq, seq, aliases, births, report by exception, primary host STATE,
rebirth, commands), and every kind of bad input is refused without changing anything."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from hub.sparkplug import sparkplug_b_pb2 as pb
from hub.sparkplug.bridge import BdSeqFile
from hub.sparkplug.edge import (BD_SEQ, BORN, CLOSING, DEVICE_METRICS, NODE_METRICS, OFFLINE, REBIRTH, WAITING,
                                DeviceView, DrainRequest, EdgeConfig, EdgeNode, EdgeNodeMisuse, Output, Publish,
                                next_bd_seq)
from hub.sparkplug.settings import DEFAULT_DEADBAND

GROUP, NODE, HOST = "plant", "hub-1", "scada"
NOW = 1_700_000_000_000
DRAIN = "Device Control/Drain"


def edge(host: str | None = None, commands: bool = True, **deadband: float) -> EdgeNode:
    return EdgeNode(EdgeConfig(GROUP, NODE, host, {**DEFAULT_DEADBAND, **deadband}, commands))


def view(node: str, alive: bool = True, boot: int = 1, labels: dict[str, str] | None = None,
         **values: Any) -> DeviceView:
    base: dict[str, Any] = {"cpu": 10.0, "mem": 20.0, "disk": 30.0, "temp": None, "liveness": "online",
                            "health": "healthy", "running": 0, "drain": False, "version": "0.1.0",
                            "profile": "rpi4", "labels": "line=2"}
    return DeviceView(node, alive, boot, {**base, **values}, labels if labels is not None else {"line": "2"})


def decoded(message: Publish) -> pb.Payload:
    return pb.Payload.FromString(message.payload)


def by_name(payload: pb.Payload) -> dict[str, pb.Payload.Metric]:
    return {m.name: m for m in payload.metrics}


def value(metric: pb.Payload.Metric) -> Any:
    kind = metric.WhichOneof("value")
    return None if kind is None else getattr(metric, kind)


def command(*metrics: pb.Payload.Metric, stamp: int = NOW) -> bytes:
    payload = pb.Payload(timestamp=stamp)
    payload.metrics.extend(metrics)
    return payload.SerializeToString()


def boolean(on: bool, name: str | None = None, alias: int | None = None) -> pb.Payload.Metric:
    metric = pb.Payload.Metric(boolean_value=on, datatype=pb.Boolean)
    if name is not None:
        metric.name = name
    if alias is not None:
        metric.alias = alias
    return metric


def state(online: bool, stamp: int) -> bytes:
    return json.dumps({"online": online, "timestamp": stamp}).encode()


def born(*views: DeviceView, **kwargs: Any) -> tuple[EdgeNode, Output]:
    node = edge(**kwargs)
    for v in views:
        node.update_device(v, NOW)
    return node, node.connected(4, NOW)


def kinds(out: Output) -> list[str]:
    return [m.kind for m in out.publish]


# -- births and deaths ---------------------------------------------------------------------------------------------

def test_the_will_is_an_ndeath_carrying_only_bdseq() -> None:
    will = edge().will(7, NOW)
    assert (will.topic, will.qos, will.retain, will.kind) == (f"spBv1.0/{GROUP}/NDEATH/{NODE}", 1, False, "NDEATH")
    payload = decoded(will)
    assert not payload.HasField("seq")  # NDEATH carries no seq
    assert [(m.name, m.datatype, value(m)) for m in payload.metrics] == [(BD_SEQ, pb.Int64, 7)]
    assert not payload.metrics[0].HasField("alias")


def test_connect_publishes_nbirth_then_a_dbirth_per_live_device() -> None:
    node, out = born(view("b"), view("a", labels={"line": "2", "site": "x"}), view("dead", alive=False))
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DBIRTH"] and node.state == BORN
    nbirth, dbirth_a, dbirth_b = out.publish
    assert [m.topic for m in out.publish] == [f"spBv1.0/{GROUP}/NBIRTH/{NODE}", f"spBv1.0/{GROUP}/DBIRTH/{NODE}/a",
                                             f"spBv1.0/{GROUP}/DBIRTH/{NODE}/b"]
    assert all((m.qos, m.retain) == (0, False) for m in out.publish)
    payload = decoded(nbirth)
    assert payload.seq == 0 and payload.timestamp == NOW
    metrics = by_name(payload)
    assert value(metrics[BD_SEQ]) == 4 and metrics[BD_SEQ].datatype == pb.Int64
    rebirth = metrics[REBIRTH]
    assert (rebirth.datatype, value(rebirth), rebirth.HasField("alias")) == (pb.Boolean, False, False)
    assert set(metrics) == {BD_SEQ, REBIRTH} | {spec.name for spec in NODE_METRICS}
    for spec in NODE_METRICS:
        assert metrics[spec.name].HasField("alias") and metrics[spec.name].datatype == spec.datatype
    device = decoded(dbirth_a)
    assert device.seq == 1 and decoded(dbirth_b).seq == 2
    metrics = by_name(device)
    assert list(metrics) == [spec.name for spec in DEVICE_METRICS]  # every metric it will ever send
    assert all(m.HasField("alias") and m.HasField("datatype") and m.timestamp == NOW for m in device.metrics)
    assert value(metrics["Telemetry/CPU"]) == 10.0 and metrics["Telemetry/CPU"].datatype == pb.Double
    assert metrics["Telemetry/Temperature"].is_null and value(metrics["Telemetry/Temperature"]) is None
    assert value(metrics[DRAIN]) is False and value(metrics["Status/Liveness"]) == "online"
    labels = metrics["Properties/Labels"].properties
    assert list(labels.keys) == ["line", "site"] and [v.string_value for v in labels.values] == ["2", "x"]
    aliases = [m.alias for m in payload.metrics if m.HasField("alias")] + [m.alias for m in device.metrics] + \
              [m.alias for m in decoded(dbirth_b).metrics]
    assert len(aliases) == len(set(aliases))  # unique across the whole edge node


def test_a_device_dies_and_is_born_again() -> None:
    node, _ = born(view("a"))
    death = node.update_device(view("a", alive=False, liveness="failed"), NOW + 1)
    assert kinds(death) == ["DDEATH"] and death.publish[0].topic.endswith("/DDEATH/hub-1/a")
    assert decoded(death.publish[0]).seq == 2 and not decoded(death.publish[0]).metrics
    assert node.update_device(view("a", alive=False), NOW + 2).publish == []  # dead stays dead, quietly
    assert kinds(node.update_device(view("a"), NOW + 3)) == ["DBIRTH"]
    assert node.update_device(view("a"), NOW + 4).publish == []  # nothing changed
    # Born again while alive: a new boot (the agent restarted) or new labels bring a new DBIRTH.
    assert kinds(node.update_device(view("a", boot=2), NOW + 5)) == ["DBIRTH"]
    assert kinds(node.update_device(view("a", boot=2, labels={"line": "3"}), NOW + 6)) == ["DBIRTH"]
    gone = node.remove_device("a", NOW + 7)
    assert kinds(gone) == ["DDEATH"] and "a" not in node.devices


def test_data_by_exception_past_each_deadband_with_aliases_only() -> None:
    node, out = born(view("a"), cpu=2.0, temp=0.5)
    aliases = {m.name: m.alias for m in decoded(out.publish[1]).metrics}
    assert node.update_device(view("a", cpu=11.5), NOW + 1).publish == []  # within 2: not sent
    data = node.update_device(view("a", cpu=12.5, health="degraded"), NOW + 2)
    assert kinds(data) == ["DDATA"]
    payload = decoded(data.publish[0])
    assert payload.seq == 2 and payload.timestamp == NOW + 2
    assert [(m.HasField("name"), m.HasField("datatype"), m.alias, value(m)) for m in payload.metrics] == [
        (False, False, aliases["Telemetry/CPU"], 12.5), (False, False, aliases["Status/Health"], "degraded")]
    # The deadband is measured from the value last sent, so a slow drift is sent once it adds up.
    assert node.update_device(view("a", cpu=13.5, health="degraded"), NOW + 3).publish == []
    assert kinds(node.update_device(view("a", cpu=14.6, health="degraded"), NOW + 4)) == ["DDATA"]
    # null and back: a sensor that appears, and goes
    appear = decoded(node.update_device(view("a", cpu=14.6, health="degraded", temp=40.0), NOW + 5).publish[0])
    assert [(m.alias, value(m)) for m in appear.metrics] == [(aliases["Telemetry/Temperature"], 40.0)]
    vanish = decoded(node.update_device(view("a", cpu=14.6, health="degraded"), NOW + 6).publish[0])
    assert vanish.metrics[0].is_null and value(vanish.metrics[0]) is None


def test_a_zero_deadband_sends_every_change() -> None:
    node, _ = born(view("a"), cpu=0.0)
    assert kinds(node.update_device(view("a", cpu=10.01), NOW + 1)) == ["DDATA"]


def test_node_metrics_go_out_as_ndata_when_they_change() -> None:
    node = edge()
    node.update_node({"nodes_online": 1, "fleet": "f"}, NOW)
    births = node.connected(0, NOW)
    metrics = by_name(decoded(births.publish[0]))
    assert value(metrics["Fleet/Nodes Online"]) == 1 and value(metrics["Properties/Fleet"]) == "f"
    assert node.update_node({"nodes_online": 1}, NOW + 1).publish == []
    out = node.update_node({"nodes_online": 2}, NOW + 2)
    assert kinds(out) == ["NDATA"]
    sent = decoded(out.publish[0]).metrics
    assert [(m.HasField("name"), m.alias, value(m)) for m in sent] == [(False, metrics["Fleet/Nodes Online"].alias, 2)]


def test_seq_wraps_from_255_to_0_across_node_and_device_messages() -> None:
    node, out = born(view("a"), cpu=0.0)
    seqs = [decoded(m).seq for m in out.publish]
    for i in range(600):
        seqs += [decoded(m).seq for m in node.update_device(view("a", cpu=float(i)), NOW + i).publish]
        if i % 7 == 0:
            seqs += [decoded(m).seq for m in node.update_node({"runs_active": i}, NOW + i).publish]
    assert seqs[:3] == [0, 1, 2] and len(seqs) > 600
    assert all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:]))
    assert seqs.count(0) >= 2 and max(seqs) == 255


# -- rebirth and the primary host ----------------------------------------------------------------------------------

def test_a_rebirth_request_repeats_every_birth_with_the_same_bdseq() -> None:
    node, first = born(view("a"), view("b"), view("c", alive=False))
    node.update_device(view("a", cpu=50.0), NOW + 1)
    out = node.received(f"spBv1.0/{GROUP}/NCMD/{NODE}", command(boolean(True, REBIRTH)), NOW + 2)
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DBIRTH"] and not out.refused
    again = [decoded(m) for m in out.publish]
    assert [p.seq for p in again] == [0, 1, 2]
    assert value(by_name(again[0])[BD_SEQ]) == 4  # not a new MQTT session: the same bdSeq
    assert value(by_name(again[1])["Telemetry/CPU"]) == 50.0  # births carry the current values
    declared = {(m.name, m.alias) for p in first.publish for m in decoded(p).metrics}
    assert declared == {(m.name, m.alias) for p in again for m in p.metrics}  # the same names and aliases
    # A Rebirth of false asks for nothing.
    assert node.received(f"spBv1.0/{GROUP}/NCMD/{NODE}", command(boolean(False, REBIRTH)), NOW + 3) == Output()


def test_births_wait_for_the_primary_host_and_follow_its_state() -> None:
    node = edge(host=HOST)
    assert node.subscriptions() == [f"spBv1.0/{GROUP}/NCMD/{NODE}", f"spBv1.0/{GROUP}/DCMD/{NODE}/+",
                                    f"spBv1.0/STATE/{HOST}"]
    topic = f"spBv1.0/STATE/{HOST}"
    assert node.connected(0, NOW) == Output() and node.state == WAITING
    assert node.update_device(view("a"), NOW) == Output()
    assert node.received(topic, state(False, 100), NOW) == Output() and node.state == WAITING  # retained death
    assert kinds(node.received(topic, state(True, 200), NOW)) == ["NBIRTH", "DBIRTH"]
    assert node.received(topic, state(True, 200), NOW) == Output()  # the same host session again: nothing
    # The host came back with a newer session we never saw die: it gets every birth again, same bdSeq.
    again = node.received(topic, state(True, 300), NOW)
    assert kinds(again) == ["NBIRTH", "DBIRTH"] and value(by_name(decoded(again.publish[0]))[BD_SEQ]) == 0
    assert node.received(topic, state(False, 250), NOW) == Output() and node.state == BORN  # older: ignored
    out = node.received(topic, state(False, 300), NOW)
    assert kinds(out) == ["NDEATH"] and out.disconnect and node.state == CLOSING
    ndeath = decoded(out.publish[0])
    assert (out.publish[0].qos, ndeath.HasField("seq"), value(ndeath.metrics[0])) == (1, False, 0)
    node.disconnected()
    assert node.state == OFFLINE and node.connected(1, NOW) == Output() and node.state == WAITING
    reborn = node.received(topic, state(True, 400), NOW)
    assert value(by_name(decoded(reborn.publish[0]))[BD_SEQ]) == 1


def test_a_stopping_edge_node_publishes_its_ndeath() -> None:
    node, _ = born(view("a"))
    out = node.closing(NOW)
    assert kinds(out) == ["NDEATH"] and value(decoded(out.publish[0]).metrics[0]) == 4
    node.disconnected()
    assert node.closing(NOW) == Output()
    # Offline, nothing goes out (births will carry the change); a birth asked for there is a bug of ours.
    assert node.update_device(view("a", cpu=90.0), NOW) == Output()
    with pytest.raises(EdgeNodeMisuse):
        node._births(NOW)


def test_the_edge_nodes_misuse_error_is_no_protocol_error_and_shares_the_one_root() -> None:
    import hub.sparkplug.edge as edge
    import protocols
    from hub.transitions import IllegalTransition

    # Bugs of ours, both: one error root (FleetflowError), and neither mistaken for the wire protocol's own errors.
    for bug in (EdgeNodeMisuse, IllegalTransition):
        assert issubclass(bug, protocols.FleetflowError) and issubclass(bug, RuntimeError)
        assert not issubclass(bug, protocols.ProtocolError)
    assert not hasattr(edge, "LocalProtocolError")


def test_bdseq_starts_at_zero_and_wraps(tmp_path: Path) -> None:
    assert [next_bd_seq(None), next_bd_seq(0), next_bd_seq(254), next_bd_seq(255)] == [0, 1, 255, 0]
    store = BdSeqFile(tmp_path / "sparkplug.json")
    assert [store.next(), store.next(), BdSeqFile(store.path).next()] == [0, 1, 2]  # kept across restarts
    store.path.write_text('{"bdSeq": 255}')
    assert store.next() == 0
    store.path.write_text("garbage")
    assert store.next() == 0 and json.loads(store.path.read_text()) == {"bdSeq": 0}


# -- commands ------------------------------------------------------------------------------------------------------

def test_a_dcmd_drain_by_alias_or_name_is_a_drain_action() -> None:
    node, out = born(view("a"))
    alias = by_name(decoded(out.publish[1]))[DRAIN].alias
    topic = f"spBv1.0/{GROUP}/DCMD/{NODE}/a"
    assert node.received(topic, command(boolean(True, alias=alias)), NOW).actions == [DrainRequest("a", True)]
    assert node.received(topic, command(boolean(False, name=DRAIN)), NOW).actions == [DrainRequest("a", False)]


BAD_COMMANDS = {
    "not protobuf": ("NCMD", b"\xff\xff\xff\xff not protobuf", "malformed"),
    "no metrics": ("NCMD", command(), "malformed"),
    "too large": ("NCMD", command(boolean(True, REBIRTH)) + b"\x00" * 70_000, "too-large"),
    "rebirth as a string": ("NCMD", command(pb.Payload.Metric(name=REBIRTH, string_value="true")), "wrong-type"),
    "rebirth null": ("NCMD", command(pb.Payload.Metric(name=REBIRTH, is_null=True)), "wrong-type"),
    "unknown node metric": ("NCMD", command(boolean(True, "Node Control/Reboot")), "unknown-metric"),
    "write bdSeq": ("NCMD", command(pb.Payload.Metric(name=BD_SEQ, long_value=9)), "read-only"),
    "write a node property": ("NCMD", command(pb.Payload.Metric(alias=1, string_value="x")), "read-only"),
    "unknown device metric": ("DCMD/a", command(boolean(True, "Device Control/Reboot")), "unknown-metric"),
    "another device's alias": ("DCMD/a", command(boolean(True, alias=2 * 256 + 8)), "unknown-metric"),
    "read-only device metric": ("DCMD/a", command(pb.Payload.Metric(name="Telemetry/CPU", double_value=1)),
                                "read-only"),
    "drain as an int": ("DCMD/a", command(pb.Payload.Metric(name=DRAIN, int_value=1)), "wrong-type"),
    "drain declared Int32": ("DCMD/a", command(pb.Payload.Metric(name=DRAIN, datatype=pb.Int32, boolean_value=True)),
                             "wrong-type"),
    "one bad among good": ("DCMD/a", command(boolean(True, DRAIN), boolean(True, "Nope")), "unknown-metric"),
    "unknown device": ("DCMD/zz", command(boolean(True, DRAIN)), "unknown-device"),
    "dead device": ("DCMD/dead", command(boolean(True, DRAIN)), "unknown-device"),
    "dcmd garbage": ("DCMD/a", b"\x0a\x05\x08", "malformed"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_commands_are_refused_and_change_nothing(case: str) -> None:
    kind, data, reason = BAD_COMMANDS[case]
    node, _ = born(view("a"), view("dead", alive=False))
    out = node.received(f"spBv1.0/{GROUP}/{kind.split('/')[0]}/{NODE}" + (f"/{kind.split('/')[1]}" if "/" in kind
                                                                           else ""), data, NOW)
    assert [r.reason for r in out.refused] == [reason] and out.publish == [] and out.actions == []
    # The session goes on: the next message numbers on from the births.
    assert decoded(node.update_device(view("a", health="unhealthy"), NOW).publish[0]).seq == 2


def test_dcmd_is_refused_while_commands_are_off() -> None:
    node, out = born(view("a"), commands=False)
    alias = by_name(decoded(out.publish[1]))[DRAIN].alias
    refused = node.received(f"spBv1.0/{GROUP}/DCMD/{NODE}/a", command(boolean(True, alias=alias)), NOW)
    assert [r.reason for r in refused.refused] == ["commands-disabled"] and refused.actions == []


@pytest.mark.parametrize("data", [b"online", b"", b"[]", b'{"online": true}', b'{"timestamp": 5}',
                                  b'{"online": "yes", "timestamp": 5}', b'{"online": true, "timestamp": "5"}',
                                  b'{"online": true, "timestamp": true}', b'{"online": true, "timestamp": -1}',
                                  b'{"online": true, "timestamp": NaN}', b"\xff\xfe", b" " * 2000 + b"{}",
                                  b"[" * 5000 + b"]" * 5000,
                                  json.dumps({"online": True, "timestamp": 5, "pad": "x" * 1100}).encode()])
def test_a_state_that_is_not_the_documented_json_is_refused(data: bytes) -> None:
    node = edge(host=HOST)
    node.connected(0, NOW)
    out = node.received(f"spBv1.0/STATE/{HOST}", data, NOW)
    assert [r.reason for r in out.refused] == ["bad-state"] and node.state == WAITING and node.host_online is None


# -- properties ----------------------------------------------------------------------------------------------------

@dataclass
class Wire:
    """What a host would see: every message of every session, checked as it goes."""

    session_bd_seq: int | None = None
    last_seq: int | None = None
    aliases: dict[int, tuple[str | None, str]] = field(default_factory=dict)   # alias -> (device, metric name)
    declared: dict[str | None, set[int]] = field(default_factory=dict)         # device (None: node) -> its aliases
    messages: int = 0
    wrapped: bool = False
    data: int = 0

    def see(self, message: Publish) -> None:
        self.messages += 1
        payload = decoded(message)
        kind, device = message.kind, (message.topic.split("/")[4] if message.topic.count("/") == 4 else None)
        if kind == "NDEATH":
            assert message.qos == 1 and not payload.HasField("seq")
            assert [value(m) for m in payload.metrics] == [self.session_bd_seq]
            self.last_seq = None
            return
        assert (message.qos, message.retain) == (0, False)
        if kind == "NBIRTH":
            assert payload.seq == 0 and value(by_name(payload)[BD_SEQ]) == self.session_bd_seq
            self.declared = {None: set()}
        else:
            assert self.last_seq is not None, f"{kind} before any NBIRTH"
            assert payload.seq == (self.last_seq + 1) % 256
            self.wrapped = self.wrapped or payload.seq == 0
        self.last_seq = payload.seq
        if kind in ("NBIRTH", "DBIRTH"):
            declared = self.declared.setdefault(device, set())
            declared.clear()
            for metric in payload.metrics:
                assert metric.HasField("name") and metric.HasField("datatype")
                if metric.name in (BD_SEQ, REBIRTH):
                    assert not metric.HasField("alias")
                    continue
                assert self.aliases.setdefault(metric.alias, (device, metric.name)) == (device, metric.name)
                declared.add(metric.alias)
        elif kind in ("NDATA", "DDATA"):
            self.data += kind == "DDATA"
            assert payload.metrics
            for metric in payload.metrics:
                assert not metric.HasField("name") and metric.alias in self.declared.get(device, set())
        elif kind == "DDEATH":
            assert device in self.declared, "a DDEATH of a device never born in this session"
            del self.declared[device]


update = st.tuples(st.just("device"), st.integers(0, 4), st.integers(0, 9).map(lambda n: n < 8),  # alive 4 in 5
                   st.floats(0, 100, allow_nan=False), st.sampled_from(["healthy", "degraded", "unhealthy"]))
operation = st.one_of(
    update, update, update, update, update, update,  # mostly what a fleet does: nodes change
    st.tuples(st.just("reboot"), st.integers(0, 4)),
    st.tuples(st.just("remove"), st.integers(0, 4)),
    st.tuples(st.just("fleet"), st.integers(0, 5)),
    st.tuples(st.just("rebirth"), st.booleans()),
    st.tuples(st.just("reconnect")),
    st.tuples(st.just("state"), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("garbage"), st.binary(max_size=40)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, min_size=10, max_size=400), st.booleans(), st.floats(0, 5))
def test_seq_and_alias_rules_hold_for_any_sequence_of_events(ops: list[tuple[Any, ...]], with_host: bool,
                                                            band: float) -> None:
    node = edge(host=HOST if with_host else None, cpu=band)
    wire = Wire()
    bd_seq = 0

    def connect() -> None:
        wire.session_bd_seq, wire.last_seq = bd_seq, None
        for message in node.connected(bd_seq, NOW).publish:
            wire.see(message)

    connect()
    boots = [1] * 5
    for position, op in enumerate(ops):
        out = Output()
        if op[0] == "device":
            _, i, alive, cpu, health = op
            # Hypothesis favours repeating its simplest values; moving the figure on with the position makes
            # updates that do change (data messages) as common as those that do not.
            cpu = (cpu + 13.0 * position) % 100
            out = node.update_device(view(f"n{i}", alive, boots[i], cpu=cpu, health=health), NOW)
        elif op[0] == "reboot":
            boots[op[1]] += 1
            out = node.update_device(view(f"n{op[1]}", True, boots[op[1]]), NOW)
        elif op[0] == "remove":
            out = node.remove_device(f"n{op[1]}", NOW)
        elif op[0] == "fleet":
            out = node.update_node({"nodes_online": op[1]}, NOW)
        elif op[0] == "rebirth":
            out = node.received(f"spBv1.0/{GROUP}/NCMD/{NODE}", command(boolean(op[1], REBIRTH)), NOW)
        elif op[0] == "state":
            out = node.received(f"spBv1.0/STATE/{HOST}", state(op[1], op[2]), NOW)
        elif op[0] == "garbage":
            out = node.received(f"spBv1.0/{GROUP}/NCMD/{NODE}", op[1], NOW)
            assert out.publish == [] and (out.refused or out == Output())
        for message in out.publish:
            wire.see(message)
        if out.disconnect or op[0] == "reconnect":
            node.disconnected()
            bd_seq = next_bd_seq(bd_seq)
            connect()
    target(float(wire.messages), label="messages")  # steer towards long sessions, where seq wraps
    target(float(wire.data), label="DDATA")
    event("seq wrapped past 255" if wire.wrapped else "seq did not wrap")
    event("with DDATA" if wire.data else "without DDATA")
