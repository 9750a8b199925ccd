"""The receive path's speed-ups keep the protocol's verdicts: the compiled field decoders against a plain walk of the
same tables, each check's inline `fast` test against its `decode`, and the verify on raw keys (libsodium's
signed-message form built in one join) against PyNaCl's `VerifyKey.verify`."""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import envelope
from protocols.checks import FAST_NAMES, Check, Invalid
from protocols.errors import LocalProtocolError, Malformed
from protocols.messages import (_TABLES, BODY_TYPES, UINT, Ack, Assign, AttemptRef, Birth, Body, Cancel, Config, Death,
                                Drain, Enroll, Heartbeat, HubState, StepEvent, StepResult, Telemetry, _compile_decoder,
                                body_from_map, wire)
from protocols.signing import open_envelope

# Values of every CBOR kind our decoder returns, biased toward the edges the checks draw (ranges, sizes, id syntax).
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2, max_value=3), st.integers(min_value=2**63 - 2, max_value=2**63 + 1),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.from_regex(r"[A-Za-z0-9_.-]{1,66}", fullmatch=True), st.text(min_size=4095, max_size=4097),
    st.binary(max_size=40),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=6)

CHECKS = sorted({f.check for table in _TABLES.values() for f in table if f.check.fast}, key=lambda c: c.describe)


@pytest.mark.parametrize("check", CHECKS, ids=[c.describe for c in CHECKS])
@settings(max_examples=200, deadline=None)
@given(value=VALUES)
def test_a_fast_test_passes_only_values_its_decode_returns_unchanged(check: Check, value: Any) -> None:
    if eval(check.fast.format(v="value"), dict(FAST_NAMES), {"value": value}):  # noqa: S307 - our own expression
        assert check.decode(value) is value


def reference_decode(cls: type, raw: dict[str, Any]) -> Any:
    """The tables walked one field at a time: what the compiled decoder must do."""
    kwargs = {}
    for f in _TABLES[cls]:
        value = raw.get(f.key)
        if value is None:
            if f.required:
                raise Malformed(f"field '{f.key}': is missing")
            continue
        try:
            kwargs[f.attr] = f.check.decode(value)
        except Invalid as exc:
            raise exc.at("." + f.key).to_malformed() from None
    return cls(**kwargs)


def field_maps(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Maps with each of `cls`'s wire keys absent or holding a value of any kind (mostly valid ones)."""
    keys = [f.key for f in _TABLES[cls]]
    valid = {f.key: getattr(EXAMPLE_BODIES[cls], f.attr) for f in _TABLES[cls]}
    return st.fixed_dictionaries({}, optional={k: st.one_of(st.just(_wire(valid[k])), VALUES) for k in keys})


def _wire(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_wire(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _examples() -> dict[type, Any]:
    """One valid body of every type, fields set away from their defaults."""
    ref = AttemptRef("r1", "s1", "a1", 3)
    bodies = (Enroll(b"k" * 32, "rpi4", {"site": "n"}, b"m" * 32, "p" * 20),
              Birth("rpi4", "0.1", {"site": "n"}, ("shell",), (ref,), 2, 4, 5.0, 10.0, {"cpu": 4.0}),
              Death("lost"), Heartbeat(1, 2, 0, 1, {"full": 2}, True), Telemetry({"cpu": 1.5, "mem": 3.0}, 7),
              StepEvent("r1", "s1", "a1", 3, "started", 9, "why", 0.5, 8),
              StepResult("r1", "s1", "a1", 3, True, 10, {"out": [1, "x"]}, "err", 11),
              Assign("r1", "s1", "a1", 3, "shell", {"cmd": "true"}, 30.0), Cancel((ref,), "moved"), Drain(False),
              Config(1.0, 2.0, True), Ack((1, 2), "accepted", b"k" * 8),
              HubState(True, b"h" * 32, "0.1", b"n" * 32))
    return {type(body): body for body in bodies}


EXAMPLE_BODIES = _examples()


@pytest.mark.parametrize("type_name", sorted(BODY_TYPES))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_the_compiled_decoder_gives_what_the_tables_say(type_name: str, data: st.DataObject) -> None:
    cls = BODY_TYPES[type_name]
    raw = data.draw(field_maps(cls))
    try:
        expected: Any = reference_decode(cls, raw)
    except Malformed as exc:
        expected = str(exc)
    try:
        got: Any = body_from_map(type_name, raw)
    except Malformed as exc:
        got = str(exc)
    assert got == expected


def test_every_type_has_an_example_body() -> None:
    assert set(EXAMPLE_BODIES) == set(BODY_TYPES.values())


KEY = nacl.signing.SigningKey(b"\x07" * 32)
OTHER = nacl.signing.SigningKey(b"\x08" * 32)
TOPIC = "fleetflow/v1/f/node/n1/hb"


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300), flip=st.integers(min_value=-1, max_value=400), other_key=st.booleans(),
       topic=st.sampled_from([TOPIC, "fleetflow/v1/f/node/n2/hb"]))
def test_the_raw_key_verify_agrees_with_pynacl(payload: bytes, flip: int, other_key: bool, topic: str) -> None:
    data = bytearray(envelope.seal(payload, TOPIC, KEY, envelope.kid_for(bytes(KEY.verify_key))))
    if 0 <= flip < len(data):
        data[flip] ^= 0x01
    try:
        parsed = envelope.parse(bytes(data))
    except Malformed:
        return
    public = (OTHER if other_key else KEY).verify_key
    try:
        public.verify(envelope.sig_structure(parsed.protected, topic, parsed.payload), parsed.signature)
        pynacl = True
    except nacl.exceptions.BadSignatureError:
        pynacl = False
    assert parsed.signed_for(topic, bytes(public)) is pynacl


@pytest.mark.parametrize("key", [b"", b"k" * 31, b"k" * 33, bytearray(b"k" * 32)])
def test_a_key_that_is_not_32_raw_bytes_is_refused_with_our_error(key: Any) -> None:
    parsed = envelope.parse(envelope.seal(b"\xa0", TOPIC, KEY, envelope.kid_for(bytes(KEY.verify_key))))
    with pytest.raises(LocalProtocolError, match="32 raw bytes"):
        parsed.signed_for(TOPIC, key)


@pytest.mark.parametrize("key", [32, bytearray(b"k" * 32), memoryview(b"k" * 32), "k" * 32])
def test_open_envelope_takes_raw_bytes_or_a_verify_key_only(key: Any) -> None:
    data = envelope.seal(b"\xa0", TOPIC, KEY, envelope.kid_for(bytes(KEY.verify_key)))
    with pytest.raises(LocalProtocolError, match="32 raw bytes or a VerifyKey"):
        open_envelope(data, TOPIC, key)


def test_a_keyword_only_field_is_refused_when_the_codec_is_compiled() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly(Body):
        n: int = wire(UINT)

    with pytest.raises(LocalProtocolError, match="keyword-only"):
        _compile_decoder(KeywordOnly)
