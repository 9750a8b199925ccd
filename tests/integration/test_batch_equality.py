"""Replay equality of the hub's batched hot path (issue 17): the same signed traffic, taken by the core loop one
message per batch or up to `BATCH` at a time, gives the same journal, the same replay marks and the same state, and
the hub tells the nodes the same (outbox ids acknowledged, births asked for); and that state is what folding the
journal gives (a restart from the journal alone). The real hub, on the in-memory
broker and virtual time (sim/inprocess.py), so both runs see every message at the same (virtual) instant and only
the batching differs.

The traffic: births, heartbeats and telemetry of several nodes, one of them overheating for a while (its health moves
on the policy's timers), step events under attempt ids the hub never assigned, byte-for-byte copies (a broker's
redelivery, a replay), a Last Will and a new boot, interleaved across the nodes.
"""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from agent.protocol import AgentProtocol, HubTrust, Load, NodeFacts
from agent.runtime.memory import MemoryBroker, MemoryTransport
from hub import service
from hub.events import to_record
from hub.journal import Journal
from hub.registry import EnrollPolicy, Registry
from hub.service import HubConfig
from hub.state import Core
from protocols import Ack, HubState, Outgoing, body_to_map, open_envelope
from sim import virtual_time
from sim.inprocess import EPOCH_MS, STEADY, memory_hub, unmeasured_policy, virtual_clock_ms

FLEET = "batches"
NODES = [f"n{i}" for i in range(5)]
FACTS = NodeFacts("rpi4", "test", {}, ("echo",), 2, {"cpu": 4.0})
LOAD = Load(0, 2, 0, 0, False)
ROUNDS = 40       # rounds of traffic, ROUND_S apart (virtual)
ROUND_S = 5.0
HOT = {**STEADY, "temp": 95.0}  # over rpi4's critical temperature
FULL = service.BATCH


def key(node: str) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(node.encode().ljust(32, b"k"))


def wire(message: Outgoing) -> tuple[str, bytes]:
    return message.topic, message.payload


def traffic() -> list[list[tuple[str, bytes]]]:
    """What the nodes send, round by round; fixed keys and clocks, so both runs get the same bytes."""
    rng = random.Random(5)
    rounds: list[list[tuple[str, bytes]]] = [[] for _ in range(ROUNDS)]
    for node in NODES:
        agent = AgentProtocol(key(node), FLEET, node, boot=1, hub=HubTrust(None), facts=FACTS, intervals=(5.0, 10.0),
                              enrolled=True)
        eid = 0
        for r in range(ROUNDS):
            now = EPOCH_MS + int(r * ROUND_S * 1000)
            sent = rounds[r]
            if node == "n1" and r == 24:  # n1 loses power: its Will, then (two rounds on) a new boot
                sent.append(wire(agent.death_certificate(now)))
                agent.new_session(2)
                continue
            if node == "n1" and r == 25:
                continue
            if r == 0 or (node == "n1" and r == 26):
                sent.append(wire(agent.birth((), 0, now)))
            sent.append(wire(agent.heartbeat(LOAD, now)))
            hot = node == "n2" and 4 <= r < 30
            sent.append(wire(agent.telemetry(HOT if hot else STEADY, now)))
            if r % 3 == 1:
                eid += 1
                step = {"run": "r-x", "step": "s", "attempt": f"{node}.a{eid}", "fence": 1, "event": "started"}
                sent.append(wire(agent.outbox_entry("step", step, eid, now)))
    for r in range(1, ROUNDS):  # copies: of this round's messages, and of an older round's
        earlier = rounds[rng.randrange(r)]
        rounds[r] += [m for m in rounds[r] if rng.random() < 0.2] + [earlier[rng.randrange(len(earlier))]]
    for sent in rounds:
        rng.shuffle(sent)  # the nodes interleaved (a node's own messages too: the window takes any order)
    return rounds


def enroll(data: Path) -> None:
    registry = Registry(data / "nodes.json")
    for node in NODES:
        registry.request(node, bytes(key(node).verify_key), FACTS.profile, {}, EPOCH_MS, EnrollPolicy(auto_accept=True))
        registry.trusted(node)
    registry.flush()
    registry.close()


