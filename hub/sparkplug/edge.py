"""The hub as a Sparkplug B Edge Node, sans I/O (like h11's connection object): callers feed it what happened (a
session began or ended, a fleetflow node changed, a command or STATE message arrived, with `now`) and it returns what
to publish and what to do. It never reads a clock or touches a socket, so every rule is tested deterministically.

The rules it keeps, from the Sparkplug 3.0.0 specification:
- NDEATH is the MQTT Will (QoS 1, not retained) and carries only `bdSeq`; the NBIRTH of that session carries the same
  `bdSeq`, and so does every NBIRTH a rebirth request brings (a rebirth is not a new MQTT session).
- `seq` is 0 in every NBIRTH and grows by one in every later message of the session, 255 wrapping to 0; NDEATH,
  NCMD and DCMD carry none.
- A birth declares every metric the node or device will ever send, each with its name, datatype and an alias unique
  across the Edge Node; data messages carry aliases only. `bdSeq` and `Node Control/Rebirth` have no alias: a host
  must recognise them without having seen a birth.
- Births, data and deaths are QoS 0, never retained. DBIRTHs follow their NBIRTH; no data goes out before them.
- With a primary host configured, births wait for its STATE to say online; a STATE offline at least as new as the
  last online one ends the session (NDEATH, then disconnect and start over).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocols import FleetflowError

from . import sparkplug_b_pb2 as pb
from .codec import (BAD_STATE, COMMANDS_DISABLED, READ_ONLY, UNKNOWN_DEVICE, UNKNOWN_METRIC, MetricSpec, Refused,
                    Value, boolean_of, decode, encode, metric, with_properties)
from .settings import NAMESPACE, sparkplug_topic, state_topic

BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
ALIAS_STRIDE = 256  # device aliases are slot * 256 + metric number: unique across the Edge Node by construction
MAX_STATE_BYTES = 1024
SEQ_MODULUS = 256
BD_SEQ_MODULUS = 256

NODE_METRICS = (
    MetricSpec("hub_version", "Properties/Hub Version", pb.String),
    MetricSpec("fleet", "Properties/Fleet", pb.String),
    MetricSpec("nodes_online", "Fleet/Nodes Online", pb.UInt32),
    MetricSpec("nodes_suspected", "Fleet/Nodes Suspected", pb.UInt32),
    MetricSpec("nodes_failed", "Fleet/Nodes Failed", pb.UInt32),
    MetricSpec("nodes_offline", "Fleet/Nodes Offline", pb.UInt32),
    MetricSpec("runs_active", "Fleet/Runs Active", pb.UInt32),
    MetricSpec("steps_queued", "Fleet/Steps Queued", pb.UInt32),
)
DEVICE_METRICS = (
    MetricSpec("cpu", "Telemetry/CPU", pb.Double),                  # percent
    MetricSpec("mem", "Telemetry/Memory", pb.Double),               # percent used
    MetricSpec("disk", "Telemetry/Disk", pb.Double),                # percent used
    MetricSpec("temp", "Telemetry/Temperature", pb.Double),         # degrees Celsius; null without a sensor
    MetricSpec("liveness", "Status/Liveness", pb.String),           # online, suspected (failed/offline: DDEATH)
    MetricSpec("health", "Status/Health", pb.String),               # healthy, degraded, unhealthy
    MetricSpec("running", "Status/Running Steps", pb.UInt32),
    MetricSpec("drain", "Device Control/Drain", pb.Boolean, writable=True),
    MetricSpec("version", "Properties/Agent Version", pb.String),
    MetricSpec("profile", "Properties/Profile", pb.String),
    MetricSpec("labels", "Properties/Labels", pb.String),           # "k=v,...", each label also a property
)
_DEVICE_BY_NAME = {spec.name: number for number, spec in enumerate(DEVICE_METRICS, 1)}
_NODE_BY_NAME = {spec.name: number for number, spec in enumerate(NODE_METRICS, 1)}

# The Sparkplug session, as a table of the moves allowed: anything else is a bug of ours (EdgeNodeMisuse).
OFFLINE, WAITING, BORN, CLOSING = "offline", "waiting", "born", "closing"
SESSION_TRANSITIONS = {
    OFFLINE: {WAITING, BORN},          # connected: births at once, or after the primary host's STATE online
    WAITING: {BORN, CLOSING, OFFLINE},
    BORN: {BORN, CLOSING, OFFLINE},    # born again: a rebirth request, or the primary host back with a new session
    CLOSING: {OFFLINE},                # NDEATH published, the caller disconnects
}


class EdgeNodeMisuse(FleetflowError, RuntimeError):
    """We asked the edge node for something its session state does not allow: a bug of ours, never input."""


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str  # NBIRTH, NDATA, NDEATH, DBIRTH, DDATA, DDEATH


@dataclass(frozen=True)
class DrainRequest:
    """A DCMD write of Device Control/Drain: the hub's drain node action."""

    node: str
    on: bool


