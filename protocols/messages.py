"""Message types: one frozen dataclass per type, and the table-driven codec that checks them on decode.

The payload is one flat CBOR map with text keys: the header fields (`v`, `type`, `fleet`, `src`, `boot`, `seq`, `ts`,
and for hub commands `dst`, `exp`) next to the type's own fields. Unknown keys are ignored, so a minor protocol
version can add optional fields. Every field is declared once with a checker; decoding walks that table and an
error names the field path, e.g. `field 'running[0].attempt': expected an id`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple

from .errors import LocalProtocolError, Malformed
from .topics import is_valid_id

PROTOCOL_VERSION: Final = 1
MAX_CONTAINER: Final = 4096
MAX_TEXT: Final = 4096
UINT_MAX: Final = 2**63 - 1

Encode = Callable[[Any], Any]


# ---------------------------------------------------------------------------------------------------------------
# Checkers: (decode, encode) pairs. decode(value) returns the Python value or raises _Invalid. The field path is
# added while the error unwinds, so the happy path never builds path strings.


class _Invalid(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path: list[str] = []

    def at(self, part: str) -> _Invalid:
        self.path.append(part)
        return self

    def to_malformed(self) -> Malformed:
        path = "".join(reversed(self.path)).lstrip(".")
        return Malformed(f"field '{path}': {self.detail}" if path else self.detail)


@dataclass(frozen=True, slots=True)
class Check:
    decode: Callable[[Any], Any]
    encode: Encode = staticmethod(lambda value: value)  # type: ignore[assignment]
    describe: str = ""


def _bad(expected: str, value: Any) -> _Invalid:
    return _Invalid(f"expected {expected}, got {type(value).__name__}")


def _uint(value: Any) -> int:
    if type(value) is not int:
        raise _bad("an unsigned integer", value)
    if not 0 <= value <= UINT_MAX:
        raise _Invalid(f"{value} is out of range")
    return value


def _id(value: Any) -> str:
    if not is_valid_id(value):
        if isinstance(value, str):
            raise _Invalid(f"{value[:80]!r} is not an id ([A-Za-z0-9_.-]{{1,64}})")
        raise _bad("an id", value)
    return value  # type: ignore[no-any-return]


def _text(value: Any) -> str:
    if type(value) is not str:
        raise _bad("a text string", value)
    if len(value) > MAX_TEXT:
        raise _Invalid(f"text of {len(value)} characters is over {MAX_TEXT}")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _bad("true or false", value)
    return value


def _number(value: Any) -> float:
    if type(value) is float:
        if not math.isfinite(value):
            raise _Invalid(f"{value} is not a finite number")
        return value
    if type(value) is int:
        return float(value)
    raise _bad("a number", value)


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise _Invalid(f"must be greater than 0, got {number}")
    return number


def _key32(value: Any) -> bytes:
    if type(value) is not bytes:
        raise _bad("a 32-byte public key", value)
    if len(value) != 32:
        raise _Invalid(f"a public key has 32 bytes, got {len(value)}")
    return value


def _fixed_bytes(size: int, what: str) -> Callable[[Any], bytes]:
    def decode(value: Any) -> bytes:
        if type(value) is not bytes:
            raise _bad(f"{what} ({size} bytes)", value)
        if len(value) != size:
            raise _Invalid(f"{what} has {size} bytes, got {len(value)}")
        return value

    return decode


def _container_size(value: Any) -> None:
    if len(value) > MAX_CONTAINER:
        raise _Invalid(f"{len(value)} entries is over the limit of {MAX_CONTAINER}")


def _data(value: Any) -> Any:
    """Free-form step data: null, bool, int, float, text, bytes, arrays and maps with text keys."""
    kind = type(value)
    if value is None or kind in (bool, int, float, bytes, str):
        return value
    if kind is list:
        _container_size(value)
        for i, item in enumerate(value):
            try:
                _data(item)
            except _Invalid as exc:
                raise exc.at(f"[{i}]") from None
        return value
    if kind is dict:
        _container_size(value)
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(f"map keys must be text, got {type(key).__name__}")
            try:
                _data(item)
            except _Invalid as exc:
                raise exc.at(f".{key}") from None
        return value
    raise _bad("plain data (null, bool, number, text, bytes, array, map)", value)


def _data_map(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad("a map", value)
    return _data(value)  # type: ignore[no-any-return]


def list_of(item: Check) -> Check:
    decode_item = item.decode

    def decode(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _bad("an array", value)
        _container_size(value)
        out = []
        for i, entry in enumerate(value):
            try:
                out.append(decode_item(entry))
            except _Invalid as exc:
                raise exc.at(f"[{i}]") from None
        return tuple(out)

    return Check(decode, lambda value: [item.encode(entry) for entry in value], f"[{item.describe}]")


def map_of(item: Check) -> Check:
    """A map from ids to `item` values (labels, metrics, counters)."""
    decode_item = item.decode
    to_float = decode_item is _number  # the only item checker that converts (int -> float)

    def decode(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _bad("a map", value)
        _container_size(value)
        out = {}
        for k, v in value.items():
            if not is_valid_id(k):
                try:
                    _id(k)
                except _Invalid as exc:
                    raise exc.at(".<key>") from None
            kind = type(v)
            # Hot path for metric maps: a finite float or an int needs no call.
            if to_float and (kind is int or (kind is float and v - v == 0.0)):
                out[k] = float(v)
                continue
            try:
                out[k] = decode_item(v)
            except _Invalid as exc:
                raise exc.at(f".{k}") from None
        return out

    return Check(decode, lambda value: {k: item.encode(v) for k, v in value.items()}, "{* id => " + item.describe + "}")


def one_of(*choices: str) -> Check:
    allowed = frozenset(choices)

    def decode(value: Any) -> str:
        if type(value) is not str or value not in allowed:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {str(value)[:40]!r}")
        return value

    return Check(decode, describe="|".join(choices))


UINT: Final = Check(_uint, describe="uint")
ID: Final = Check(_id, describe="id")
TEXT: Final = Check(_text, describe="tstr")
BOOL: Final = Check(_bool, describe="bool")
NUMBER: Final = Check(_number, describe="number")
POSITIVE: Final = Check(_positive, describe="number > 0")
KEY32: Final = Check(_key32, describe="bstr .size 32")
MAC32: Final = Check(_fixed_bytes(32, "an HMAC-SHA256 tag"), describe="bstr .size 32")
KID8: Final = Check(_fixed_bytes(8, "a kid"), describe="bstr .size 8")
DATA: Final = Check(_data_map, describe="{* tstr => any}")
LABELS: Final = map_of(TEXT)
METRICS: Final = map_of(NUMBER)
COUNTS: Final = map_of(UINT)


# ---------------------------------------------------------------------------------------------------------------
# Declaring fields and compiling a class into its codec table.

_REQUIRED: Final = object()


def wire(check: Check, *, key: str | None = None, default: Any = _REQUIRED) -> Any:
    """Declare a message field: its checker, its wire key (default: the attribute name), and its default."""
    meta = {"check": check, "key": key}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Field(NamedTuple):
    key: str
    attr: str
    decode: Callable[[Any], Any]
    required: bool
    check: Check


def _compile(cls: type) -> tuple[_Field, ...]:
    table = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check is None:
            raise LocalProtocolError(f"{cls.__name__}.{f.name} has no wire() declaration")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        table.append(_Field(f.metadata["key"] or f.name, f.name, check.decode, required, check))
    return tuple(table)


def _struct(cls: type) -> Check:
    """A nested object (like AttemptRef) as a checker."""
    table = _compile(cls)

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise _bad("a map", value)
        return cls(**_decode_fields(table, value))

    return Check(decode, lambda value: _encode_fields(table, value), cls.__name__)


def _decode_fields(table: tuple[_Field, ...], raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    get = raw.get
    for key, attr, decode, required, _ in table:
        value = get(key)
        if value is None:  # absent and null mean the same: the default
            if required:
                raise _Invalid("is missing").at("." + key)
            continue
        try:
            out[attr] = decode(value)
        except _Invalid as exc:
            raise exc.at("." + key) from None
    return out


def _encode_fields(table: tuple[_Field, ...], obj: Any) -> dict[str, Any]:
    out = {}
    for f in table:
        value = getattr(obj, f.attr)
        if value is None:
            if f.required:
                raise LocalProtocolError(f"{type(obj).__name__}.{f.attr} is required")
            continue
        out[f.key] = f.check.encode(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The message types.


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one step of a run, as the hub fenced it."""

    run: str = wire(ID)
    step: str = wire(ID)
    attempt: str = wire(ID)
    fence: int = wire(UINT)


