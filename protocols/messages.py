"""Message types: one frozen dataclass per type, and the table-driven codec that checks them on decode.

The payload is one flat CBOR map with text keys: the header fields (`v`, `type`, `fleet`, `src`, `boot`, `seq`, `ts`,
and for hub commands `dst`, `exp`) next to the type's own fields. Unknown keys are ignored, so a minor protocol
version can add optional fields. Every field is declared once with a checker; each type's table is compiled into one
decoding function (`_compile_decoder`), and an error names the field path, e.g. `field 'running[0].attempt':
expected an id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple

from .checks import (BOOL, BROKER_PASSWORD, COUNTS, DATA, FAST_NAMES, ID, KEY32, KID8, LABELS, MAC32,
                     MAX_BROKER_PASSWORD, MAX_CONTAINER, MAX_TEXT, METRICS, MIN_BROKER_PASSWORD, NUMBER, POSITIVE, TEXT,
                     UINT, UINT_MAX, Check, Encode, Invalid, expected, list_of, map_of, one_of)
from .errors import LocalProtocolError, Malformed
from .topics import is_valid_id

__all__ = [
    # the field checks, held by protocols/checks.py, importable from here as before
    "BOOL", "BROKER_PASSWORD", "COUNTS", "DATA", "ID", "KEY32", "KID8", "LABELS", "MAC32", "MAX_BROKER_PASSWORD",
    "MAX_CONTAINER", "MAX_TEXT", "METRICS", "MIN_BROKER_PASSWORD", "NUMBER", "POSITIVE", "TEXT", "UINT", "UINT_MAX",
    "Check", "Encode", "list_of", "map_of", "one_of",
    # declared here
    "ATTEMPT_REF", "BODY_TYPES", "ENROLL_VERDICTS", "PROTOCOL_VERSION", "STEP_EVENTS", "Ack", "Assign", "AttemptRef",
    "Birth", "Body", "Cancel", "Config", "Death", "Drain", "Enroll", "Header", "Heartbeat", "HubState", "Message",
    "StepEvent", "StepResult", "Telemetry", "body_from_map", "body_to_map", "decode_header", "decode_payload",
    "describe_types", "encode_payload", "wire",
]

PROTOCOL_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------------------------
# Declaring fields and compiling a class into its codec table.

_REQUIRED: Final = object()


def wire(check: Check, *, key: str | None = None, default: Any = _REQUIRED, secret: bool = False) -> Any:
    """Declare a message field: its checker, its wire key (default: the attribute name), and its default. A `secret`
    field is left out of the body's repr, so no log line or assertion message prints it."""
    meta = {"check": check, "key": key}
    if default is _REQUIRED:
        return field(metadata=meta, repr=not secret)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


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


def _compile_decoder(cls: type) -> Callable[[Mapping[str, Any]], Any]:
    """`cls`'s decoder as one straight-line function, generated from its table the way `dataclasses` generates
    `__init__`: each field is read once, tested inline by its check's `fast` expression, passed through its
    `decode` only when that is false, and the instance is built positionally. It runs once per message received,
    where a loop over the table with a call per field and a keyword call of the class cost about 1.4 times as much
    (a heartbeat's body: 2.1 against 1.5 us). An error still names the field path, as `exc.at` adds each part while
    it unwinds."""
    ns: dict[str, Any] = {**FAST_NAMES, "cls": cls, "Invalid": Invalid}
    lines = ["def decode(raw):", "    get = raw.get"]
    for i, (f, spec) in enumerate(zip(_compile(cls), dataclasses.fields(cls))):
        if spec.kw_only:  # the generated call passes every field by position
            raise LocalProtocolError(f"{cls.__name__}.{spec.name}: message fields cannot be keyword-only")
        v, path = f"v{i}", "." + f.key
        ns[f"check{i}"] = f.decode
        lines += [f"    {v} = get({f.key!r})", f"    if {v} is None:"]  # absent and null mean the same: the default
        if f.required:
            lines.append(f"        raise Invalid('is missing').at({path!r})")
        elif spec.default_factory is not dataclasses.MISSING:
            ns[f"default{i}"] = spec.default_factory
            lines.append(f"        {v} = default{i}()")
        else:
            ns[f"default{i}"] = spec.default
            lines.append(f"        {v} = default{i}")
        lines.append(f"    elif not ({f.check.fast.format(v=v)}):" if f.check.fast else "    else:")
        lines += ["        try:", f"            {v} = check{i}({v})", "        except Invalid as exc:",
                  f"            raise exc.at({path!r}) from None"]
    lines.append(f"    return cls({', '.join(f'v{i}' for i in range(len(dataclasses.fields(cls))))})")
    exec("\n".join(lines), ns)  # noqa: S102 - the source is built above from our own declarations only
    decode: Callable[[Mapping[str, Any]], Any] = ns["decode"]
    return decode