def said(broker: MemoryBroker, hub_key: bytes) -> dict[str, Any]:
    """What the hub told each node, read from the broker's log: the outbox ids it acknowledged (one ack per message,
    or one for several: batching may group them) and every other command, in order."""
    acked: dict[str, list[int]] = collections.defaultdict(list)
    commands: list[tuple[str, str, Any]] = []
    for record in broker.wire:
        if record.sender != "hub" or not record.payload:
            continue
        message = open_envelope(record.payload, record.topic, hub_key)
        if isinstance(message.body, Ack):
            acked[message.header.dst or ""] += message.body.eids
        else:  # each run's hub made its own key: the state it announces names it
            body = {**body_to_map(message.body), **({"key": "hub key"} if isinstance(message.body, HubState) else {})}
            commands.append((record.topic, message.header.type, body))
    return {"acked": {node: sorted(eids) for node, eids in acked.items()}, "commands": commands}


def unclocked(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "loaded_at": None, "nodes": [{**node, "last_seen": None} for node in state["nodes"]]}


Outcome = tuple[list[tuple[int, str, Any]], dict[str, Any], dict[str, Any], dict[str, int], dict[str, Any]]


def run_hub(root: Path, batch: int, rounds: list[list[tuple[str, bytes]]], monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """(journal records, replay marks, the hub's final state, refusals by reason, what it told the nodes) after
    `rounds`."""
    monkeypatch.setattr(service, "BATCH", batch)
    data = root / f"batch-{batch}"
    data.mkdir()
    enroll(data)

    async def main() -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
        broker = MemoryBroker()
        config = HubConfig(broker="mqtt://memory.invalid", fleet=FLEET, data=data, policy=unmeasured_policy())
        hub = memory_hub(config, MemoryTransport(broker, "hub"), virtual_clock_ms)
        task = asyncio.get_running_loop().create_task(hub.run(api=False, first_connection_required=False))
        async with MemoryTransport(broker, "load").connect("load", None) as session:
            await asyncio.sleep(1.0)  # the hub's subscriptions are in place
            for r, sent in enumerate(rounds):
                await asyncio.sleep(max(0.0, 1.0 + r * ROUND_S - asyncio.get_running_loop().time()))
                for topic, payload in sent:
                    await session.publish(topic, payload, qos=1)
            await asyncio.sleep(120.0)  # virtual: every message taken, and the policy's timers run out
        state = hub.core.to_snapshot()
        told = said(broker, hub.public_key)
        refused = dict(hub.protocol.refused)
        hub.stop()
        await asyncio.wait_for(task, 60)
        return state, refused, told

    state, refused, told = virtual_time.run(main())
    journal = Journal(data / "journal.sqlite")
    try:
        events = [event for _, event in journal.events()]
        marks = journal.marks()
    finally:
        journal.close()
    # Replay equality: the journal alone gives the state, but for when each node was last heard from and when the
    # hub started (heartbeats are not journaled: a hub that restarts gives every node a fresh heartbeat window).
    assert unclocked(Core().fold(events).to_snapshot()) == unclocked(state)
    return [(e.at, *to_record(e)) for e in events], marks, state, refused, told


def test_one_message_per_batch_and_full_batches_give_the_same_journal_marks_and_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = traffic()
    one = run_hub(tmp_path, 1, rounds, monkeypatch)
    full = run_hub(tmp_path, FULL, rounds, monkeypatch)
    odd = run_hub(tmp_path, 7, rounds, monkeypatch)
    records, marks, _, refused, told = full
    kinds = {kind for _, kind, _ in records}
    # The traffic reached every path it is meant to: births, a death and a rebirth, health moving, step events.
    assert {"node_born", "node_died", "health_changed", "step_reported"} <= kinds, kinds
    assert marks["n1"][0] == 2 and refused.get("replayed", 0) > 0, (marks, refused)
    # every step event acknowledged once: 13 a node (rounds 1, 4, ..., 37), n1 one fewer (down in round 25)
    assert sum(map(len, told["acked"].values())) == len(NODES) * 13 - 1 and told["commands"], told
    assert one == full
    assert odd == full