ATTEMPT_REF: Final = _struct(AttemptRef)


class Body:
    """Base of every message body. `TYPE` is the wire type, `KIND` the topic kind it travels on."""

    TYPE: ClassVar[str]
    KIND: ClassVar[str]
    COMMAND: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Enroll(Body):
    TYPE: ClassVar[str] = "enroll"
    KIND: ClassVar[str] = "enroll"
    key: bytes = wire(KEY32)
    profile: str = wire(TEXT, default="")
    labels: dict[str, str] = wire(LABELS, default={})
    # Proof of the enroll token (never the token itself: a clear token could be sniffed and reused).
    proof: bytes | None = wire(MAC32, default=None)


@dataclass(frozen=True, slots=True)
class Birth(Body):
    TYPE: ClassVar[str] = "birth"
    KIND: ClassVar[str] = "birth"
    profile: str = wire(TEXT)
    version: str = wire(TEXT)
    labels: dict[str, str] = wire(LABELS, default={})
    caps: tuple[str, ...] = wire(list_of(ID), default=())
    running: tuple[AttemptRef, ...] = wire(list_of(ATTEMPT_REF), default=())
    outbox: int = wire(UINT, default=0)
    slots: int = wire(UINT, default=1)
    hb: float = wire(POSITIVE, default=5.0)
    tel: float = wire(POSITIVE, default=10.0)
    resources: dict[str, float] = wire(METRICS, default={})


