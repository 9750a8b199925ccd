"""The agent's protocol object without a broker, a disk or a clock: hub messages in, typed outputs out, and what it
builds verified by the hub's own receiver. tests/integration/ runs the same object behind the asyncio shell."""

from __future__ import annotations

import nacl.signing
import pytest

from agent.protocol import (Acked, AgentProtocol, CancelAttempts, Enrolled, EnrollRefused, HubSeen, HubTrust, Ignored,
                            Load, NodeFacts, Output, PinHubKey, PublishBirth, Refused, RunAssign, SaveHubWindow,
                            SetDrain, SetIntervals, SwitchHubKey, TrustNextHubKey)
from protocols import (HUB_ID, Ack, Assign, AttemptRef, Birth, Body, Cancel, Config, Death, Drain, Enroll, Heartbeat,
                       HubState, Keyring, Outgoing, Receiver, ReplayWindow, Signer)
from protocols.enrollment import check_enroll_proof

FLEET, NODE = "f", "n1"
NOW = 1_763_900_000_000
NODE_KEY = nacl.signing.SigningKey(b"\x01" * 32)
HUB_KEY = nacl.signing.SigningKey(b"\x02" * 32)
HUB_NEXT = nacl.signing.SigningKey(b"\x03" * 32)
ROGUE = nacl.signing.SigningKey(b"\x04" * 32)
FACTS = NodeFacts("rpi4", "9.9", {"line": "2"}, ("echo", "noop"), 3, {"cpu": 4.0})


def pub(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.verify_key)


def make(hub_key: bytes | None = pub(HUB_KEY), enrolled: bool = True, token: str | None = None,
         window: ReplayWindow | None = None) -> AgentProtocol:
    return AgentProtocol(NODE_KEY, FLEET, NODE, boot=1, hub=HubTrust(hub_key, window=window), facts=FACTS,
                         intervals=(5.0, 10.0), enrolled=enrolled, enroll_token=token)


class Hub:
    """Signs as the hub does: one boot, seq +1 per message, commands addressed to the node with a ttl."""

    def __init__(self, key: nacl.signing.SigningKey = HUB_KEY, boot: int = 4) -> None:
        self.signer = Signer(key, FLEET, HUB_ID, boot=boot)

    def command(self, body: Body) -> Outgoing:
        return self.signer.seal(body, NOW, dst=NODE, ttl_ms=60_000)

    def state(self, online: bool = True, next_key: bytes | None = None) -> Outgoing:
        return self.signer.seal(HubState(online, self.signer.public_key, "t", next_key), NOW)


def feed(protocol: AgentProtocol, out: Outgoing) -> list[Output]:
    return protocol.receive(out.topic, out.payload, NOW)


def without_windows(outputs: list[Output]) -> list[Output]:
    return [o for o in outputs if not isinstance(o, SaveHubWindow)]


ASSIGN = Assign("r1", "s1", "a1", 1, "echo", {"x": 1}, 30.0)
REF = AttemptRef("r1", "s1", "a1", 1)


# -- commands ----------------------------------------------------------------------------------------------------


def test_a_signed_assign_runs_and_the_same_message_again_is_refused_as_replayed() -> None:
    protocol, hub = make(), Hub()
    message = hub.command(ASSIGN)
    outputs = feed(protocol, message)
    assert without_windows(outputs) == [RunAssign(ASSIGN)]
    saved = next(o.window for o in outputs if isinstance(o, SaveHubWindow))
    assert (saved.boot, saved.top) == (4, 1)
    assert saved is not protocol.receiver.windows[HUB_ID]  # a snapshot: later commands do not change what is saved
    again = feed(protocol, message)
    assert len(again) == 1 and isinstance(again[0], Refused)
    assert (again[0].source, again[0].reason) == ("cmd", "replayed")
    assert protocol.rejected["replayed"] == 1


def test_a_restored_window_refuses_what_the_last_run_accepted() -> None:
    hub = Hub()
    first = hub.command(ASSIGN)
    window = next(o.window for o in feed(make(), first) if isinstance(o, SaveHubWindow))
    restarted = make(window=window)
    assert [type(o) for o in feed(restarted, first)] == [Refused]
    assert without_windows(feed(restarted, hub.command(Drain(True)))) == [SetDrain(True)]


