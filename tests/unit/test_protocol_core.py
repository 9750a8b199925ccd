"""Topics, messages, the replay window and the receiver's checks."""

from __future__ import annotations

import re

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import (Ack, Assign, AttemptRef, Birth, Cancel, Config, Drain, Enroll, Heartbeat, HubState, Keyring,
                       LocalProtocolError, Malformed, Receiver, Replayed, ReplayWindow, Signer, StepEvent, StepResult, Telemetry,
                       Topic, TopicFilter, WrongTopic)
from protocols.messages import Header, decode_payload, encode_payload

NOW = 1_763_900_000_000


def keypair(seed: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([seed]) * 32)


# --- topics -----------------------------------------------------------------------------------------------------

def test_topic_build_and_parse_round_trip() -> None:
    topic = Topic.node("plant-1", "press_07.a", "hb")
    assert topic.value == "fleetflow/v1/plant-1/node/press_07.a/hb"
    assert Topic.parse(topic.value) == topic
    assert Topic.parse("fleetflow/v1/plant-1/hub/state") == Topic.hub_state("plant-1")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "sp ace", "é", "a\x00"])
def test_bad_ids_never_reach_a_topic(bad: str) -> None:
    with pytest.raises(LocalProtocolError, match="not a valid id"):
        Topic.node("plant-1", bad, "hb")
    with pytest.raises(LocalProtocolError, match="not a valid id"):
        Topic.node(bad, "n1", "hb")


@pytest.mark.parametrize("topic", ["fleetflow/v1/f/node/n/reboot", "fleetflow/v2/f/node/n/hb", "other/v1/f/node/n/hb",
                                   "fleetflow/v1/f/node/a+b/hb", "fleetflow/v1/f/hub/other", "fleetflow/v1/f/node/n"])
def test_topics_outside_the_tree_are_refused(topic: str) -> None:
    with pytest.raises(WrongTopic):
        Topic.parse(topic)


def test_filter_matches_like_mqtt() -> None:
    f = TopicFilter.node_kind("plant-1", "hb")
    assert f.matches("fleetflow/v1/plant-1/node/n1/hb")
    assert not f.matches("fleetflow/v1/plant-1/node/n1/tel")
    assert not f.matches("fleetflow/v1/plant-2/node/n1/hb")
    assert TopicFilter("fleetflow/v1/plant-1/#").matches("fleetflow/v1/plant-1/hub/state")
    with pytest.raises(LocalProtocolError):
        TopicFilter("a/#/b")


# --- messages ---------------------------------------------------------------------------------------------------

REF = AttemptRef("r1", "s1", "r1.s1.1", 4)
BODIES = [
    Enroll(b"k" * 32, "rpi4", {"site": "n"}, b"p" * 32), Birth("rpi4", "0.1", {"a": "b"}, ("echo",), (REF,), 1, 2),
    Heartbeat(1, 2, 3, 4, {"replayed": 1}, True), Telemetry({"cpu": 1.0}, NOW),
    StepEvent("r1", "s1", "r1.s1.1", 4, "progress", 7, None, 0.5), StepResult("r1", "s1", "r1.s1.1", 4, False, 8, {}, "boom"),
    HubState(True, b"h" * 32, "0.1"),
]
COMMANDS = [Assign("r1", "s1", "r1.s1.1", 4, "sleep", {"seconds": 1}, 9.0), Cancel((REF,), "moved"), Drain(False),
            Config(1.0, None), Ack((1, 2), None), Ack((), "taken", b"i" * 8)]


@pytest.mark.parametrize("body", BODIES + COMMANDS, ids=lambda b: b.TYPE)
def test_every_type_round_trips(body: object) -> None:
    command = body.COMMAND  # type: ignore[attr-defined]
    header = Header(body.TYPE, "f", "hub" if command else "n1", 1, 2, NOW, "n1" if command else None,  # type: ignore[attr-defined]
                    NOW + 5 if command else None)
    message = decode_payload(encode_payload(header, body))  # type: ignore[arg-type]
    assert message.body == body and message.header == header


@pytest.mark.parametrize("change, field", [
    ({"running": [{"run": "r1", "step": "s1", "attempt": "bad id", "fence": 1}]}, "running[0].attempt"),
    ({"running": [{"run": "r1", "step": "s1", "attempt": "a"}]}, "running[0].fence"),
    ({"labels": {"site": 3}}, "labels.site"),
    ({"hb": -1}, "hb"),
    ({"caps": "echo"}, "caps"),
    ({"seq": "1"}, "seq"),
    ({"profile": None}, "profile"),
])
def test_decode_errors_name_the_field(change: dict, field: str) -> None:
    payload = encode_payload(Header("birth", "f", "n1", 1, 1, NOW), BODIES[1])
    payload.update(change)
    with pytest.raises(Malformed, match=re.escape(f"field '{field}'")):
        decode_payload(payload)


def test_encode_refuses_what_a_receiver_would_refuse() -> None:
    with pytest.raises(LocalProtocolError):
        encode_payload(Header("hb", "f", "n1", 1, 1, NOW), Birth("p", "v"))
    with pytest.raises(Malformed):
        encode_payload(Header("hb", "f", "n 1", 1, 1, NOW), Heartbeat())
    with pytest.raises(LocalProtocolError, match="dst and exp"):
        encode_payload(Header("drain", "f", "hub", 1, 1, NOW), Drain())