@dataclass(frozen=True, slots=True)
class Death(Body):
    TYPE: ClassVar[str] = "death"
    KIND: ClassVar[str] = "death"
    reason: str = wire(one_of("lost", "shutdown"))


@dataclass(frozen=True, slots=True)
class Heartbeat(Body):
    TYPE: ClassVar[str] = "hb"
    KIND: ClassVar[str] = "hb"
    running: int = wire(UINT, default=0)
    free: int = wire(UINT, default=0)
    outbox: int = wire(UINT, default=0)
    shed: int = wire(UINT, default=0)
    rejected: dict[str, int] = wire(COUNTS, default={})
    draining: bool = wire(BOOL, default=False)


@dataclass(frozen=True, slots=True)
class Telemetry(Body):
    TYPE: ClassVar[str] = "tel"
    KIND: ClassVar[str] = "tel"
    metrics: dict[str, float] = wire(METRICS)
    at: int | None = wire(UINT, default=None)  # sample time in ms, when sent later than taken


STEP_EVENTS: Final = ("accepted", "started", "progress", "refused", "cancelled")


@dataclass(frozen=True, slots=True)
class StepEvent(Body):
    TYPE: ClassVar[str] = "step"
    KIND: ClassVar[str] = "evt"
    run: str = wire(ID)
    step: str = wire(ID)
    attempt: str = wire(ID)
    fence: int = wire(UINT)
    event: str = wire(one_of(*STEP_EVENTS))
    eid: int = wire(UINT)
    reason: str | None = wire(TEXT, default=None)
    progress: float | None = wire(NUMBER, default=None)
    at: int | None = wire(UINT, default=None)


@dataclass(frozen=True, slots=True)
class StepResult(Body):
    TYPE: ClassVar[str] = "result"
    KIND: ClassVar[str] = "evt"
    run: str = wire(ID)
    step: str = wire(ID)
    attempt: str = wire(ID)
    fence: int = wire(UINT)
    ok: bool = wire(BOOL)
    eid: int = wire(UINT)
    output: dict[str, Any] = wire(DATA, default={})
    error: str | None = wire(TEXT, default=None)
    at: int | None = wire(UINT, default=None)