def test_a_command_signed_by_another_key_is_refused() -> None:
    protocol = make()
    forged = Hub(ROGUE).command(ASSIGN)
    [refused] = feed(protocol, forged)
    assert isinstance(refused, Refused) and (refused.source, refused.reason) == ("cmd", "unknown-key")
    stolen_topic = Hub().command(ASSIGN)  # authentic, but moved onto another node's topic
    [moved] = protocol.receive(stolen_topic.topic.replace("/n1/", "/n2/"), stolen_topic.payload, NOW)
    assert isinstance(moved, Refused) and moved.reason == "wrong-topic"


def test_commands_map_to_typed_outputs() -> None:
    protocol, hub = make(), Hub()
    assert without_windows(feed(protocol, hub.command(Ack((3, 4))))) == [Acked((3, 4))]
    assert without_windows(feed(protocol, hub.command(Ack(())))) == []
    assert without_windows(feed(protocol, hub.command(Cancel((REF,), "moved")))) == [CancelAttempts((REF,), "moved")]
    assert without_windows(feed(protocol, hub.command(Drain(False)))) == [SetDrain(False)]
    assert without_windows(feed(protocol, hub.command(Config(hb=2.0)))) == [SetIntervals(2.0, 10.0)]
    assert (protocol.hb_interval, protocol.tel_interval) == (2.0, 10.0)
    protocol.birth((), 0, NOW)  # the session's first birth is out: a rebirth the hub asks for follows it
    assert without_windows(feed(protocol, hub.command(Config(tel=7.0, rebirth=True)))) == [
        SetIntervals(2.0, 7.0), PublishBirth("the hub asked for it (it does not hold this node online)")]


# -- births answer hub states (protocol section 8a) ---------------------------------------------------------------


def test_a_hub_state_newer_than_the_last_birth_answered_asks_for_a_birth_an_older_or_equal_one_does_not() -> None:
    protocol, hub = make(), Hub(boot=4)
    protocol.new_session(2)
    seen = hub.state()
    assert feed(protocol, seen) == [HubSeen(True)]  # before this session's first birth: that birth answers it
    protocol.birth((), 0, NOW)
    assert feed(protocol, seen) == [HubSeen(True)]  # equal to the one the birth answered (delivered again)
    newer = hub.state()
    assert feed(protocol, newer) == [HubSeen(True), PublishBirth("the hub came online (boot 4)")]
    assert feed(protocol, newer) == [HubSeen(True)]  # already seen: one birth per hub state, not per delivery
    assert feed(protocol, Hub(boot=3).state()) == [HubSeen(True)]  # an older boot of the hub
    assert feed(protocol, hub.state(online=False)) == [HubSeen(False)]
    protocol.birth((), 0, NOW)
    assert feed(protocol, Hub(boot=5).state()) == [HubSeen(True), PublishBirth("the hub came online (boot 5)")]
    protocol.new_session(3)  # a new session: its first birth answers what is seen before it
    assert feed(protocol, Hub(boot=6).state()) == [HubSeen(True)]


# -- hub key rotation (protocol section 7.2) and first use ---------------------------------------------------------


def test_a_rotation_announced_by_the_pinned_key_is_followed_one_announced_by_another_key_is_not() -> None:
    protocol, hub = make(), Hub()
    rogue = Hub(ROGUE).state(next_key=pub(ROGUE))
    [refused] = feed(protocol, rogue)
    assert isinstance(refused, Refused) and (refused.source, refused.reason) == ("hub_state", "unknown-key")
    assert {k.public_key for k in protocol.receiver.keyring} == {pub(HUB_KEY)}
    assert feed(protocol, hub.state(next_key=pub(HUB_NEXT))) == [TrustNextHubKey(pub(HUB_NEXT), pub(HUB_KEY)),
                                                                 HubSeen(True)]
    assert feed(protocol, hub.state(next_key=pub(HUB_NEXT))) == [HubSeen(True)]  # announced again: nothing new
    assert {k.public_key for k in protocol.receiver.keyring} == {pub(HUB_KEY), pub(HUB_NEXT)}
    hub.signer.use_key(HUB_NEXT)
    assert feed(protocol, hub.state()) == [SwitchHubKey(pub(HUB_NEXT), pub(HUB_KEY)), HubSeen(True)]
    assert protocol.hub_key == pub(HUB_NEXT) and protocol.hub_next_key is None
    assert {k.public_key for k in protocol.receiver.keyring} == {pub(HUB_NEXT)}
    [stale] = feed(protocol, Hub(HUB_KEY, boot=9).command(ASSIGN))  # the retired key commands nothing any more
    assert isinstance(stale, Refused) and stale.reason == "unknown-key"


