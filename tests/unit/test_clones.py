"""Two devices with one identity (a cloned data directory): what the hub's receiver counts as evidence, and what
the pure core does with it (docs/protocol.md section 8a)."""

from __future__ import annotations

import nacl.signing
import pytest

from hub.clones import REPORT_EVERY_MS, CloneWatch
from hub.events import NodeBorn, NodeConflict, from_record, to_record
from hub.state import CONFLICT_QUIET_MS, Core
from protocols import Birth, Heartbeat, Keyring, Replayed, Signer

FLEET = "plant"
KEY = nacl.signing.SigningKey(b"\x07" * 32)


def birth() -> Birth:
    return Birth("rpi4", "0.1.0", {}, ("noop",), (), 0, 1, 5.0, 10.0, {"cores": 4.0})


def device(boot: int) -> Signer:
    """One of two devices that share KEY and the node id, each at its own boot."""
    signer = Signer(KEY, FLEET, "n1", boot=boot)
    return signer


def watch() -> CloneWatch:
    return CloneWatch(FLEET, Keyring([("n1", bytes(KEY.verify_key))]))


def refused(receiver: CloneWatch, out: object, now: int) -> None:
    with pytest.raises(Replayed):
        receiver.receive(out.topic, out.payload, now)  # type: ignore[attr-defined]


def test_an_older_boot_signed_after_the_newer_one_began_is_evidence() -> None:
    receiver, a, b = watch(), device(4), device(5)
    receiver.receive(*(lambda o: (o.topic, o.payload))(b.seal(birth(), 2_000)), 2_000)
    refused(receiver, a.seal(Heartbeat(0, 1, 0, 0, {}, False), 2_500), 2_500)
    [evidence] = receiver.take(3_000)
    assert (evidence.node, evidence.boot, evidence.current) == ("n1", 4, 5)
    assert "boot 4 was signed after boot 5 began" in evidence.reason


def test_a_replayed_old_message_is_not_evidence() -> None:
    receiver, node = watch(), device(4)
    old = node.seal(Heartbeat(0, 1, 0, 0, {}, False), 1_000)
    receiver.receive(old.topic, old.payload, 1_000)
    node.new_boot(5)  # the same device restarts: its newer boot is signed later than anything of the older one
    new = node.seal(birth(), 2_000)
    receiver.receive(new.topic, new.payload, 2_000)
    refused(receiver, old, 3_000)  # recorded and replayed, or delivered late by the broker
    assert receiver.take(4_000) == []


def test_two_different_births_for_one_boot_and_seq_are_evidence_a_duplicate_is_not() -> None:
    receiver, a, b = watch(), device(5), device(5)  # copied while stopped: both start at the same boot
    first = a.seal(birth(), 2_000)
    receiver.receive(first.topic, first.payload, 2_000)
    refused(receiver, first, 2_100)  # the broker delivers it again: the same bytes
    assert receiver.take(2_200) == []
    refused(receiver, b.seal(birth(), 2_050), 2_300)
    [evidence] = receiver.take(2_400)
    assert "two different births were signed for boot 5 seq 1" in evidence.reason


def test_a_death_certificate_and_a_rekeyed_node_are_not_evidence() -> None:
    receiver, a, b = watch(), device(4), device(5)
    will = a.death_certificate(2_500)  # signed before its session: its time proves nothing
    receiver.receive(*(lambda o: (o.topic, o.payload))(b.seal(birth(), 2_000)), 2_000)
    refused(receiver, will, 2_600)
    # An operator re-enrolled the id with a new key: that node starts again at boot 1, a different device on purpose.
    other = nacl.signing.SigningKey(b"\x09" * 32)
    receiver.keyring.remove_owner("n1")
    receiver.keyring.add("n1", bytes(other.verify_key))
    refused(receiver, Signer(other, FLEET, "n1", boot=1).seal(Heartbeat(0, 1, 0, 0, {}, False), 3_000), 3_000)
    assert receiver.take(4_000) == []


def test_evidence_is_journaled_at_most_once_a_minute_per_node() -> None:
    receiver, a, b = watch(), device(4), device(5)
    receiver.receive(*(lambda o: (o.topic, o.payload))(b.seal(birth(), 2_000)), 2_000)
    for t in range(3):
        refused(receiver, a.seal(Heartbeat(0, 1, 0, 0, {}, False), 2_500 + t), 2_500 + t)
    assert len(receiver.take(3_000)) == 1
    refused(receiver, a.seal(Heartbeat(0, 1, 0, 0, {}, False), 4_000), 4_000)
    assert receiver.take(5_000) == []  # kept until a minute has passed
    assert len(receiver.take(3_000 + REPORT_EVERY_MS)) == 1


def test_the_core_marks_the_node_and_a_birth_after_a_quiet_spell_clears_it() -> None:
    core = Core()
    core.apply(NodeBorn(1_000, "n1", 5, "rpi4", {}, ("noop",), 1, {"cores": 4}, (), 5.0))
    conflict = NodeConflict(2_000, "n1", 4, 5, "a hb of boot 4 was signed after boot 5 began")
    assert from_record(*to_record(conflict)) == conflict  # journaled and read back by the same codec
    assert core.apply(conflict) == []  # nothing is sent to the devices: neither is pushed into a new boot
    node = core.nodes["n1"]
    assert node.conflict == {"reason": conflict.reason, "since": 2_000, "last": 2_000, "boots": [4, 5]}
    assert node.history[-1]["kind"] == "conflict" and node.state == "online" and node.boot == 5
    core.apply(NodeConflict(62_000, "n1", 4, 6, conflict.reason))
    assert node.conflict["last"] == 62_000 and node.conflict["boots"] == [4, 5, 6]
    core.apply(NodeBorn(70_000, "n1", 6, "rpi4", {}, ("noop",), 1, {"cores": 4}, (), 5.0))
    assert node.conflict is not None  # evidence is recent: a birth does not clear it
    core.apply(NodeBorn(62_000 + CONFLICT_QUIET_MS, "n1", 7, "rpi4", {}, ("noop",), 1, {"cores": 4}, (), 5.0))
    assert node.conflict is None and node.history[-1]["conflict"] is False
    assert core.apply(NodeConflict(1, "unknown", 1, 2, "x")) == [] and "unknown" not in core.nodes
