"""The hub's protocol object without a broker, a journal or a clock: signed messages in, facts and sealed messages
out, with time given as `now` (hub/protocol.py)."""

from __future__ import annotations

import nacl.signing
import pytest

from hub.clones import CloneWatch
from hub.events import ActionTaken, HealthChanged, NodeBorn, ResultReported
from hub.health import Policy, Threshold
from hub.protocol import REBIRTH_EVERY_MS, EnrollSettings, HubProtocol, Ingested
from hub.registry import Enrollment
from hub.state import Command, Core, SendAssign, SendCancel, SendConfig, SendDrain
from protocols import (HUB_ID, Ack, Assign, AttemptRef, Birth, Cancel, Config, Drain, Enroll, Expired, Heartbeat,
                       Keyring, Outgoing, Receiver, Signer, StepResult, Telemetry, kid_for)
from protocols.enrollment import enroll_proof

FLEET = "plant"
HUB_KEY = nacl.signing.SigningKey(b"\x01" * 32)
NODE_KEY = nacl.signing.SigningKey(b"\x02" * 32)
TOKEN = "an-enroll-token-of-some-length"


def make_hub(policy: Policy | None = None, token: str | None = None) -> HubProtocol:
    policy = policy or Policy()
    receiver = CloneWatch(FLEET, Keyring([("n1", bytes(NODE_KEY.verify_key))]))
    return HubProtocol(Core(policy), receiver, Signer(HUB_KEY, FLEET, HUB_ID, boot=1), policy,
                       EnrollSettings(token=token, token_uses=5))


def send(hub: HubProtocol, out: Outgoing, now: int, unapplied: frozenset[str] = frozenset()) -> Ingested:
    return hub.receive(out.topic, out.payload, now, unapplied)


def birth(running: tuple[AttemptRef, ...] = ()) -> Birth:
    return Birth("rpi4", "0.1.0", {"site": "a"}, ("noop",), running, 0, 2, 5.0, 10.0, {"cores": 4.0})


def born(hub: HubProtocol, node: Signer, now: int) -> None:
    """A birth received and applied, as the shell does after journaling it: the core holds the node online."""
    for fact in send(hub, node.seal(birth(), now), now).facts:
        hub.core.apply(fact)


def test_a_signed_birth_gives_node_born_and_moves_the_senders_replay_mark() -> None:
    hub, node = make_hub(), Signer(NODE_KEY, FLEET, "n1", boot=3)
    held = AttemptRef("r1", "s1", "a1", 2)
    got = send(hub, node.seal(birth((held,)), 1_000), 1_000)
    [fact] = got.facts
    assert isinstance(fact, NodeBorn)
    assert (fact.at, fact.node, fact.boot, fact.profile, fact.slots, fact.running) == (1_000, "n1", 3, "rpi4", 2,
                                                                                       (held,))
    assert got.born == got.sender == "n1" and got.replies == () and got.acks == ()
    assert hub.views["n1"].version == "0.1.0"
    forged = Signer(nacl.signing.SigningKey(b"\x09" * 32), FLEET, "n1", boot=4).seal(birth(), 2_000)
    refused = send(hub, forged, 2_000)  # another key claiming n1
    assert refused.refused is not None and refused.facts == () and refused.sender is None


def test_a_replayed_message_is_refused_and_counted() -> None:
    hub, node = make_hub(), Signer(NODE_KEY, FLEET, "n1", boot=1)
    born(hub, node, 1_000)
    result = node.seal(StepResult("r1", "s1", "a1", 1, True, 7, {"v": 1}), 2_000)
    assert send(hub, result, 2_000).facts
    again = send(hub, result, 2_100)  # a broker redelivery, or an attacker's recording
    assert again.refused is not None and again.refused.reason == "replayed"
    assert again.facts == () and again.acks == () and again.message is None
    assert hub.refused["replayed"] == 1


def test_a_step_result_gives_result_reported_and_an_ack_the_node_verifies() -> None:
    hub, node = make_hub(), Signer(NODE_KEY, FLEET, "n1", boot=1)
    born(hub, node, 1_000)
    got = send(hub, node.seal(StepResult("r1", "s1", "a1", 4, False, 9, {}, "boom"), 2_000), 2_000)
    assert got.facts == (ResultReported(2_000, "n1", "a1", 4, False, {}, "boom"),)
    assert got.acks == (9,) and got.replies == ()
    [out] = hub.outgoing([], {"n1": got.acks}, got.replies, 2_000)
    assert node_side().receive(out.topic, out.payload, 2_000).body == Ack((9,))