def _struct(cls: type) -> Check:
    """A nested object (like AttemptRef) as a checker."""
    table = _compile(cls)
    decode_fields = _compile_decoder(cls)

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise expected("a map", value)
        return decode_fields(value)

    return Check(decode, lambda value: _encode_fields(table, value), cls.__name__)


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
    # The password the node will log in to the broker with, as its node id, once accepted (section 7.1): only where
    # broker ACLs let nobody but the hub read enroll topics.
    broker_password: str | None = wire(BROKER_PASSWORD, default=None, secret=True)


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
_DECODERS: Final = {cls: _compile_decoder(cls) for cls in BODY_TYPES.values()}


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
    except Invalid as exc:
        raise exc.to_malformed() from None


def _decode_header(raw: Any) -> Header:
    if type(raw) is not dict:
        raise Invalid(f"payload must be a map, got {type(raw).__name__}")
    get = raw.get
    version = get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise Invalid(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})").at("v")
    kind = get("type")
    if type(kind) is not str or kind not in BODY_TYPES:
        raise Invalid(f"unknown message type {str(kind)[:40]!r}").at("type")
    fleet, src, boot, seq, ts = get("fleet"), get("src"), get("boot"), get("seq"), get("ts")
    if (not BODY_TYPES[kind].COMMAND and type(boot) is int and type(seq) is int and type(ts) is int
            and 0 <= boot <= UINT_MAX and 0 <= seq <= UINT_MAX and 0 <= ts <= UINT_MAX
            and is_valid_id(fleet) and is_valid_id(src)):
        return Header(kind, fleet, src, boot, seq, ts)  # the common case, checked in one expression
    values: list[Any] = []
    for key, check in _HEADER_FIELDS:
        value = get(key)
        if value is None:
            raise Invalid("is missing").at(key)
        try:
            values.append(check(value))
        except Invalid as exc:
            raise exc.at(key) from None
    if BODY_TYPES[kind].COMMAND:
        for key, check in _COMMAND_FIELDS:
            value = get(key)
            if value is None:
                raise Invalid("is missing (required on commands)").at(key)
            try:
                values.append(check(value))
            except Invalid as exc:
                raise exc.at(key) from None
    return Header(kind, *values)


_HEADER_FIELDS: Final = (("fleet", ID.decode), ("src", ID.decode), ("boot", UINT.decode), ("seq", UINT.decode),
                          ("ts", UINT.decode))
_COMMAND_FIELDS: Final = (("dst", ID.decode), ("exp", UINT.decode))


def decode_payload(raw: Any) -> Message:
    """Check a decoded payload map against its type's table; returns the typed message."""
    try:
        header = _decode_header(raw)
        cls = BODY_TYPES[header.type]
        return Message(header, _DECODERS[cls](raw))
    except Invalid as exc:
        raise exc.to_malformed() from None


def describe_types() -> dict[str, list[tuple[str, str, bool]]]:
    """(wire key, checker description, required) per field of every type: used by docs and tests."""
    return {t: [(f.key, f.check.describe, f.required) for f in _TABLES[cls]] for t, cls in BODY_TYPES.items()}


def body_to_map(body: Body) -> dict[str, Any]:
    """A body's own fields as a wire map (no header): what the agent's outbox stores to sign again later."""
    return _encode_fields(_TABLES[type(body)], body)


def body_from_map(type_name: str, raw: Mapping[str, Any]) -> Body:
    """The inverse of `body_to_map`, with the same checks as on receive."""
    cls = BODY_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise Malformed(f"unknown message type {str(type_name)[:40]!r}")
    if not isinstance(raw, Mapping):  # an outbox entry read back from disk is not trusted to be one
        raise Malformed(f"a {type_name} body must be a map, got {type(raw).__name__}")
    try:
        return _DECODERS[cls](raw)
    except Invalid as exc:
        raise exc.to_malformed() from None