@dataclass(frozen=True)
class Refusal:
    reason: str   # one of codec.REASONS
    detail: str


@dataclass
class Output:
    publish: list[Publish] = field(default_factory=list)
    actions: list[DrainRequest] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    disconnect: bool = False  # the session must end (after `publish` is out): the caller disconnects, reconnects
    rebirth: bool = False     # an NCMD rebirth request was answered (its births are in `publish`): an operator action


@dataclass(frozen=True)
class EdgeConfig:
    group: str
    node_id: str
    host: str | None = None
    deadband: Mapping[str, float] = field(default_factory=dict)
    commands: bool = False


@dataclass(frozen=True)
class DeviceView:
    """A fleetflow node as a Sparkplug device: `alive` (online or suspected) decides born or dead; `values` holds
    each DEVICE_METRICS key's current value; a new `boot` or new labels make a new DBIRTH."""

    id: str
    alive: bool
    boot: int
    values: Mapping[str, Value]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Device:
    slot: int
    view: DeviceView
    born: bool = False                       # a DBIRTH went out in this session and no DDEATH since
    identity: tuple[object, ...] = ()        # (boot, labels) of the last DBIRTH
    sent: dict[str, Value] = field(default_factory=dict)


def next_bd_seq(last: int | None) -> int:
    """The bdSeq of a new MQTT CONNECT: 0 the first time, then one more than the previous, 255 wrapping to 0."""
    return 0 if last is None else (last + 1) % BD_SEQ_MODULUS


def parse_state(data: bytes) -> tuple[bool, int]:
    """A primary host's STATE: JSON {"online": bool, "timestamp": ms since the epoch}; anything else is refused."""
    if len(data) > MAX_STATE_BYTES:
        raise Refused(BAD_STATE, f"a STATE of {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused(BAD_STATE, f"a STATE that is not JSON: {data[:60]!r}") from None
    online = doc.get("online") if isinstance(doc, dict) else None
    stamp = doc.get("timestamp") if isinstance(doc, dict) else None
    if not isinstance(online, bool):
        raise Refused(BAD_STATE, "a STATE without a boolean 'online'")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp) or stamp < 0:
        raise Refused(BAD_STATE, "a STATE without a numeric 'timestamp' (ms since the epoch)")
    return online, int(stamp)


