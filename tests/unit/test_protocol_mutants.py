"""The wire protocol's rules that mutation testing found unpinned (bench/RESULTS.md, "Mutation testing"): the replay
window against a model, windows restored from older records, the envelope as another COSE encoder lays it out, the
receiver's cheap screening, the decoder profile in every thread, topic filters, and the payload header's fast path."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import cbor2
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import (Drain, Heartbeat, HubState, Keyring, LocalProtocolError, Malformed, Receiver, Replayed,
                       ReplayWindow, Signer, TooLarge, UnknownKey, WrongSender, WrongTopic, body_from_map, body_to_map,
                       cbor, envelope, open_envelope)
from protocols.enrollment import enroll_proof
from protocols.messages import UINT_MAX
from protocols.topics import Topic, TopicFilter

NOW = 1_700_000_000_000


def keypair(seed: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([seed]) * 32)


# -- replay window -----------------------------------------------------------------------------------------------------

class WindowModel:
    """The rule of docs/protocol.md, written the slow way: every seq of the current boot remembered."""

    def __init__(self, size: int) -> None:
        self.size, self.boot, self.seen = size, -1, set[int]()

    def accepts(self, boot: int, seq: int) -> bool:
        if seq == 0 or boot < self.boot:
            return False
        if boot > self.boot:
            self.boot, self.seen = boot, {seq}
            return True
        if seq in self.seen or seq <= max(self.seen, default=0) - self.size:
            return False
        self.seen.add(seq)
        return True


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 80)), max_size=200), st.sampled_from([8, 16, 64]))
@settings(max_examples=300, deadline=None)
def test_the_window_accepts_exactly_what_the_rule_accepts(steps: list[tuple[int, int]], size: int) -> None:
    window, model = ReplayWindow(size=size), WindowModel(size)
    for boot, seq in steps:
        expected = model.accepts(boot, seq)
        try:
            window.accept(boot, seq)
        except Replayed:
            assert not expected, (boot, seq)
        else:
            assert expected, (boot, seq)
        assert ReplayWindow.from_dict(cbor.loads(cbor.dumps(window.to_dict()))) == window


def test_a_jump_of_exactly_the_window_keeps_only_the_new_seq() -> None:
    window = ReplayWindow(size=8)
    window.accept(1, 1)
    window.accept(1, 9)  # shift == size: seq 1 falls out, 2..8 were never seen but are now older than the window
    assert window.bitmap == 1 and window.top == 9
    with pytest.raises(Replayed):
        window.accept(1, 1)
    window.accept(1, 2)  # offset 7: still inside the window, not seen


def test_a_fenced_window_refuses_all_it_may_have_seen_and_nothing_newer() -> None:
    window = ReplayWindow.fenced(3, 100, size=64)
    assert (window.size, window.mark()) == (64, (3, 100, False))
    for boot, seq in ((3, 100), (3, 37), (3, 36), (2, 500)):
        with pytest.raises(Replayed):
            window.accept(boot, seq)
    window.accept_death(3)  # a fenced window has not seen the death certificate unless told
    window.accept(3, 101)
    window.accept(4, 1)
    told = ReplayWindow.fenced(3, 100, death_seen=True)
    with pytest.raises(Replayed):
        told.accept_death(3)


def test_windows_written_by_earlier_versions_are_read_back() -> None:
    # before `size` was stored, and when the bitmap was an integer (with stray bits above the window)
    old = ReplayWindow.from_dict({"boot": 2, "top": 10, "bitmap": (1 << 300) | 0b101, "death_seen": True})
    assert (old.size, old.bitmap, old.death_seen) == (256, 0b101, True)
    with pytest.raises(Replayed):
        old.accept(2, 8)
    old.accept(2, 9)
    wide = ReplayWindow.from_dict({"boot": 1, "top": 5, "bitmap": (1 << 8) | 1, "death_seen": False, "size": 8})
    assert wide.bitmap == 1


@pytest.mark.parametrize("size", [0, -8, 12])
def test_a_window_size_that_is_not_a_positive_multiple_of_8_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="positive multiple of 8"):
        ReplayWindow.from_dict({"boot": 1, "top": 1, "bitmap": b"", "death_seen": False, "size": size})


# -- the CBOR profile, topics, enrollment proofs ---------------------------------------------------------------------

PROFILE_VIOLATIONS = [
    cbor2.dumps(cbor2.CBORTag(1, 0)),     # a tag cbor2 decodes itself (a date)
    cbor2.dumps(cbor2.CBORTag(999, 0)),   # a tag nobody decodes
    b"\x9f\x01\xff",                      # an indefinite-length array
    b"\xa2\x61a\x01\x61a\x02",            # a duplicate map key
    b"\x81" * 9 + b"\x00",                # nested deeper than 8
]


def test_every_thread_decodes_with_the_profile() -> None:
    """The hub parses off its event loop: a decoder built in a worker thread must refuse what the first one does."""
    results: list[Any] = []

    def decode_all() -> None:
        for data in PROFILE_VIOLATIONS:
            try:
                results.append(cbor.loads(data))
            except Malformed as exc:
                results.append(exc)
        results.append(cbor.loads(b"\x82\x01\x02"))

    worker = threading.Thread(target=decode_all)
    worker.start()
    worker.join(timeout=10)
    assert [type(r) for r in results[:-1]] == [Malformed] * len(PROFILE_VIOLATIONS) and results[-1] == [1, 2]


def test_a_hub_state_topic_with_a_bad_fleet_is_not_in_the_tree() -> None:
    with pytest.raises(WrongTopic):
        Topic.parse("fleetflow/v1/bad fleet/hub/state")


def test_a_filter_longer_than_the_topic_does_not_match() -> None:
    assert not TopicFilter("fleetflow/v1/f/node/+/hb").matches("fleetflow/v1/f/node")
    assert not TopicFilter("fleetflow/v1/f/node/n1/hb").matches("fleetflow/v1/f/node")
    assert TopicFilter("fleetflow/v1/f/#").matches("fleetflow/v1/f")  # '#' also matches its parent level


@pytest.mark.parametrize("value", ["fleetflow/v1/f/node/n+/hb", "fleetflow/v1/+f/#", "a/b/+/c+"])
def test_a_plus_inside_a_level_of_our_own_filter_is_refused(value: str) -> None:
    with pytest.raises(LocalProtocolError, match="'\\+' must be a whole level"):
        TopicFilter(value)


@pytest.mark.parametrize("make, says", [
    (lambda: Topic("bad fleet", "state"), "fleet 'bad fleet'"),
    (lambda: Topic("f", "hb", "bad id"), "node id 'bad id'"),
    (lambda: TopicFilter.node_kind("bad fleet", "hb"), "fleet 'bad fleet'"),
    (lambda: Signer(keypair(1), "bad fleet", "n1", 1), "fleet 'bad fleet'"),
    (lambda: Signer(keypair(1), "f", "bad id", 1), "sender 'bad id'"),
])
def test_an_invalid_id_is_refused_by_the_name_of_its_field(make: Any, says: str) -> None:
    with pytest.raises(LocalProtocolError, match=says):
        make()


def test_an_enroll_proof_is_good_for_one_fleet_only() -> None:
    key = bytes(keypair(3).verify_key)
    assert enroll_proof("t" * 16, "plant-1", "n1", key) != enroll_proof("t" * 16, "plant-2", "n1", key)


# -- the envelope as a generic COSE encoder writes it ----------------------------------------------------------------

def generic_envelope(payload: bytes, topic: str, key: nacl.signing.SigningKey, *, header: dict[int, Any] | None = None,
                     wide: int = 0) -> bytes:
    """COSE_Sign1 laid out by cbor2, not by our fast path: header labels in another order, and with `wide` the byte
    string lengths in 1 << wide bytes although they would fit in fewer (valid CBOR, not the preferred form)."""
    kid = envelope.kid_for(bytes(key.verify_key))
    protected = cbor2.dumps(header if header is not None else {4: kid, 1: -8})
    signature = key.sign(envelope.sig_structure(protected, topic, payload)).signature

    def bstr(data: bytes) -> bytes:
        if not wide:
            return cbor2.dumps(data)
        return bytes((0x58 + wide,)) + len(data).to_bytes(1 << wide, "big") + data

    return b"\xd2\x84" + bstr(protected) + b"\xa0" + bstr(payload) + bstr(signature)


@pytest.mark.parametrize("wide", [0, 1, 2, 3])
def test_an_envelope_from_another_encoder_parses_and_verifies(wide: int) -> None:
    key = keypair(5)
    data = generic_envelope(b"\xa1\x61k\x01", "fleetflow/v1/f/node/n1/hb", key, wide=wide)
    parsed = envelope.parse(data)
    assert (parsed.kid, parsed.payload) == (envelope.kid_for(bytes(key.verify_key)), b"\xa1\x61k\x01")
    parsed.verify("fleetflow/v1/f/node/n1/hb", bytes(key.verify_key))
    assert not parsed.signed_for("fleetflow/v1/f/node/n2/hb", bytes(key.verify_key))


@pytest.mark.parametrize("header", [
    [1, -8],                                   # not a map
    {1: -7, 4: b"k" * 8},                      # another algorithm
    {1: -8},                                   # no kid
    {1: -8, 4: b"k" * 7},                      # a kid of the wrong size
    {1: -8, 4: b"k" * 8, 3: 0},                # a label we do not support
])
def test_a_protected_header_other_than_ours_is_malformed(header: Any) -> None:
    data = generic_envelope(b"\xa0", "t", keypair(5), header=header)
    with pytest.raises(Malformed):
        envelope.parse(data)


@pytest.mark.parametrize("cut", [
    lambda d: d[:2],                                # no protected header
    lambda d: d[:2] + b"\x60" + d[3:],              # a text string where a byte string belongs
    lambda d: d[:2] + b"\x5f" + d[3:],              # an indefinite length
    lambda d: d[:2] + b"\x5c" + d[3:],              # a reserved length
    lambda d: d[:2] + b"\x5a\x00\x00",              # a truncated length
    lambda d: d[:-1],                               # the signature one byte short of what it declares
    lambda d: d + b"\x00",                          # trailing bytes
])
def test_a_broken_envelope_from_another_encoder_is_malformed(cut: Any) -> None:
    data = generic_envelope(b"\xa0", "t", keypair(5))
    envelope.parse(data)
    with pytest.raises(Malformed):
        envelope.parse(cut(data))


# -- signer, keyring and the receiver's screening ------------------------------------------------------------------

def test_seq_restarts_at_1_in_a_new_boot_and_the_will_carries_seq_0() -> None:
    signer = Signer(keypair(1), "f", "n1", boot=1)
    signer.seal(Heartbeat(), NOW)
    signer.new_boot(2)
    assert signer.seal(Heartbeat(), NOW).header[3:5] == (2, 1)
    assert signer.death_certificate(NOW).header[3:5] == (2, 0)


def test_a_command_needs_both_a_target_and_a_ttl_and_only_commands_carry_them() -> None:
    hub = Signer(keypair(2), "f", "hub", boot=1)
    for target in ({"dst": "n1"}, {"ttl_ms": 1000}):
        with pytest.raises(LocalProtocolError, match="needs dst and ttl_ms"):
            hub.seal(Drain(), NOW, **target)  # type: ignore[arg-type]
    beat = hub.seal(Heartbeat(), NOW, dst="n1", ttl_ms=1000)
    assert (beat.header.dst, beat.header.exp) == (None, None)


def test_removing_an_owner_removes_its_keys_only() -> None:
    ring = Keyring([("n1", bytes(keypair(1).verify_key)), ("n1", bytes(keypair(2).verify_key)),
                    ("n2", bytes(keypair(3).verify_key))])
    ring.remove_owner("n1")
    assert [k.owner for k in ring] == ["n2"]


def test_screening_checks_size_key_and_owner_and_the_signature_when_asked() -> None:
    node = Signer(keypair(1), "f", "n1", boot=1)
    receiver = Receiver("f", Keyring([("n1", bytes(keypair(1).verify_key))]), max_size=200)
    good = node.seal(Heartbeat(), NOW)
    receiver.screen(good.topic, good.payload, verify=True)
    with pytest.raises(TooLarge):
        receiver.screen(good.topic, good.payload + b"\x00" * 200)
    with pytest.raises(UnknownKey):
        receiver.screen(good.topic, Signer(keypair(9), "f", "n1", 1).seal(Heartbeat(), NOW).payload)
    for topic in (good.topic.replace("/n1/", "/n2/"), "fleetflow/v1/f/n1/hb", good.topic + "/x"):
        with pytest.raises(WrongSender):
            receiver.screen(topic, good.payload)
    moved = good.topic.replace("/hb", "/tel")
    receiver.screen(moved, good.payload)  # the signature is checked only when asked
    with pytest.raises(Exception, match="signature"):
        receiver.screen(moved, good.payload, verify=True)


def test_a_hub_state_must_come_from_the_hub() -> None:
    node_key = keypair(1)
    node = Signer(node_key, "f", "n1", boot=1)
    receiver = Receiver("f", Keyring([("hub", bytes(node_key.verify_key))]))
    beat = node.seal(Heartbeat(), NOW)  # signed with a key the receiver holds for the hub, but not a hub state
    with pytest.raises(WrongTopic):
        receiver.open_hub_state(beat.topic, beat.payload)
    impostor = Signer(node_key, "f", "n1", boot=1).seal(HubState(True, bytes(node_key.verify_key)), NOW)
    with pytest.raises(WrongTopic):
        receiver.hub_key_from_state(impostor.topic, impostor.payload)


def test_a_huge_seq_jump_and_a_fenced_window_survive_a_round_trip() -> None:
    window = ReplayWindow(size=8)
    window.accept(1, 1)
    window.accept(1, 2**62)  # shifting the bitmap by this would need 2**62 bits
    assert (window.top, window.bitmap) == (2**62, 1)
    fenced = ReplayWindow.fenced(2, 9, size=16)
    assert ReplayWindow.from_dict(cbor.loads(cbor.dumps(fenced.to_dict()))) == fenced
    assert fenced.bitmap == 2**16 - 1


def test_size_limits_are_inclusive_and_every_opener_applies_its_own() -> None:
    hub_key = keypair(2)
    hub = Signer(hub_key, "f", "hub", boot=1)
    state = hub.seal(HubState(True, bytes(hub_key.verify_key)), NOW)
    exact = Receiver("f", Keyring([("hub", bytes(hub_key.verify_key))]), max_size=len(state.payload))
    exact.open_hub_state(state.topic, state.payload)
    small = Receiver("f", Keyring([("hub", bytes(hub_key.verify_key))]), max_size=len(state.payload) - 1)
    with pytest.raises(TooLarge):
        small.open_hub_state(state.topic, state.payload)
    with pytest.raises(TooLarge):
        small.hub_key_from_state(state.topic, state.payload)
    with pytest.raises(TooLarge):
        open_envelope(state.payload, state.topic, hub_key.verify_key, max_size=len(state.payload) - 1)


def test_a_hub_command_is_not_a_hub_state() -> None:
    hub_key = keypair(2)
    drain = Signer(hub_key, "f", "hub", boot=1).seal(Drain(), NOW, dst="n1", ttl_ms=1000)
    receiver = Receiver("f", Keyring([("hub", bytes(hub_key.verify_key))]), node_id="n1")
    with pytest.raises(WrongTopic):
        receiver.open_hub_state(drain.topic, drain.payload)


def test_removing_a_key_nobody_holds_is_a_no_op() -> None:
    ring = Keyring([("n1", bytes(keypair(1).verify_key))])
    ring.remove(b"\x00" * 8)
    assert len(ring) == 1


WRONG = [None, True, 1.5, "x", b"x", [1], {"k": 1}, -1, [{"k": 1}], {"k": [1]}]


def test_a_field_of_any_wrong_type_is_malformed_never_a_crash() -> None:
    """Every field of every message type, given values of other types: each is accepted (optional, or a value the
    type allows) or refused as Malformed; no other exception may come out of the checks."""
    from tests.unit.test_protocol_core import BODIES, COMMANDS

    for body in [*BODIES, *COMMANDS]:
        wire = body_to_map(body)
        for key in wire:
            for value in WRONG:
                try:
                    body_from_map(body.TYPE, {**wire, key: value})
                except Malformed:
                    pass


def test_receive_applies_the_receivers_size_limit_and_screening_lets_enroll_requests_through() -> None:
    from protocols import Enroll
    from protocols.topics import is_valid_id

    node = Signer(keypair(1), "f", "n1", boot=1)
    beat = node.seal(Heartbeat(), NOW)
    receiver = Receiver("f", Keyring([("n1", bytes(keypair(1).verify_key))]), max_size=len(beat.payload) - 1)
    with pytest.raises(TooLarge):
        receiver.receive(beat.topic, beat.payload, NOW)
    stranger = keypair(7)
    enroll = Signer(stranger, "f", "n7", boot=1).seal(Enroll(bytes(stranger.verify_key), "rpi4"), NOW)
    Receiver("f").screen(enroll.topic, enroll.payload)  # self-signed: no key to look up yet
    assert not is_valid_id(5) and not is_valid_id(b"n1")
    fresh = f"id-{uuid.uuid4().hex}"  # never seen by the id cache, in this process or the one it was forked from
    assert is_valid_id(fresh) and is_valid_id(fresh)


# -- the payload header's fast path -----------------------------------------------------------------------------------

@pytest.mark.parametrize("boot, seq, ts", [(0, 0, 0), (UINT_MAX, UINT_MAX, UINT_MAX)])
def test_every_valid_event_header_is_checked_in_one_expression(monkeypatch: Any, boot: int, seq: int,
                                                               ts: int) -> None:
    """Every message a receiver opens goes through the header check. The field-by-field loop behind it exists to
    name the bad field; a valid node header, at either end of every range, must never need it (a fast path that
    silently stopped matching would cost every message its speed and no answer would change)."""
    from protocols import messages

    def full_path(value: Any) -> Any:
        raise AssertionError(f"a valid header took the field-by-field path ({value!r})")

    payload = {"v": messages.PROTOCOL_VERSION, "type": "hb", "fleet": "f", "src": "n1", "boot": boot, "seq": seq,
               "ts": ts}
    expected = messages.decode_header(payload)
    monkeypatch.setattr(messages, "_HEADER_FIELDS", tuple((key, full_path) for key, _ in messages._HEADER_FIELDS))
    assert messages.decode_header(payload) == expected == messages.Header("hb", "f", "n1", boot, seq, ts)
