"""The wire protocol as fuzz targets for bench/fuzz.py: envelopes, signed payloads, the agent's command path,
outbox bodies, the CBOR profile and the replay window. Seeds are envelopes of every message type sealed by the real
`Signer`; mutated payloads are signed again, so they get past the signature to the checks behind it.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import cbor2
import fuzz_inputs as gen
import nacl.signing
from fuzz_targets import CBOR, JSON, NOW, RAW, Target, refusal_reason

from agent.protocol import AgentProtocol, HubTrust, NodeFacts, Refused
from hub.clones import CloneWatch
from hub.intake import Intake
from protocols import (
    HUB_ID,
    Ack,
    Assign,
    AttemptRef,
    Birth,
    Cancel,
    Config,
    Drain,
    Enroll,
    Heartbeat,
    HubState,
    Keyring,
    ProtocolError,
    Receiver,
    ReplayWindow,
    Signer,
    StepEvent,
    StepResult,
    Telemetry,
    body_from_map,
    body_to_map,
    envelope,
    kid_for,
    open_envelope,
)
from protocols import cbor as cbor_profile
from protocols.errors import Malformed, Replayed

FLEET, NODE = "fuzz", "n1"
NODE_KEY = nacl.signing.SigningKey(b"\x11" * 32)
HUB_KEY = nacl.signing.SigningKey(b"\x22" * 32)
NEXT_HUB_KEY = nacl.signing.SigningKey(b"\x33" * 32)
STRANGER_KEY = nacl.signing.SigningKey(b"\x44" * 32)


# -- protocol seeds -----------------------------------------------------------------------------------------------------


@functools.cache
def protocol_seeds() -> list[tuple[str, bytes]]:
    """(topic, envelope) for every message type, as the real signers seal them."""
    node = Signer(NODE_KEY, FLEET, NODE, boot=3)
    hub = Signer(HUB_KEY, FLEET, HUB_ID, boot=2)
    ref = AttemptRef("r-1", "read", "a-1", 4)
    node_bodies = [
        Enroll(bytes(NODE_KEY.verify_key), "rpi4", {"line": "2"}, b"\x07" * 32),
        Birth("rpi4", "0.1.0", {"line": "2"}, ("gpio", "shell"), (ref,), 2, 4, 5.0, 10.0, {"cores": 4.0}),
        Heartbeat(1, 3, 2, 0, {"malformed": 2}, False),
        Telemetry({"cpu": 12.5, "mem": 40.0, "temp": 51.0}, NOW - 5000),
        StepEvent("r-1", "read", "a-1", 4, "progress", 7, None, 0.5, NOW),
        StepResult("r-1", "read", "a-1", 4, True, 8, {"temperature": 31.5, "sensors": ["t1", "t2"],
                                                      "raw": b"\x00\x01", "nested": {"a": [1, {"b": None}]}}),
    ]
    hub_bodies = [
        Assign("r-1", "read", "a-1", 4, "echo", {"temperature": 1, "list": [1, 2.5, "x"]}, 30.0),
        Cancel((ref,), "run cancelled"), Drain(True), Config(2.0, 4.0, True),
        Ack((1, 2, 3), "accepted", kid_for(bytes(NODE_KEY.verify_key))),
    ]
    out = [(o.topic, o.payload) for o in (node.seal(b, NOW) for b in node_bodies)]
    death = node.death_certificate(NOW)
    out.append((death.topic, death.payload))
    out += [(o.topic, o.payload) for o in (hub.seal(b, NOW, dst=NODE, ttl_ms=60_000) for b in hub_bodies)]
    state = hub.seal(HubState(True, bytes(HUB_KEY.verify_key), "0.1.0", bytes(NEXT_HUB_KEY.verify_key)), NOW)
    return [*out, (state.topic, state.payload)]


@functools.cache
def payload_seeds() -> list[dict[str, Any]]:
    return [cbor2.loads(envelope.parse(data).payload) for _, data in protocol_seeds()]


def _key_for(topic: str) -> nacl.signing.SigningKey:
    return HUB_KEY if topic.endswith(("/cmd", "/state")) else NODE_KEY


def _topic_claimed(payload: Any, rng: random.Random) -> str:
    """The topic a payload says it belongs on (so the signature checks out and the schema checks run), or now and
    then another one."""
    seeds = protocol_seeds()
    if rng.random() < 0.15 or not isinstance(payload, dict):
        return str(gen.pick(rng, seeds)[0])
    kinds = {"enroll": "enroll", "birth": "birth", "death": "death", "hb": "hb", "tel": "tel", "step": "evt",
             "result": "evt", "assign": "cmd", "cancel": "cmd", "drain": "cmd", "config": "cmd", "ack": "cmd"}
    kind = payload.get("type")
    kind = kind if isinstance(kind, str) else None
    node = payload.get("dst") if kinds.get(kind or "") == "cmd" else payload.get("src")
    if kind == "hub_state":
        return f"fleetflow/v1/{FLEET}/hub/state"
    if isinstance(kind, str) and kind in kinds and isinstance(node, str) and "/" not in node and node:
        return f"fleetflow/v1/{FLEET}/node/{node}/{kinds[kind]}"
    return str(gen.pick(rng, seeds)[0])


def signed_garbage(rng: random.Random, hub_side: bool | None = None) -> list[Any]:
    """[topic, envelope]: a payload made wrong in its types, fields, CBOR or header, then signed correctly for the
    topic it claims, so it passes the signature and reaches the schema, topic, target, expiry and replay checks."""
    seeds = payload_seeds()
    if hub_side is not None:
        seeds = [p for p in seeds if (p.get("type") in ("assign", "cancel", "drain", "config", "ack", "hub_state"))
                 == hub_side]
    seed = gen.pick(rng, seeds)
    roll = rng.random()
    raw: bytes | None = None
    payload: Any
    if roll < 0.5:
        payload = gen.mutate_value(rng, seed, donors=seeds)
    elif roll < 0.65:
        payload = {k: (gen.scalar(rng) if rng.random() < 0.5 else v) for k, v in seed.items()}
    elif roll < 0.72:
        payload = dict(seed)
        payload.update({gen.pick(rng, ("v", "type", "fleet", "src", "boot", "seq", "ts", "dst", "exp")):
                        gen.scalar(rng) for _ in range(rng.randrange(1, 4))})
    elif roll < 0.8:
        # Valid but extreme counters and times: what a replay window, an expiry or a fence meets from a real peer.
        payload = dict(seed)
        for name in rng.sample(("boot", "seq", "ts", "exp", "fence", "eid", "at", "outbox", "running"), 2):
            if name in payload or name in ("boot", "seq"):
                payload[name] = gen.pick(rng, (0, 1, 2, 3, 4, 255, 256, 257, 2**31, 2**32, 2**53 + 1, 2**62,
                                              2**63 - 1, 2**63, NOW, NOW + 10**9))
    else:
        payload = seed
        raw = gen.mutate_bytes(rng, cbor2.dumps(seed), [cbor2.dumps(p) for p in seeds[:3]])
    topic = _topic_claimed(payload, rng)
    data = raw if raw is not None else cbor2.dumps(payload)
    key = _key_for(topic) if rng.random() < 0.95 else gen.pick(rng, (NEXT_HUB_KEY, STRANGER_KEY, NODE_KEY))
    if topic.endswith("/enroll") and isinstance(payload, dict) and isinstance(payload.get("key"), bytes) \
            and len(payload["key"]) == 32 and rng.random() < 0.3:
        key = STRANGER_KEY  # self-signed by another key than the one it carries
    return [topic, envelope.seal(data, topic, key, kid_for(bytes(key.verify_key)))]


def _cose(rng: random.Random) -> bytes:
    """A COSE_Sign1 laid out by hand with wrong types, sizes, tags, headers or trailing bytes."""
    kid = kid_for(bytes(NODE_KEY.verify_key))
    protected = gen.pick(rng, (b"\xa2\x01\x27\x04\x48" + kid, cbor2.dumps({1: -8, 4: kid, 5: 1}), cbor2.dumps({1: -7, 4: kid}),
                                 cbor2.dumps({4: kid}), cbor2.dumps({1: -8, 4: kid[:4]}), cbor2.dumps([1, -8]),
                                 cbor2.dumps({1: True, 4: kid}), gen.cbor_item(rng), b""))
    parts = [
        cbor2.dumps(protected) if rng.random() < 0.9 else gen.cbor_item(rng),
        b"\xa0" if rng.random() < 0.8 else gen.cbor_item(rng),
        cbor2.dumps(gen.cbor_item(rng) if rng.random() < 0.5 else cbor2.dumps(gen.pick(rng, payload_seeds())))
        if rng.random() < 0.9 else gen.cbor_item(rng),
        cbor2.dumps(rng.randbytes(gen.pick(rng, (64, 64, 63, 65, 0, 128)))) if rng.random() < 0.9 else gen.cbor_item(rng),
    ]
    if rng.random() < 0.2:
        parts = parts[:rng.randrange(5)] + [gen.cbor_item(rng)] * rng.randrange(2)
    head = gen.pick(rng, (b"\xd2\x84", b"\xd2\x84", b"\xd2\x83", b"\xd2\x85", b"\x84", b"\xd8\x12\x84", b"\xd1\x84",
                          b"\xd2\x9f", b"\xd2\x98\x04"))
    return head + b"".join(parts) + (b"" if rng.random() < 0.9 else gen.cbor_item(rng))


def _relaid(rng: random.Random, data: bytes) -> bytes:
    """The same signed envelope with its byte strings' lengths written wider than needed: still valid COSE, still
    verifying (the signature covers the contents, not their heads), but off the parser's fast path."""
    parsed = envelope.parse(data)
    width = gen.pick(rng, (1, 2, 4, 8))

    def bstr(value: bytes) -> bytes:
        needed = 1 if len(value) < 256 else 2 if len(value) < 65536 else 4
        return gen.cbor_head(2, len(value), max(width, needed)) + value

    return b"\xd2\x84" + bstr(parsed.protected) + b"\xa0" + bstr(parsed.payload) + bstr(parsed.signature)