def test_a_node_not_held_online_is_asked_for_a_birth_at_most_every_5_s() -> None:
    hub, node = make_hub(), Signer(NODE_KEY, FLEET, "n1", boot=1)
    rebirth = (("n1", Config(rebirth=True)),)
    assert send(hub, node.seal(Heartbeat(), 1_000), 1_000).replies == rebirth  # never born here: unknown
    assert send(hub, node.seal(Heartbeat(), 1_000 + REBIRTH_EVERY_MS - 1), 1_000 + REBIRTH_EVERY_MS - 1).replies == ()
    assert send(hub, node.seal(Heartbeat(), 1_000 + REBIRTH_EVERY_MS), 1_000 + REBIRTH_EVERY_MS).replies == rebirth
    # a birth earlier in the same batch, not applied yet: the node is not asked for another
    assert send(hub, node.seal(Heartbeat(), 20_000), 20_000, frozenset({"n1"})).replies == ()
    born(hub, node, 21_000)
    assert send(hub, node.seal(Heartbeat(), 30_000), 30_000).replies == ()  # online: nothing to ask


def test_telemetry_over_a_threshold_gives_health_changed_after_the_policys_duration() -> None:
    policy = Policy(duration=10, thresholds={"temp": Threshold(high=70, critical=85)}, on_degraded=["throttle"])
    hub, node = make_hub(policy), Signer(NODE_KEY, FLEET, "n1", boot=1)
    born(hub, node, 0)
    early = [send(hub, node.seal(Telemetry({"temp": 75.0}), at), at).facts for at in range(0, 10_000, 1_000)]
    assert all(facts == () for facts in early)  # over `high`, but not yet for 10 s
    facts = send(hub, node.seal(Telemetry({"temp": 75.0}), 10_000), 10_000).facts
    changed = [f for f in facts if isinstance(f, HealthChanged)]
    assert [(f.at, f.node, f.health, f.metric) for f in changed] == [(10_000, "n1", "degraded", "temp")]
    assert [(f.node, f.action) for f in facts if isinstance(f, ActionTaken)] == [("n1", "throttle")]
    assert hub.views["n1"].telemetry == {"temp": 75.0} and hub.views["n1"].telemetry_at == 10_000


def node_side() -> Receiver:
    return Receiver(FLEET, Keyring([(HUB_ID, bytes(HUB_KEY.verify_key))]), node_id="n1")


def test_commands_seal_to_messages_the_node_verifies() -> None:
    hub, receiver = make_hub(), node_side()
    ref = AttemptRef("r1", "s1", "a1", 3)
    commands: list[Command] = [SendAssign("n1", "r1", "s1", "a1", 3, "noop", {"x": 1}, 30.0),
                               SendCancel("n1", (ref,), "moved"), SendDrain("n1", True), SendConfig("n1", 2.5)]
    sealed = hub.outgoing(commands, {"n1": [4, 5]}, [("n1", Config(rebirth=True))], 5_000)
    bodies = [receiver.receive(out.topic, out.payload, 5_000).body for out in sealed]
    assert bodies == [Assign("r1", "s1", "a1", 3, "noop", {"x": 1}, 30.0), Cancel((ref,), "moved"), Drain(True),
                      Config(None, 2.5), Ack((4, 5)), Config(rebirth=True)]
    expired = hub.outgoing([SendDrain("n1", False)], {}, [], 5_000)[0]
    with pytest.raises(Expired):  # sealed with an expiry: a late delivery is not obeyed
        receiver.receive(expired.topic, expired.payload, 5_000 + 10 * 60_000)
    too_big = SendAssign("n1", "r1", "s1", "a2", 4, "noop", {"blob": "x" * 70_000}, 30.0)
    assert hub.outgoing([too_big], {}, [], 5_000) == []  # the node would drop it unread: not sent


def test_an_enroll_request_is_judged_with_its_token_proof_and_answered_with_the_verdict() -> None:
    hub = make_hub(token=TOKEN)
    newcomer = nacl.signing.SigningKey(b"\x03" * 32)
    key = bytes(newcomer.verify_key)
    ask = Signer(newcomer, FLEET, "n2", boot=1).seal(Enroll(key, "rpi4", {}, enroll_proof(TOKEN, FLEET, "n2", key)),
                                                     1_000)
    got = send(hub, ask, 1_000)
    assert got.enroll is not None and got.facts == () and got.sender is None
    assert got.enroll.proof is True and got.enroll.policy.token_uses == 5
    sniffed = hub.enroll_request("n3", Enroll(key, "rpi4", {}, enroll_proof(TOKEN, FLEET, "n2", key)), 1_000)
    assert sniffed.proof is False  # a proof is bound to its node id
    accepted = hub.answer_enroll(got.enroll, Enrollment("accepted", "kid"))
    assert accepted.trust and accepted.reply == ("n2", Ack((), "accepted", kid_for(key)))
    assert hub.answer_enroll(got.enroll, Enrollment("pending", "kid")).trust is False
    assert hub.answer_enroll(got.enroll, Enrollment("reserved", "kid")).reply is None
    hub.trust("n2", key, fresh=True)
    heartbeat = Signer(newcomer, FLEET, "n2", boot=1).seal(Heartbeat(), 2_000)
    assert send(hub, heartbeat, 2_000).sender == "n2"  # trusted from now on
    hub.distrust("n2")
    assert send(hub, Signer(newcomer, FLEET, "n2", boot=1).seal(Heartbeat(), 3_000), 3_000).refused is not None
