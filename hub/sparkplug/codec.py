"""Sparkplug B payloads through the classes protoc generated from sparkplug_b.proto: metrics built from typed values,
payloads serialized by protobuf (never hand-encoded), and commands parsed with a size bound and checked by type.
Pure: no I/O, no clock."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from protocols import FleetflowError

from . import sparkplug_b_pb2 as pb

Value = bool | int | float | str | None
Metric = pb.Payload.Metric

# The value field each datatype we send travels in (the specification's "Datatype Details").
_FIELD: dict[int, str] = {
    pb.Int8: "int_value", pb.Int16: "int_value", pb.Int32: "int_value", pb.UInt8: "int_value",
    pb.UInt16: "int_value", pb.UInt32: "int_value", pb.Int64: "long_value", pb.UInt64: "long_value",
    pb.DateTime: "long_value", pb.Float: "float_value", pb.Double: "double_value", pb.Boolean: "boolean_value",
    pb.String: "string_value", pb.Text: "string_value", pb.UUID: "string_value",
}
MAX_COMMAND_BYTES = 64 * 1024  # a command names a few metrics; anything larger is refused before it is parsed

# Why a command or STATE message was refused: a fixed set, used as a Prometheus label and a log key.
MALFORMED = "malformed"                   # not a Sparkplug B protobuf payload, or one with no metrics
TOO_LARGE = "too-large"
UNKNOWN_METRIC = "unknown-metric"         # neither a name nor an alias this node declared
WRONG_TYPE = "wrong-type"                 # a value of another type than the metric's (or null)
READ_ONLY = "read-only"                   # a metric a host may not write
UNKNOWN_DEVICE = "unknown-device"         # a DCMD for a device that is not born in this session
COMMANDS_DISABLED = "commands-disabled"   # a DCMD while --sparkplug-commands is off
BAD_STATE = "bad-state"                   # a STATE message that is not {"online": bool, "timestamp": ms}
REASONS = (MALFORMED, TOO_LARGE, UNKNOWN_METRIC, WRONG_TYPE, READ_ONLY, UNKNOWN_DEVICE, COMMANDS_DISABLED, BAD_STATE)


class Refused(FleetflowError):
    """A message a host (or anyone on the broker) sent that we will not act on; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the catalogue: `key` names its value in a view (and its deadband), `name` is the Sparkplug
    metric name (folders by '/'), `datatype` a Sparkplug DataType."""

    key: str
    name: str
    datatype: int
    writable: bool = False


def metric(datatype: int, value: Value, timestamp: int, name: str | None = None, alias: int | None = None) -> Metric:
    """A metric as a birth carries it (with `name`: name, alias, datatype, value) or as data carries it (alias and
    value; the specification says data messages should leave the datatype out). `datatype` picks the value field."""
    out = Metric(timestamp=timestamp)
    if name is not None:
        out.name = name
        out.datatype = datatype
    if alias is not None:
        out.alias = alias
    if value is None:
        out.is_null = True  # the specification's null: no value field at all
        return out
    field = _FIELD[datatype]
    if field == "int_value":
        out.int_value = int(value) & 0xFFFFFFFF  # signed types travel as their two's complement in a uint32
    elif field == "long_value":
        out.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif field in ("float_value", "double_value"):
        setattr(out, field, float(value))
    elif field == "boolean_value":
        out.boolean_value = bool(value)
    else:
        out.string_value = str(value)
    return out


def with_properties(out: Metric, properties: Mapping[str, str]) -> Metric:
    """String properties on a metric (a PropertySet: keys and values, two arrays of one length)."""
    for key, value in sorted(properties.items()):
        out.properties.keys.append(key)
        out.properties.values.append(pb.Payload.PropertyValue(type=pb.String, string_value=value))
    return out


def encode(timestamp: int, metrics: Iterable[Metric], seq: int | None) -> bytes:
    """A payload: `seq` is None only for NDEATH (the specification forbids it there)."""
    payload = pb.Payload(timestamp=timestamp)
    if seq is not None:
        payload.seq = seq
    payload.metrics.extend(metrics)
    return payload.SerializeToString()


def decode(data: bytes, limit: int = MAX_COMMAND_BYTES) -> pb.Payload:
    """A command payload, bounded before it is parsed; one naming no metric asks for nothing and is refused."""
    if len(data) > limit:
        raise Refused(TOO_LARGE, f"{len(data)} bytes, more than {limit}")
    try:
        payload = pb.Payload.FromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise Refused(MALFORMED, f"not a Sparkplug B payload: {str(exc)[:120]}") from None
    if not payload.metrics:
        raise Refused(MALFORMED, "a command with no metrics")
    return payload


def boolean_of(command: Metric, what: str) -> bool:
    """The value of a command that writes a Boolean metric: a boolean_value, never null nor another type."""
    declared = command.datatype if command.HasField("datatype") else pb.Boolean
    if command.is_null or command.WhichOneof("value") != "boolean_value" or declared != pb.Boolean:
        kind = "null" if command.is_null else command.WhichOneof("value") or "no value"
        raise Refused(WRONG_TYPE, f"{what} takes a Boolean, got {kind}")
    return bool(command.boolean_value)


def finite(value: object) -> float | None:
    """A number a metric can carry, or None (null) for anything else: NaN would differ from itself for ever."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