@dataclass(frozen=True, slots=True)
class Assign(Body):
    TYPE: ClassVar[str] = "assign"
    KIND: ClassVar[str] = "cmd"
    COMMAND: ClassVar[bool] = True
    run: str = wire(ID)
    step: str = wire(ID)
    attempt: str = wire(ID)
    fence: int = wire(UINT)
    uses: str = wire(TEXT)
    with_: dict[str, Any] = wire(DATA, key="with", default={})
    timeout: float = wire(POSITIVE, default=300.0)


@dataclass(frozen=True, slots=True)
class Cancel(Body):
    TYPE: ClassVar[str] = "cancel"
    KIND: ClassVar[str] = "cmd"
    COMMAND: ClassVar[bool] = True
    attempts: tuple[AttemptRef, ...] = wire(list_of(ATTEMPT_REF))
    reason: str = wire(TEXT, default="")


@dataclass(frozen=True, slots=True)
class Drain(Body):
    TYPE: ClassVar[str] = "drain"
    KIND: ClassVar[str] = "cmd"
    COMMAND: ClassVar[bool] = True
    on: bool = wire(BOOL, default=True)


@dataclass(frozen=True, slots=True)
class Config(Body):
    TYPE: ClassVar[str] = "config"
    KIND: ClassVar[str] = "cmd"
    COMMAND: ClassVar[bool] = True
    hb: float | None = wire(POSITIVE, default=None)
    tel: float | None = wire(POSITIVE, default=None)
    # The hub does not hold this node online (it declared it failed, or restarted, or missed its birth) although
    # the node is alive: publish a birth now, in this session. Recovery without a reconnect.
    rebirth: bool = wire(BOOL, default=False)


# accepted: the key is enrolled; pending: waiting for an operator; rejected: refused or revoked by an operator;
# taken: the node id is enrolled with another key.
ENROLL_VERDICTS: Final = ("accepted", "pending", "rejected", "taken")


@dataclass(frozen=True, slots=True)
class Ack(Body):
    TYPE: ClassVar[str] = "ack"
    KIND: ClassVar[str] = "cmd"
    COMMAND: ClassVar[bool] = True
    eids: tuple[int, ...] = wire(list_of(UINT), default=())
    enroll: str | None = wire(one_of(*ENROLL_VERDICTS), default=None)
    # The kid of the key the `enroll` verdict is about: every process using the node id reads the same cmd topic,
    # so a verdict on one key must not be taken by the holder of another.
    kid: bytes | None = wire(KID8, default=None)


@dataclass(frozen=True, slots=True)
class HubState(Body):
    TYPE: ClassVar[str] = "hub_state"
    KIND: ClassVar[str] = "state"
    online: bool = wire(BOOL)
    key: bytes = wire(KEY32)  # the key this state is signed with: the one the hub signs everything with now
    version: str = wire(TEXT, default="")
    # A key rotation under way (docs/protocol.md 7.2): the key the hub will sign with after the overlap. A node
    # trusts it only because a key it already trusts signed this announcement.
    next_key: bytes | None = wire(KEY32, default=None)


BODY_TYPES: Final[dict[str, type[Body]]] = {
    cls.TYPE: cls
    for cls in (Enroll, Birth, Death, Heartbeat, Telemetry, StepEvent, StepResult, Assign, Cancel, Drain, Config, Ack,
                HubState)
}
_TABLES: Final = {cls: _compile(cls) for cls in BODY_TYPES.values()}


class Header(NamedTuple):
    """Fields every payload carries. `dst` and `exp` (ms) are set on hub commands only."""

    type: str
    fleet: str
    src: str
    boot: int
    seq: int
    ts: int
    dst: str | None = None
    exp: int | None = None


class Message(NamedTuple):
    header: Header
    body: Body


# ---------------------------------------------------------------------------------------------------------------
# Payload encode / decode.


