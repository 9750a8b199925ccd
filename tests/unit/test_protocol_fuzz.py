"""Hostile input to the receive path: every case ends in a ProtocolError subclass, quickly, never another exception."""

from __future__ import annotations

import time

import cbor2
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import Heartbeat, Keyring, ProtocolError, Receiver, Signer, open_envelope
from protocols.cbor import loads
from protocols.errors import Malformed

KEY = nacl.signing.SigningKey(b"\x05" * 32)
SIGNER = Signer(KEY, "f", "n1", boot=1)
GOOD = SIGNER.seal(Heartbeat(1, 2, rejected={"a": 1}), 1_000)
PUBLIC = bytes(KEY.verify_key)
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def must_refuse_or_accept(data: bytes, topic: str = GOOD.topic) -> None:
    started = time.perf_counter()
    receiver = Receiver("f", Keyring([("n1", PUBLIC)]))
    try:
        receiver.receive(topic, data, 2_000)
    except ProtocolError as exc:
        assert exc.reason and str(exc)
    assert time.perf_counter() - started < 1.0, "a hostile message took over a second"


@given(st.binary(max_size=2048))
@FAST
def test_random_bytes(data: bytes) -> None:
    must_refuse_or_accept(data)


@given(st.integers(0, len(GOOD.payload) - 1), st.integers(0, 7))
@FAST
def test_bit_flips(position: int, bit: int) -> None:
    data = bytearray(GOOD.payload)
    data[position] ^= 1 << bit
    must_refuse_or_accept(bytes(data))


@given(st.integers(0, len(GOOD.payload) - 1))
@FAST
def test_truncation(length: int) -> None:
    must_refuse_or_accept(GOOD.payload[:length])


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=5),
    max_leaves=40)


@given(st.dictionaries(st.sampled_from(["v", "type", "fleet", "src", "boot", "seq", "ts", "running", "rejected",
                                        "free", "dst", "exp", "metrics", "with"]), json_like, max_size=14))
@FAST
def test_signed_payloads_with_wrong_field_types(payload: dict) -> None:
    """Correctly signed, so the garbage reaches the schema checks."""
    from protocols import envelope

    data = envelope.seal(cbor2.dumps(payload), GOOD.topic, KEY, envelope.kid_for(PUBLIC))
    must_refuse_or_accept(data)


@given(st.integers(1, 200))
def test_deep_nesting_and_huge_lengths_are_malformed(depth: int) -> None:
    nested = b"\x81" * depth + b"\x01"
    for data in (nested, b"\x9b" + b"\xff" * 8, b"\x5b" + b"\x7f" * 8, b"\xbb" + b"\x00\x00\x00\x10" * 2):
        try:
            loads(data)
        except Malformed:
            continue
        assert depth <= 8 and data is nested


@given(st.integers(0, 2**64 - 1))
@settings(max_examples=300, deadline=None)
def test_every_tag_number_is_refused(tag: int) -> None:
    """Pins cbor2's built-in tag decoders: if an upgrade adds one we do not refuse, this fails."""
    data = cbor2.dumps(cbor2.CBORTag(tag, 1))
    try:
        loads(data)
    except Malformed as exc:
        assert "tag" in str(exc)
    else:
        raise AssertionError(f"tag {tag} was decoded")


def test_every_builtin_tag_is_refused() -> None:
    for tag in list(range(0, 1100)) + [43000, 55799, 65535, 65536]:
        for item in (b"\x00", b"\x40", b"\x60", b"\x80", b"\xa0", b"\xc2\x41\x01"):
            head = cbor2.dumps(cbor2.CBORTag(tag, None))[:-1]
            try:
                loads(head + item)
            except Malformed:
                continue
            raise AssertionError(f"tag {tag} with {item!r} was decoded")


def test_open_envelope_with_wrong_key_is_unknown_key() -> None:
    other = bytes(nacl.signing.SigningKey(b"\x06" * 32).verify_key)
    with pytest.raises(ProtocolError) as refused:
        open_envelope(GOOD.payload, GOOD.topic, other)
    assert refused.value.reason == "unknown-key"