def test_step_data_must_be_plain() -> None:
    payload = encode_payload(Header("assign", "f", "hub", 1, 1, NOW, "n1", NOW), COMMANDS[0])
    payload["with"] = {"a": [1, {"b": {1, 2}}]}
    with pytest.raises(Malformed, match=r"field 'with.a\[1\].b'"):
        decode_payload(payload)


# --- replay window ----------------------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 600)), max_size=300), st.sampled_from([8, 64, 256]))
@settings(max_examples=200, deadline=None)
def test_window_accepts_each_message_at_most_once(steps: list[tuple[int, int]], size: int) -> None:
    window = ReplayWindow(size=size)
    accepted: set[tuple[int, int]] = set()
    top_boot = -1
    for boot, seq in steps:
        try:
            window.accept(boot, seq)
        except Replayed:  # the only refusal allowed: anything else is a bug the test must show
            continue
        assert (boot, seq) not in accepted
        assert boot >= top_boot
        top_boot = boot
        accepted.add((boot, seq))
        restored = ReplayWindow.from_dict(window.to_dict())
        assert restored == window


# --- receiver ---------------------------------------------------------------------------------------------------

def make_pair() -> tuple[Signer, Signer, Receiver, Receiver]:
    node_key, hub_key = keypair(1), keypair(2)
    node = Signer(node_key, "f", "n1", boot=1)
    hub = Signer(hub_key, "f", "hub", boot=1)
    at_hub = Receiver("f", Keyring([("n1", bytes(node_key.verify_key))]))
    at_node = Receiver("f", Keyring([("hub", bytes(hub_key.verify_key))]), node_id="n1")
    return node, hub, at_hub, at_node


def reason(receiver: Receiver, topic: str, data: bytes, now: int = NOW) -> str:
    try:
        receiver.receive(topic, data, now)
    except Exception as exc:
        return getattr(exc, "reason", type(exc).__name__)
    return "ok"


def test_receiver_accepts_then_refuses_replay() -> None:
    node, _, at_hub, _ = make_pair()
    out = node.seal(Heartbeat(), NOW)
    assert reason(at_hub, out.topic, out.payload) == "ok"
    assert reason(at_hub, out.topic, out.payload) == "replayed"


def test_receiver_refuses_unknown_key_and_wrong_sender() -> None:
    _, _, at_hub, _ = make_pair()
    stranger = Signer(keypair(9), "f", "n2", boot=1)
    out = stranger.seal(Heartbeat(), NOW)
    assert reason(at_hub, out.topic, out.payload) == "unknown-key"
    at_hub.keyring.add("n1", bytes(keypair(9).verify_key))  # the key belongs to n1, the payload claims n2
    assert reason(at_hub, out.topic, out.payload) == "wrong-sender"


def test_commands_check_target_and_expiry() -> None:
    _, hub, _, at_node = make_pair()
    other = hub.seal(Drain(), NOW, dst="n2", ttl_ms=1000)
    assert reason(at_node, other.topic.replace("/n2/", "/n1/"), other.payload) == "wrong-topic"
    mine = hub.seal(Drain(), NOW, dst="n1", ttl_ms=1000)
    assert reason(at_node, mine.topic, mine.payload, NOW + 1001) == "expired"
    assert reason(at_node, mine.topic, mine.payload, NOW + 1000) == "ok"
    hub_to_other = Receiver("f", at_node.keyring, node_id="n9")
    again = hub.seal(Drain(), NOW, dst="n1", ttl_ms=1000)
    assert reason(hub_to_other, again.topic, again.payload) == "wrong-target"


def test_death_certificate_counts_once_for_the_current_boot() -> None:
    node, _, at_hub, _ = make_pair()
    will = node.death_certificate(NOW)
    assert reason(at_hub, will.topic, will.payload) == "replayed"  # no boot seen yet
    birth = node.seal(Birth("p", "v"), NOW)
    assert reason(at_hub, birth.topic, birth.payload) == "ok"
    assert reason(at_hub, will.topic, will.payload) == "ok"
    assert reason(at_hub, will.topic, will.payload) == "replayed"
    with pytest.raises(LocalProtocolError):
        node.seal(__import__("protocols").Death("lost"), NOW)


def test_enroll_is_self_signed_and_hub_state_gives_the_key() -> None:
    node, hub, at_hub, _ = make_pair()
    stranger_key = keypair(7)
    stranger = Signer(stranger_key, "f", "n7", boot=1)
    out = stranger.seal(Enroll(bytes(stranger_key.verify_key), "rpi4"), NOW)
    assert at_hub.receive(out.topic, out.payload, NOW).body.key == bytes(stranger_key.verify_key)  # type: ignore[attr-defined]
    lying = stranger.seal(Enroll(b"x" * 32, "rpi4"), NOW)
    assert reason(at_hub, lying.topic, lying.payload) == "bad-signature"
    state = hub.seal(HubState(True, bytes(hub.key.verify_key)), NOW)
    assert Receiver("f", node_id="n1").hub_key_from_state(state.topic, state.payload) == bytes(hub.key.verify_key)