def hostile_envelope(rng: random.Random) -> list[Any]:
    seeds = protocol_seeds()
    topic, data = gen.pick(rng, seeds)
    roll = rng.random()
    if roll < 0.1:
        data = _relaid(rng, data)
    elif roll < 0.5:
        data = gen.mutate_bytes(rng, data, [d for _, d in seeds])
    elif roll < 0.7:
        data = _cose(rng)
    elif roll < 0.82:
        data = gen.cbor_item(rng)
    elif roll < 0.97:
        data = rng.randbytes(rng.randrange(200))
    else:
        data = data + rng.randbytes(envelope.DEFAULT_MAX_SIZE)
    if rng.random() < 0.1:
        topic = gen.pick(rng, (f"fleetflow/v1/{FLEET}/node/n2/hb", "a/b", "", f"fleetflow/v1/{FLEET}/node/n1",
                               f"fleetflow/v1/x/node/{NODE}/enroll", gen.text(rng)))
    return [topic, data]


def _hub_receiver() -> CloneWatch:
    """The hub's receiver, after a birth of n1 (boot 3, seq 2): a fuzzed message then meets a live replay window,
    and one the window refuses goes through the clone checks."""
    receiver = CloneWatch(FLEET, Keyring([(NODE, bytes(NODE_KEY.verify_key))]))
    receiver.receive(*protocol_seeds()[1], NOW)
    return receiver


