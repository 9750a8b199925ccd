"""Pure parts of fault recovery: the replay window's stored form, the agent's recovery of an unreadable window, the
hub's intake (screening, lanes, quotas, every shed message counted) and liveness suspended while the hub is behind."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import cbor2
import nacl.signing
import pytest

from agent.config import AgentConfig, ConfigError
from agent.node import Agent
from hub.events import NodeBorn
from hub.intake import Intake, IntakeLimits
from hub.state import Core
from protocols import Birth, Heartbeat, Keyring, Receiver, ReplayWindow, Replayed, Signer, Telemetry, cbor

FLEET = "f"


def busy_window() -> ReplayWindow:
    window = ReplayWindow()
    for seq in range(1, 201, 2):  # 100 commands spread over 200 seqs: the bitmap needs far more than 64 bits
        window.accept(7, seq)
    return window


def test_a_busy_window_round_trips_through_our_own_profile() -> None:
    window = busy_window()
    assert window.bitmap >= 1 << 64
    stored = cbor.dumps(window.to_dict())
    assert ReplayWindow.from_dict(cbor.loads(stored, "state")) == window  # no bignum tag for the profile to refuse
    legacy = {**window.to_dict(), "bitmap": window.bitmap}  # the integer form earlier versions wrote
    assert ReplayWindow.from_dict(legacy) == window


def test_a_fenced_window_refuses_everything_at_or_below_its_mark() -> None:
    window = ReplayWindow.fenced(7, 199)
    for seq in (1, 150, 199):
        with pytest.raises(Replayed):
            window.check(7, seq)
    with pytest.raises(Replayed):
        window.check(6, 500)
    window.accept(7, 200)
    window.accept(8, 1)


def make_agent(data: Path) -> Agent:
    hub_key = bytes(nacl.signing.SigningKey.generate().verify_key)
    return Agent(AgentConfig(broker="mqtt://127.0.0.1:9", fleet=FLEET, node_id="n1", data=data, hub_key=hub_key))


def write_state(data: Path, name: str, value: bytes) -> None:
    db = sqlite3.connect(data / "outbox.sqlite")
    with db:
        db.execute("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", (name, value))
    db.close()


def close(agent: Agent) -> None:
    agent.outbox.close()
    agent.identity.close()


def test_the_agent_migrates_a_window_stored_as_a_bignum(tmp_path: Path) -> None:
    close(make_agent(tmp_path))
    window = busy_window()
    write_state(tmp_path, "hub_window", cbor2.dumps({**window.to_dict(), "bitmap": window.bitmap}))  # tag 2
    agent = make_agent(tmp_path)
    try:
        assert agent.receiver.windows["hub"] == window
        assert agent.outbox.load_state("hub_window") == window.to_dict()  # rewritten in the form the profile reads
    finally:
        close(agent)


def test_an_unreadable_window_falls_back_to_the_high_water_mark(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(tmp_path)
    agent._save_hub_window(busy_window())
    close(agent)
    write_state(tmp_path, "hub_window", b"\xff\x00garbage")
    with caplog.at_level(logging.ERROR):
        agent = make_agent(tmp_path)
    try:
        restored = agent.receiver.windows["hub"]
        with pytest.raises(Replayed):
            restored.check(7, 198)  # never seen before the crash, but at or below the mark: refused all the same
        restored.check(7, 200)
        assert "unreadable" in caplog.text and "seq 199" in caplog.text
    finally:
        close(agent)
    write_state(tmp_path, "hub_mark", b"\xff")
    agent = make_agent(tmp_path)  # nothing readable at all: it still starts
    close(agent)


def test_no_hub_key_is_a_start_error_unless_first_use_trust_is_chosen(tmp_path: Path) -> None:
    config = AgentConfig(broker="mqtt://127.0.0.1:9", fleet=FLEET, node_id="n1", data=tmp_path)
    with pytest.raises(ConfigError, match="--trust-first-hub-key"):
        Agent(config)
    config.trust_first_hub_key = True
    close(Agent(config))


# -- the hub's intake ----------------------------------------------------------------------------------------------

class Fleet:
    def __init__(self, n: int) -> None:
        self.keys = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(n)]
        self.signers = [Signer(k, FLEET, f"n{i}", boot=1) for i, k in enumerate(self.keys)]
        self.receiver = Receiver(FLEET, Keyring([(f"n{i}", bytes(k.verify_key)) for i, k in enumerate(self.keys)]))


def test_intake_screens_before_queueing_and_counts_every_shed_message() -> None:
    fleet = Fleet(3)
    limits = IntakeLimits(bulk_total=10, per_sender=(("hb", 4), ("tel", 8)))
    intake = Intake(FLEET, fleet.receiver, lambda: 1000, limits)
    hb = fleet.signers[0].seal(Heartbeat(), 1)
    assert not intake.offer(hb.topic, b"\x00garbage")
    assert not intake.offer(hb.topic.replace("/n0/", "/n1/"), hb.payload)  # n0's key on n1's topic
    stranger = Signer(nacl.signing.SigningKey(b"\x09" * 32), FLEET, "n0", boot=1).seal(Heartbeat(), 1)
    assert not intake.offer(stranger.topic, stranger.payload)
    assert dict(intake.refused) == {"malformed": 1, "wrong-sender": 1, "unknown-key": 1}
    sent = 0
    for _ in range(8):
        out = fleet.signers[1].seal(Telemetry({"cpu": 1.0}), 1)
        intake.offer(out.topic, out.payload)
        sent += 1
    for _ in range(6):  # over n2's heartbeat quota of 4
        out = fleet.signers[2].seal(Heartbeat(), 1)
        intake.offer(out.topic, out.payload)
        sent += 1
    # 12 offered past screening into a bulk bound of 10: heartbeats displace telemetry; nothing vanishes
    assert intake.shed[("hb", "sender-quota")] == 2
    assert intake.shed[("tel", "displaced")] == 2
    assert sum(intake.queued.values()) - sum(n for (k, r), n in intake.shed.items() if r == "displaced") \
        == intake.qsize() == 10
    assert sum(intake.queued.values()) + sum(n for (k, r), n in intake.shed.items() if r != "displaced") == sent
    assert intake.pressure_ms == 1000  # heartbeats displaced telemetry: the queues were full
    quiet = Intake(FLEET, fleet.receiver, lambda: 2000, limits)
    for _ in range(5):  # one sender over its own heartbeat quota: shed, but the hub is not behind
        out = fleet.signers[2].seal(Heartbeat(), 1)
        quiet.offer(out.topic, out.payload)
    assert quiet.shed[("hb", "sender-quota")] == 1 and quiet.pressure_ms == 0


def test_intake_serves_state_first_but_keeps_a_share_for_heartbeats() -> None:
    fleet = Fleet(11)
    intake = Intake(FLEET, fleet.receiver, lambda: 0)
    for _ in range(10):
        for signer in fleet.signers[:10]:
            out = signer.seal(Birth("p", "1"), 1)
            assert intake.offer(out.topic, out.payload)
    for _ in range(10):
        out = fleet.signers[10].seal(Heartbeat(), 1)
        assert intake.offer(out.topic, out.payload)
    batch = intake.take(40)
    kinds = [item.kind for item in batch]
    assert kinds[:30] == ["birth"] * 30 and kinds[30:] == ["hb"] * 10
    assert intake.qsize() == 70
    flood = fleet.signers[0].seal(Birth("p", "1"), 1)  # a sender's quota per kind: its 17th queued birth is shed
    for _ in range(20):
        intake.offer(flood.topic, flood.payload)
    assert intake.shed[("birth", "sender-quota")] > 0


def test_liveness_is_suspended_while_the_hub_is_behind() -> None:
    core = Core()
    core.apply(NodeBorn(0, "n1", 1, "p", {}, (), 1, {}, (), 1.0, 10.0))
    assert core.decide(10_000, liveness=False) == []
    assert [type(e).__name__ for e in core.decide(10_000)] == ["NodeSuspected"]
    core.after_load(10_000)  # caught up: a fresh window
    assert core.decide(11_000) == []


def test_forged_births_with_a_public_kid_take_no_queue_space_from_the_real_one() -> None:
    fleet = Fleet(1)
    intake = Intake(FLEET, fleet.receiver, lambda: 0)
    real = fleet.signers[0].seal(Birth("p", "1"), 1)
    forged = real.payload[:-1] + bytes([real.payload[-1] ^ 1])  # n0's kid, a signature that does not verify
    for _ in range(40):
        assert not intake.offer(real.topic, forged)
    assert intake.refused["bad-signature"] == 40
    assert intake.offer(real.topic, real.payload)


def test_only_a_lasting_socket_backlog_marks_the_hub_behind() -> None:
    now = [0]
    intake = Intake(FLEET, Fleet(1).receiver, lambda: now[0])
    for at in (0, 300):  # a full read now and then (a burst of junk) is not a backlog
        now[0] = at
        intake.note_backlog(True)
        intake.note_backlog(False)
    assert intake.backlog_ms == 0
    for at in (1000, 1300, 1600):  # saturated read after read for over half a second: behind
        now[0] = at
        intake.note_backlog(True)
    assert intake.backlog_ms == 1600