class EdgeNode:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.state = OFFLINE
        self.bd_seq: int | None = None
        self.host_online: bool | None = None  # the primary host's STATE on this connection; None: not heard yet
        self.host_since: int | None = None     # timestamp of the last online STATE honoured
        self.devices: dict[str, _Device] = {}
        self.node_values: dict[str, Value] = {}
        self._node_sent: dict[str, Value] = {}
        self._seq = 0
        self._slots = itertools.count(1)

    # -- topics ----------------------------------------------------------------------------------------------------

    def topic(self, kind: str, device: str | None = None) -> str:
        return sparkplug_topic(self.config.group, kind, self.config.node_id, device)

    def subscriptions(self) -> list[str]:
        """NCMD (rebirth requests) and DCMD, and the primary host's STATE: all before the NBIRTH, at QoS 1."""
        topics = [self.topic("NCMD"), self.topic("DCMD", "+")]
        if self.config.host is not None:
            topics.append(state_topic(self.config.host))
        return topics

    # -- the session -----------------------------------------------------------------------------------------------

    def will(self, bd_seq: int, now: int) -> Publish:
        """The NDEATH to register as the MQTT Will of the CONNECT that will carry `bd_seq`."""
        return Publish(self.topic("NDEATH"), self._death_payload(bd_seq, now), 1, False, "NDEATH")

    def connected(self, bd_seq: int, now: int) -> Output:
        """The MQTT session with this bdSeq in its Will is up and subscribed: births now, or once the primary host
        says it is online (its retained STATE comes with the subscription)."""
        self.bd_seq = bd_seq
        self.host_online = None
        if self.config.host is not None:
            self._move(WAITING)
            return Output()
        return self._births(now)

    def closing(self, now: int) -> Output:
        """We are about to disconnect on purpose: the specification wants an NDEATH published first."""
        if self.state not in (WAITING, BORN) or self.bd_seq is None:
            return Output()
        self._move(CLOSING)
        return Output([self._ndeath(now)])

    def disconnected(self) -> None:
        """The MQTT session ended (lost, or closed by us): nothing is born any more; views are kept for next time."""
        if self.state != OFFLINE:
            self._move(OFFLINE)
        self.bd_seq = None
        self.host_online = None
        for device in self.devices.values():
            device.born = False

    # -- what the hub tells it -------------------------------------------------------------------------------------

    def update_node(self, values: Mapping[str, Value], now: int) -> Output:
        """The Edge Node's own metrics (NODE_METRICS keys); an NDATA of those that changed, once born."""
        self.node_values.update(values)
        if self.state != BORN:
            return Output()
        metrics = self._changes(NODE_METRICS, self._node_sent, self.node_values, 0, now)
        return Output([self._message("NDATA", None, metrics, now)]) if metrics else Output()

    def update_device(self, view: DeviceView, now: int) -> Output:
        """A fleetflow node's current view: DBIRTH when it comes alive (or is born again with a new boot or new
        labels), DDATA of what changed beyond its deadband while alive, DDEATH when it dies or fails."""
        device = self.devices.get(view.id)
        if device is None:
            device = self.devices[view.id] = _Device(next(self._slots), view)
        device.view = view
        if self.state != BORN:
            return Output()  # the births of the session will carry it
        if not view.alive:
            return self._ddeath(device, now) if device.born else Output()
        if not device.born or device.identity != _identity(view):
            return Output([self._dbirth(device, now)])
        metrics = self._changes(DEVICE_METRICS, device.sent, view.values, device.slot, now)
        return Output([self._message("DDATA", view.id, metrics, now)]) if metrics else Output()

    def remove_device(self, device_id: str, now: int) -> Output:
        """A node deleted, revoked or rejected: its DDEATH if it was born, and it is forgotten."""
        device = self.devices.pop(device_id, None)
        if device is None or not device.born or self.state != BORN:
            return Output()
        return self._ddeath(device, now)

    # -- what the broker delivers ----------------------------------------------------------------------------------

    def received(self, topic: str, data: bytes, now: int) -> Output:
        """An NCMD, DCMD or STATE message. Anything wrong in it is refused whole and changes nothing."""
        parts = topic.split("/")
        try:
            if self.config.host is not None and parts == [NAMESPACE, "STATE", self.config.host]:
                return self._state(data, now)
            if parts[:4] == [NAMESPACE, self.config.group, "NCMD", self.config.node_id] and len(parts) == 4:
                return self._ncmd(data, now)
            if parts[:4] == [NAMESPACE, self.config.group, "DCMD", self.config.node_id] and len(parts) == 5:
                return self._dcmd(parts[4], data)
        except Refused as exc:
            return Output(refused=[Refusal(exc.reason, str(exc))])
        return Output()  # not a topic of ours: our subscriptions never deliver one

    def _state(self, data: bytes, now: int) -> Output:
        online, stamp = parse_state(data)
        if online:
            renewed = self.host_since is None or stamp > self.host_since
            self.host_since = stamp if self.host_since is None else max(self.host_since, stamp)
            self.host_online = True
            if self.state == WAITING or (self.state == BORN and renewed):
                # Waiting: go. Born: the host has a newer session than the one that saw our births, so it may have
                # missed them; it gets the whole birth sequence again (same bdSeq: our MQTT session is the same).
                return self._births(now)
            return Output()
        if self.host_since is not None and stamp < self.host_since:
            return Output()  # the death of an older host session, delivered late: the host is back already
        self.host_online = False
        if self.state != BORN:
            return Output()  # not born yet: keep waiting (reconnecting would find the same retained STATE)
        out = self.closing(now)
        out.disconnect = True
        return out

    def _ncmd(self, data: bytes, now: int) -> Output:
        payload = decode(data)
        rebirth = False
        for command in payload.metrics:
            name = command.name if command.HasField("name") else None
            if name == REBIRTH:
                rebirth = rebirth or boolean_of(command, REBIRTH)
            elif name == BD_SEQ or name in _NODE_BY_NAME or (name is None and command.alias in _NODE_BY_NAME.values()):
                raise Refused(READ_ONLY, f"NCMD writes {name or f'alias {command.alias}'}, which a host may not write")
            else:
                raise Refused(UNKNOWN_METRIC, f"NCMD names an unknown metric {name or f'alias {command.alias}'!r}")
        if rebirth and self.state == BORN:
            out = self._births(now)
            out.rebirth = True
            return out
        return Output()  # a rebirth before the births (waiting for the host) is answered by those births

    def _dcmd(self, device_id: str, data: bytes) -> Output:
        if not self.config.commands:  # cheap checks first: nothing is parsed while commands are off
            raise Refused(COMMANDS_DISABLED, f"DCMD for {device_id[:64]!r}: device commands are off "
                                             f"(--sparkplug-commands)")
        device = self.devices.get(device_id)
        if device is None or not device.born or self.state != BORN:
            raise Refused(UNKNOWN_DEVICE, f"DCMD for {device_id[:64]!r}, not a device born in this session")
        payload = decode(data)
        actions = []
        for command in payload.metrics:
            number = self._device_metric(device, command)
            spec = DEVICE_METRICS[number - 1]
            if not spec.writable:
                raise Refused(READ_ONLY, f"DCMD writes {spec.name}, which a host may not write")
            actions.append(DrainRequest(device_id, boolean_of(command, spec.name)))
        return Output(actions=actions)

    def _device_metric(self, device: _Device, command: pb.Payload.Metric) -> int:
        """The DEVICE_METRICS number a command names: by alias (the specification's way) or by name."""
        if command.HasField("alias"):
            slot, number = divmod(command.alias, ALIAS_STRIDE)
            if slot == device.slot and 1 <= number <= len(DEVICE_METRICS):
                return number
            raise Refused(UNKNOWN_METRIC, f"DCMD names alias {command.alias}, not one of device {device.view.id}")
        named = _DEVICE_BY_NAME.get(command.name) if command.HasField("name") else None
        if named is None:
            raise Refused(UNKNOWN_METRIC, f"DCMD names an unknown metric {command.name[:80]!r}")
        return named

    # -- messages --------------------------------------------------------------------------------------------------

    def _births(self, now: int) -> Output:
        """NBIRTH (seq 0) and a DBIRTH for every device alive, in one go: no data can come between them."""
        if self.bd_seq is None:
            raise EdgeNodeMisuse("births outside an MQTT session (no bdSeq)")
        self._move(BORN)
        self._seq = 0
        metrics = [metric(pb.Int64, self.bd_seq, now, name=BD_SEQ),
                   metric(pb.Boolean, False, now, name=REBIRTH)]
        for number, spec in enumerate(NODE_METRICS, 1):
            value = self._node_sent[spec.key] = self.node_values.get(spec.key)
            metrics.append(metric(spec.datatype, value, now, name=spec.name, alias=self._alias(0, number)))
        out = Output([self._message("NBIRTH", None, metrics, now)])
        for device_id in sorted(self.devices):
            device = self.devices[device_id]
            device.born = False
            if device.view.alive:
                out.publish.append(self._dbirth(device, now))
        return out

    def _dbirth(self, device: _Device, now: int) -> Publish:
        view = device.view
        metrics = []
        for number, spec in enumerate(DEVICE_METRICS, 1):
            value = device.sent[spec.key] = view.values.get(spec.key)
            birth = metric(spec.datatype, value, now, name=spec.name, alias=self._alias(device.slot, number))
            metrics.append(with_properties(birth, view.labels) if spec.key == "labels" else birth)
        device.born, device.identity = True, _identity(view)
        return self._message("DBIRTH", view.id, metrics, now)

    def _ddeath(self, device: _Device, now: int) -> Output:
        device.born = False
        return Output([self._message("DDEATH", device.view.id, [], now)])

    def _ndeath(self, now: int) -> Publish:
        assert self.bd_seq is not None
        return Publish(self.topic("NDEATH"), self._death_payload(self.bd_seq, now), 1, False, "NDEATH")

    @staticmethod
    def _death_payload(bd_seq: int, now: int) -> bytes:
        return encode(now, [metric(pb.Int64, bd_seq, now, name=BD_SEQ)], seq=None)

    def _message(self, kind: str, device: str | None, metrics: list[pb.Payload.Metric], now: int) -> Publish:
        if self.state != BORN:
            raise EdgeNodeMisuse(f"a {kind} while the session is {self.state}")
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MODULUS
        return Publish(self.topic(kind, device), encode(now, metrics, seq), 0, False, kind)

    # -- helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _alias(slot: int, number: int) -> int:
        """Metric `number` of the device in `slot` (slot 0: the node's own metrics)."""
        return slot * ALIAS_STRIDE + number

    def _changes(self, specs: tuple[MetricSpec, ...], sent: dict[str, Value], values: Mapping[str, Value], slot: int,
                 now: int) -> list[pb.Payload.Metric]:
        """The data metrics (alias and value only) of what changed since it was last sent; marks them sent. `slot`:
        the device's (0: the node's own metrics)."""
        metrics = []
        for number, spec in enumerate(specs, 1):
            value = values.get(spec.key)
            if self._differs(spec, sent.get(spec.key), value):
                sent[spec.key] = value
                metrics.append(metric(spec.datatype, value, now, alias=self._alias(slot, number)))
        return metrics

    def _differs(self, spec: MetricSpec, sent: Value, now: Value) -> bool:
        """Report by exception: a number moves past its deadband (0: any change), anything else on any change."""
        if sent is None or now is None:
            return sent is not now
        band = self.config.deadband.get(spec.key)
        if band is not None and isinstance(now, float) and isinstance(sent, float):
            return abs(now - sent) > band
        return bool(now != sent) or type(now) is not type(sent)

    def _move(self, new: str) -> None:
        if new not in SESSION_TRANSITIONS[self.state]:
            raise EdgeNodeMisuse(f"Sparkplug session: {self.state} -> {new} is not allowed")
        self.state = new


def _identity(view: DeviceView) -> tuple[object, ...]:
    return view.boot, tuple(sorted(view.labels.items()))