def _node_receiver() -> Receiver:
    return Receiver(FLEET, Keyring([(HUB_ID, bytes(HUB_KEY.verify_key))]), node_id=NODE)


def receive_anywhere(item: list[Any]) -> str:
    """Every receive-side entry point a hub or a node has for bytes from the broker: a refusal from any of them is
    fine, anything else is a crash; the label is the last receiver's verdict."""
    topic, data = item
    try:
        open_envelope(data, topic, bytes(_key_for(topic).verify_key))
    except ProtocolError:
        pass
    if topic.endswith("/hub/state"):
        receiver = _node_receiver()
        receiver.hub_key_from_state(topic, data)
        receiver.open_hub_state(topic, data)
        return "accepted"
    if topic.endswith("/cmd"):
        receiver = _node_receiver()
    else:
        receiver = _hub_receiver()
        intake = Intake(FLEET, receiver, lambda: NOW)
        if intake.offer(topic, data):  # screened as the hub screens before queueing
            intake.take(10)
    receiver.receive(topic, data, NOW)
    if topic.endswith("/enroll"):
        return "accepted"  # enroll requests are self-signed and not replay-checked (the registry dedupes them)
    try:
        receiver.receive(topic, data, NOW)  # the same message again: the replay window must refuse it
    except Replayed:
        return "accepted"
    raise AssertionError("a message was accepted twice")


# -- the agent's command path -------------------------------------------------------------------------------------------


def agent_input(rng: random.Random) -> list[Any]:
    roll = rng.random()
    item = signed_garbage(rng, hub_side=True) if roll < 0.6 else hostile_envelope(rng)
    if roll >= 0.6 and rng.random() < 0.5:
        item[0] = gen.pick(rng, (f"fleetflow/v1/{FLEET}/node/{NODE}/cmd", f"fleetflow/v1/{FLEET}/hub/state"))
    return [*item, rng.random() < 0.2]  # trust on first use: no hub key pinned yet