def test_a_newer_announcement_replaces_the_next_key() -> None:
    protocol, hub = make(), Hub()
    feed(protocol, hub.state(next_key=pub(ROGUE)))
    assert feed(protocol, hub.state(next_key=pub(HUB_NEXT)))[0] == TrustNextHubKey(pub(HUB_NEXT), pub(HUB_KEY))
    assert {k.public_key for k in protocol.receiver.keyring} == {pub(HUB_KEY), pub(HUB_NEXT)}


def test_trust_on_first_use_pins_the_first_hub_key_seen_and_only_that_one() -> None:
    protocol = make(hub_key=None)
    [refused] = feed(protocol, Hub().command(ASSIGN))  # no hub key yet: no command is trusted
    assert isinstance(refused, Refused) and refused.reason == "unknown-key"
    assert feed(protocol, Hub().state()) == [PinHubKey(pub(HUB_KEY)), HubSeen(True)]
    assert protocol.hub_key == pub(HUB_KEY)
    [refused] = feed(protocol, Hub(ROGUE).state())  # a later hub state with another key pins nothing
    assert isinstance(refused, Refused) and (refused.source, refused.reason) == ("hub_state", "unknown-key")
    assert protocol.hub_key == pub(HUB_KEY)
    assert without_windows(feed(protocol, Hub().command(ASSIGN))) == [RunAssign(ASSIGN)]


# -- enrollment verdicts ----------------------------------------------------------------------------------------------


def test_enroll_verdicts() -> None:
    protocol, hub = make(enrolled=False), Hub()
    mine = protocol.kid

    def verdict(name: str, kid: bytes | None = mine) -> list[Output]:
        return without_windows(feed(protocol, hub.command(Ack((), name, kid))))

    assert verdict("pending") == [EnrollRefused("pending", mine)]
    assert verdict("taken") == [EnrollRefused("taken", mine)]
    assert verdict("rejected") == [EnrollRefused("rejected", mine)]
    other = bytes(8)
    assert verdict("accepted", other) == [Ignored(f"an enroll verdict (accepted) about kid {other.hex()}")]
    assert not protocol.enrolled
    assert verdict("accepted") == [Enrolled(mine)]
    assert protocol.enrolled
    assert verdict("accepted") == []  # once
    assert verdict("pending") == []   # a late answer to a request sent before the acceptance
    assert verdict("accepted", None) == []  # a verdict naming no kid is about this node's key (older hubs)


# -- what it builds, read back by the hub's receiver ---------------------------------------------------------------


def test_what_the_protocol_builds_verifies_at_the_hub() -> None:
    protocol = make(token="s3cret")
    hub = Receiver(FLEET, Keyring([(NODE, pub(NODE_KEY))]))
    protocol.new_session(7)
    will = protocol.death_certificate(NOW)
    out = protocol.enroll_request(NOW)
    enroll = hub.receive(out.topic, out.payload, NOW).body
    assert isinstance(enroll, Enroll) and enroll.key == pub(NODE_KEY) and enroll.labels == {"line": "2"}
    assert check_enroll_proof(enroll.proof, "s3cret", FLEET, NODE, pub(NODE_KEY))
    feed(protocol, Hub(ROGUE).command(ASSIGN))  # one refusal, which the heartbeat reports
    out = protocol.birth((REF,), 2, NOW)
    birth = hub.receive(out.topic, out.payload, NOW)
    assert isinstance(birth.body, Birth) and birth.header.boot == 7
    assert (birth.body.running, birth.body.outbox, birth.body.slots, birth.body.caps) == ((REF,), 2, 3, ("echo", "noop"))
    out = protocol.heartbeat(Load(1, 2, 3, 4, True), NOW)
    beat = hub.receive(out.topic, out.payload, NOW).body
    assert beat == Heartbeat(1, 2, 3, 4, {"unknown-key": 1}, True)
    assert hub.receive(will.topic, will.payload, NOW).body == Death("lost")  # this boot's Will, accepted once


@pytest.mark.parametrize("at", [None, NOW - 5_000])
def test_telemetry_and_outbox_entries_are_sealed_for_the_hub(at: int | None) -> None:
    protocol = make()
    hub = Receiver(FLEET, Keyring([(NODE, pub(NODE_KEY))]))
    out = protocol.telemetry({"cpu": 0.5}, NOW, at)
    assert hub.receive(out.topic, out.payload, NOW).body.at == at  # type: ignore[attr-defined]
    fields = {"run": "r1", "step": "s1", "attempt": "a1", "fence": 1, "event": "started"}
    out = protocol.outbox_entry("step", fields, 42, NOW)
    assert hub.receive(out.topic, out.payload, NOW).body.eid == 42  # type: ignore[attr-defined]