def encode_payload(header: Header, body: Body) -> dict[str, Any]:
    """The payload map for `body`; raises LocalProtocolError if we would send something invalid."""
    cls = type(body)
    if BODY_TYPES.get(header.type) is not cls:
        raise LocalProtocolError(f"header type {header.type!r} does not match body {cls.__name__}")
    if cls.COMMAND != (header.dst is not None and header.exp is not None):
        raise LocalProtocolError(f"{cls.__name__}: hub commands (and only they) carry dst and exp")
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "type": header.type, "fleet": header.fleet, "src": header.src,
        "boot": header.boot, "seq": header.seq, "ts": header.ts,
    }
    if header.dst is not None:
        out["dst"] = header.dst
        out["exp"] = header.exp
    for key, value in _encode_fields(_TABLES[cls], body).items():
        if key in out:
            raise LocalProtocolError(f"{cls.__name__} field {key!r} collides with a header field")
        out[key] = value
    # Round-trip through the checkers so we never send what a receiver would refuse.
    decode_payload(out)
    return out


def decode_header(raw: Any) -> Header:
    """Check the header fields of a decoded payload map."""
    try:
        return _decode_header(raw)
    except _Invalid as exc:
        raise exc.to_malformed() from None


def _decode_header(raw: Any) -> Header:
    if type(raw) is not dict:
        raise _Invalid(f"payload must be a map, got {type(raw).__name__}")
    get = raw.get
    version = get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise _Invalid(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})").at("v")
    kind = get("type")
    if type(kind) is not str or kind not in BODY_TYPES:
        raise _Invalid(f"unknown message type {str(kind)[:40]!r}").at("type")
    fleet, src, boot, seq, ts = get("fleet"), get("src"), get("boot"), get("seq"), get("ts")
    if (not BODY_TYPES[kind].COMMAND and type(boot) is int and type(seq) is int and type(ts) is int
            and 0 <= boot <= UINT_MAX and 0 <= seq <= UINT_MAX and 0 <= ts <= UINT_MAX
            and is_valid_id(fleet) and is_valid_id(src)):
        return Header(kind, fleet, src, boot, seq, ts)  # the common case, checked in one expression
    values = []
    for key, check in _HEADER_FIELDS:
        value = get(key)
        if value is None:
            raise _Invalid("is missing").at(key)
        try:
            values.append(check(value))
        except _Invalid as exc:
            raise exc.at(key) from None
    if BODY_TYPES[kind].COMMAND:
        for key, check in _COMMAND_FIELDS:
            value = get(key)
            if value is None:
                raise _Invalid("is missing (required on commands)").at(key)
            try:
                values.append(check(value))
            except _Invalid as exc:
                raise exc.at(key) from None
    return Header(kind, *values)


_HEADER_FIELDS: Final = (("fleet", _id), ("src", _id), ("boot", _uint), ("seq", _uint), ("ts", _uint))
_COMMAND_FIELDS: Final = (("dst", _id), ("exp", _uint))


def decode_payload(raw: Any) -> Message:
    """Check a decoded payload map against its type's table; returns the typed message."""
    try:
        header = _decode_header(raw)
        cls = BODY_TYPES[header.type]
        return Message(header, cls(**_decode_fields(_TABLES[cls], raw)))
    except _Invalid as exc:
        raise exc.to_malformed() from None


def describe_types() -> dict[str, list[tuple[str, str, bool]]]:
    """(wire key, checker description, required) per field of every type: used by docs and tests."""
    return {t: [(f.key, f.check.describe, f.required) for f in _TABLES[cls]] for t, cls in BODY_TYPES.items()}


def body_to_map(body: Body) -> dict[str, Any]:
    """A body's own fields as a wire map (no header): what the agent's outbox stores to sign again later."""
    return _encode_fields(_TABLES[type(body)], body)


def body_from_map(type_name: str, raw: Mapping[str, Any]) -> Body:
    """The inverse of `body_to_map`, with the same checks as on receive."""
    cls = BODY_TYPES.get(type_name)
    if cls is None:
        raise Malformed(f"unknown message type {type_name!r}")
    try:
        return cls(**_decode_fields(_TABLES[cls], raw))
    except _Invalid as exc:
        raise exc.to_malformed() from None