def agent_receive(item: list[Any]) -> str:
    topic, data, first_use = item
    facts = NodeFacts("rpi4", "0.1.0", {"line": "2"}, ("gpio",), 2, {"cores": 4.0})
    agent = AgentProtocol(NODE_KEY, FLEET, NODE, boot=5, intervals=(5.0, 10.0), facts=facts, enrolled=True,
                          hub=HubTrust(None if first_use else bytes(HUB_KEY.verify_key)))
    agent.birth((), 0, NOW)
    outputs = agent.receive(topic, data, NOW)
    refused = [o for o in outputs if isinstance(o, Refused)]
    again = agent.receive(topic, data, NOW + 1)
    if topic.endswith("/cmd") and not refused and not any(isinstance(o, Refused) for o in again):
        raise AssertionError("a command was accepted twice")
    return f"refused {refused[0].reason}" if refused else type(outputs[-1]).__name__ if outputs else "nothing"


# -- bodies, CBOR, replay ----------------------------------------------------------------------------------------------


def body_input(rng: random.Random) -> list[Any]:
    maps = [[p["type"], {k: v for k, v in p.items() if k not in ("v", "type", "fleet", "src", "boot", "seq", "ts",
                                                                   "dst", "exp")}] for p in payload_seeds()]
    name, fields = gen.pick(rng, maps)
    if rng.random() < 0.1:
        name = gen.pick(rng, ("hb", "result", "nope", "", "Birth")) if rng.random() < 0.8 else gen.scalar(rng)
    return [name, gen.mutate_value(rng, fields, donors=[m for _, m in maps])]


def body_decode(item: list[Any]) -> str:
    name, fields = item
    body = body_from_map(name, fields)
    again = body_from_map(name, body_to_map(body))  # what we write we read back, to the same value
    if again != body:
        raise AssertionError(f"{name}: body_to_map did not round-trip: {body!r} -> {again!r}")
    return "decoded"


def cbor_input(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.5:
        return gen.cbor_item(rng)
    seeds = [cbor2.dumps(p) for p in payload_seeds()]
    return gen.mutate_bytes(rng, gen.pick(rng, seeds), seeds)


def cbor_decode(data: bytes) -> str:
    cbor_profile.loads(data)
    return "decoded"


def replay_input(rng: random.Random) -> list[list[int]]:
    boots = (0, 1, 2, 2**63 - 1)
    ops = []
    seq = rng.randrange(1, 10)
    for _ in range(rng.randrange(1, 60)):
        seq += gen.pick(rng, (1, 1, 1, 2, -1, -5, 255, 256, 257, -300, 10**6, 2**62))
        ops.append([rng.randrange(3), gen.pick(rng, boots), max(0, min(seq, 2**63 - 1))])
    return ops


def replay_window(ops: list[list[int]]) -> str:
    """Accept, refuse and persist: whatever the sequence, `check` agrees with `accept`, and the saved window reads
    back through the wire's CBOR profile to the same window (protocols/replay.py's promise)."""
    window = ReplayWindow()
    refused = 0
    for op, boot, seq in ops:
        try:
            if op == 2:
                window.accept_death(boot)
            else:
                allowed = True
                try:
                    window.check(boot, seq)
                except Replayed:
                    allowed = False
                try:
                    window.accept(boot, seq)
                except Replayed:
                    if allowed and seq != 0:
                        raise AssertionError(f"check allowed ({boot}, {seq}) and accept refused it") from None
                    raise
        except Replayed:
            refused += 1
    again = ReplayWindow.from_dict(cbor_profile.loads(cbor_profile.dumps(window.to_dict())))
    if again != window:
        raise AssertionError(f"the window did not read back: {window} -> {again}")
    return "all refused" if refused == len(ops) else "some accepted"


def protocol_targets() -> list[Target]:
    return [
        Target("cbor", "protocols.cbor.loads: the wire's bounded CBOR profile", cbor_input, cbor_decode,
               (Malformed,), RAW, refusal_reason),
        Target("envelope", "COSE_Sign1 envelopes into envelope.parse, open_envelope, Receiver.screen and receive",
               hostile_envelope, receive_anywhere, (ProtocolError,), CBOR, refusal_reason, 1.5),
        Target("payload", "correctly signed payloads with wrong types, fields and CBOR, into every receiver",
               signed_garbage, receive_anywhere, (ProtocolError,), CBOR, refusal_reason, 1.5),
        Target("command", "the agent's command path: AgentProtocol.receive on cmd and hub state topics",
               agent_input, agent_receive, (), CBOR),
        Target("body", "messages.body_from_map (the agent's outbox entries) and its round trip", body_input,
               body_decode, (Malformed,), CBOR, refusal_reason),
        Target("replay", "ReplayWindow accept/check/death sequences and its persisted form", replay_input,
               replay_window, (), JSON),
    ]
