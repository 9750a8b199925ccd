"""Writes protocols/vectors/envelopes.json and replay.json. Deterministic: fixed keys, fixed times.

    python -m protocols.vectors.generate

Tests never run this; they check the committed files against the code and against pycose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import nacl.signing

from protocols import cbor, envelope
from protocols.messages import (Ack, Assign, AttemptRef, Birth, Body, Cancel, Config, Drain, Enroll, Header, Heartbeat,
                                HubState, StepEvent, StepResult, Telemetry, encode_payload)
from protocols.enrollment import enroll_proof, enroll_proof_input
from protocols.replay import ReplayWindow
from protocols.signing import HUB_ID, Signer

HERE = Path(__file__).parent
FLEET = "plant-1"
NODE = "press-07"
T0 = 1_763_900_000_000

NODE_KEY = nacl.signing.SigningKey(bytes(range(32)))
HUB_KEY = nacl.signing.SigningKey(bytes(range(32, 64)))
OTHER_KEY = nacl.signing.SigningKey(bytes(range(64, 96)))
ENROLL_TOKEN = "vector-enroll-token-7f3a9c2e5b1d"  # the proof in valid-enroll is made with it (section 7.1)


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def node_topic(kind: str, node: str = NODE, fleet: str = FLEET) -> str:
    return f"fleetflow/v1/{fleet}/node/{node}/{kind}"


def sign_raw(payload: bytes, topic: str, key: nacl.signing.SigningKey = NODE_KEY) -> bytes:
    return envelope.seal(payload, topic, key, envelope.kid_for(bytes(key.verify_key)))


def vector(name: str, topic: str, key: nacl.signing.SigningKey, data: bytes, expect: str, cose_valid: bool,
           payload: Any = None, note: str = "") -> dict[str, Any]:
    item: dict[str, Any] = {"name": name, "topic": topic, "public_key_hex": bytes(key.verify_key).hex(),
                            "envelope_hex": data.hex(), "expect": expect, "cose_valid": cose_valid}
    if payload is not None:
        item["payload"] = to_json(payload)
    if note:
        item["note"] = note
    return item


def valid_vectors() -> list[dict[str, Any]]:
    node = Signer(NODE_KEY, FLEET, NODE, boot=3)
    hub = Signer(HUB_KEY, FLEET, HUB_ID, boot=11)
    ref = AttemptRef("run-42", "calibrate", "run-42.calibrate.1", 17)
    node_bodies: list[Body] = [
        Enroll(bytes(NODE_KEY.verify_key), "rpi4", {"site": "north", "line": "2"},
               enroll_proof(ENROLL_TOKEN, FLEET, NODE, bytes(NODE_KEY.verify_key))),
        Birth("rpi4", "0.1.0", {"site": "north"}, ("noop", "echo", "sleep", "fail"), (ref,), 2, 4, 5.0, 10.0,
              {"cores": 4.0, "memory_mb": 4096.0, "disk_gb": 32.0}),
        Heartbeat(1, 3, 2, 0, {"replayed": 1}, False),
        Telemetry({"cpu": 12.5, "mem": 41.0, "disk": 63.2, "load1": 0.4, "temp": 51.3, "rss_mb": 30.1}),
        StepEvent("run-42", "calibrate", "run-42.calibrate.1", 17, "started", 8),
        StepResult("run-42", "calibrate", "run-42.calibrate.1", 17, True, 9, {"offset": -0.25, "ok": True}),
    ]
    hub_bodies: list[Body] = [
        Assign("run-42", "calibrate", "run-42.calibrate.1", 17, "echo", {"gain": 2}, 30.0),
        Cancel((ref,), "moved to another node"),
        Drain(True),
        Config(2.0, 5.0),
        Ack((8, 9), "accepted", envelope.kid_for(bytes(NODE_KEY.verify_key))),
    ]
    out = []
    for body in node_bodies:
        sent = node.seal(body, T0 + node.seq)
        out.append(vector(f"valid-{body.TYPE}", sent.topic, NODE_KEY, sent.payload, "valid", True,
                          cbor.loads(cbor2.loads(sent.payload).value[2])))
        if isinstance(body, Enroll):
            out[-1]["enroll_token"] = ENROLL_TOKEN
            out[-1]["proof_input_hex"] = enroll_proof_input(FLEET, NODE, body.key).hex()
    death = node.death_certificate(T0, "lost")
    out.append(vector("valid-death", death.topic, NODE_KEY, death.payload, "valid", True,
                      cbor.loads(cbor2.loads(death.payload).value[2])))
    for body in hub_bodies:
        sent = hub.seal(body, T0, dst=NODE, ttl_ms=30_000)
        out.append(vector(f"valid-{body.TYPE}", sent.topic, HUB_KEY, sent.payload, "valid", True,
                          cbor.loads(cbor2.loads(sent.payload).value[2])))
    state = hub.seal(HubState(True, bytes(HUB_KEY.verify_key), "0.1.0"), T0)
    out.append(vector("valid-hub_state", state.topic, HUB_KEY, state.payload, "valid", True,
                      cbor.loads(cbor2.loads(state.payload).value[2])))
    rotating = hub.seal(HubState(True, bytes(HUB_KEY.verify_key), "0.1.0", bytes(OTHER_KEY.verify_key)), T0 + 1)
    out.append(vector("valid-hub_state-next_key", rotating.topic, HUB_KEY, rotating.payload, "valid", True,
                      cbor.loads(cbor2.loads(rotating.payload).value[2]),
                      "a key rotation under way (section 7.2): signed by the current key, announcing next_key"))
    # Sealed last, so the sequence numbers of every vector above stay as they were.
    login = node.seal(Enroll(bytes(NODE_KEY.verify_key), "rpi4", {}, None, "vector-broker-password-2c9e41d7"),
                      T0 + node.seq)
    out.append(vector("valid-enroll-broker_password", login.topic, NODE_KEY, login.payload, "valid", True,
                      cbor.loads(cbor2.loads(login.payload).value[2]),
                      "an enroll request over the shared enrollment login, carrying the password the node will log "
                      "in to the broker with once accepted (section 7.1)"))
    return out


def heartbeat_payload(**changes: Any) -> dict[str, Any]:
    payload = encode_payload(Header("hb", FLEET, NODE, 3, 5, T0), Heartbeat(1, 3, 0, 0, {}, False))
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not _DROP}


_DROP = object()


def invalid_vectors() -> list[dict[str, Any]]:
    topic = node_topic("hb")
    good_payload = cbor2.dumps(heartbeat_payload())
    good = sign_raw(good_payload, topic)
    out = []

    def add(name: str, data: bytes, expect: str, cose_valid: bool, note: str, at: str = topic,
            key: nacl.signing.SigningKey = NODE_KEY) -> None:
        out.append(vector(name, at, key, data, expect, cose_valid, note=note))

    # bad-signature
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    add("bad-signature-flipped-signature-bit", bytes(flipped), "bad-signature", False, "last signature bit flipped")
    tampered = sign_raw(good_payload, topic)
    body_at = tampered.index(good_payload)
    tampered_payload = cbor2.dumps(heartbeat_payload(running=2))
    assert len(tampered_payload) == len(good_payload)
    add("bad-signature-payload-changed", tampered[:body_at] + tampered_payload + tampered[body_at + len(good_payload):],
        "bad-signature", False, "payload field running changed after signing")
    forged = envelope.seal(good_payload, topic, OTHER_KEY, envelope.kid_for(bytes(NODE_KEY.verify_key)))
    add("bad-signature-other-key-same-kid", forged, "bad-signature", False, "signed by another key claiming this kid")

    # wrong-topic: authentic, but not where it was signed for
    add("wrong-topic-other-node", good, "wrong-topic", False, "replayed onto another node's topic",
        at=node_topic("hb", node="press-08"))
    add("wrong-topic-other-kind", good, "wrong-topic", False, "replayed onto the telemetry topic",
        at=node_topic("tel"))
    add("wrong-topic-other-fleet", good, "wrong-topic", False, "replayed onto another fleet",
        at=node_topic("hb", fleet="plant-2"))
    impostor = sign_raw(cbor2.dumps(heartbeat_payload(src="press-08")), topic)
    add("wrong-topic-payload-names-other-node", impostor, "wrong-topic", True,
        "signature valid for this topic, but the payload says it is from press-08")

    # malformed envelopes (structure)
    add("malformed-not-cbor", b"\xff\xfe\xfd", "malformed", False, "not CBOR at all")
    add("malformed-empty", b"", "malformed", False, "zero bytes")
    add("malformed-wrong-tag", b"\xd1" + good[1:], "malformed", False, "tag 17 (COSE_Mac0) instead of 18")
    add("malformed-array-of-3", b"\xd2\x83" + good[2:good.rindex(b"\x58\x40")], "malformed", False,
        "signature element missing")
    add("malformed-short-signature", good[:-66] + b"\x58\x3f" + good[-64:-1], "malformed", False, "63-byte signature")
    add("malformed-trailing-bytes", good + b"\x00", "malformed", False,
        "one byte after the COSE_Sign1 (some COSE libraries ignore it; fleetflow does not)")
    add("malformed-truncated", good[:40], "malformed", False, "cut after 40 bytes")
    add("malformed-indefinite-payload-bstr", good[:17] + b"\x5f" + good[17:], "malformed", False,
        "indefinite-length byte string")
    add("malformed-huge-declared-length", good[:17] + b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", "malformed", False,
        "payload claims 2^64-1 bytes")
    unprotected = b"\xd2\x84" + cbor2.dumps(good[3:16]) + b"\xa1\x04\x41\x00" + good[17:]
    add("malformed-unprotected-header-not-empty", unprotected, "malformed", True,
        "unprotected header carries a kid (fleetflow requires it empty)")
    es256 = cbor2.dumps({1: -7, 4: envelope.kid_for(bytes(NODE_KEY.verify_key))})
    sig = NODE_KEY.sign(envelope.sig_structure(es256, topic, good_payload)).signature
    add("malformed-alg-not-eddsa", cbor2.dumps(cbor2.CBORTag(18, [es256, {}, good_payload, sig])), "malformed", False,
        "protected header says ES256 (-7)")

    # malformed payloads: correctly signed, so they fail after the signature check
    def signed(name: str, payload: bytes, note: str, cose_valid: bool = True) -> None:
        add(name, sign_raw(payload, topic), "malformed", cose_valid, note)

    signed("malformed-payload-not-a-map", cbor2.dumps([1, 2, 3]), "payload is an array")
    signed("malformed-payload-not-cbor", b"\xff\x00", "payload bytes are not CBOR")
    signed("malformed-payload-trailing-bytes", good_payload + b"\x01", "one byte after the payload map")
    signed("malformed-payload-tag", cbor2.dumps(heartbeat_payload(ts=cbor2.CBORTag(1, T0 // 1000))),
           "ts is a tagged date")
    signed("malformed-payload-bignum", cbor2.dumps(heartbeat_payload(seq=2**70)), "seq is a bignum (tag 2)")
    assert 0xA0 < good_payload[0] < 0xB8  # a map with its length in the initial byte
    signed("malformed-payload-indefinite-map", b"\xbf" + good_payload[1:] + b"\xff", "indefinite-length map")
    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    signed("malformed-payload-deep-nesting", cbor2.dumps(heartbeat_payload(rejected=nested)), "20 nested arrays")
    signed("malformed-payload-huge-array-length", good_payload[:-1] + b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",
           "an array that declares 2^32 entries")
    signed("malformed-payload-bad-utf8", good_payload.replace(b"plant-1", b"pl\xffnt-1"), "fleet is not valid UTF-8")
    signed("malformed-payload-missing-field", cbor2.dumps(heartbeat_payload(seq=_DROP)), "seq is missing")
    signed("malformed-payload-wrong-type", cbor2.dumps(heartbeat_payload(running="one")), "running is text")
    signed("malformed-payload-negative-seq", cbor2.dumps(heartbeat_payload(seq=-1)), "seq is negative")
    signed("malformed-payload-bad-id", cbor2.dumps(heartbeat_payload(src="press/07")), "src has a slash")
    signed("malformed-payload-unknown-type", cbor2.dumps(heartbeat_payload(type="reboot")), "unknown type")
    signed("malformed-payload-version-2", cbor2.dumps(heartbeat_payload(v=2)), "protocol version 2")
    signed("malformed-payload-duplicate-key", b"\xa2\x61v\x01\x61v\x01", "key v twice")
    signed("malformed-payload-float-nan", cbor2.dumps({**heartbeat_payload(type="tel"), "metrics": {"cpu": float("nan")}}),
           "telemetry value NaN")

    # too-large: over 64 KiB, refused before decoding
    big = cbor2.dumps({**heartbeat_payload(type="tel"), "metrics": {}, "pad": b"\x00" * (64 * 1024)})
    add("too-large-64k", sign_raw(big, node_topic("tel")), "too-large", True, "65,6xx bytes; limit is 65,536",
        at=node_topic("tel"))
    return out


def replay_vectors() -> list[dict[str, Any]]:
    cases: list[tuple[str, int, list[tuple[str, int, int]]]] = [
        ("in-order", 256, [("msg", 1, 1), ("msg", 1, 2), ("msg", 1, 3)]),
        ("duplicate", 256, [("msg", 1, 1), ("msg", 1, 2), ("msg", 1, 2)]),
        ("out-of-order-inside-window", 256, [("msg", 1, 5), ("msg", 1, 3), ("msg", 1, 4), ("msg", 1, 3)]),
        ("too-old", 4, [("msg", 1, 10), ("msg", 1, 7), ("msg", 1, 6), ("msg", 1, 5)]),
        ("newer-boot-resets", 256, [("msg", 1, 50), ("msg", 2, 1), ("msg", 2, 2), ("msg", 1, 51)]),
        ("older-boot", 256, [("msg", 5, 1), ("msg", 4, 100)]),
        ("big-jump", 64, [("msg", 1, 1), ("msg", 1, 1000), ("msg", 1, 999), ("msg", 1, 1)]),
        ("seq-zero-is-not-a-message", 256, [("msg", 1, 0)]),
        ("death-once-for-current-boot", 256, [("msg", 3, 1), ("death", 3, 0), ("death", 3, 0), ("death", 2, 0),
                                               ("msg", 4, 1), ("death", 4, 0)]),
        ("death-before-any-message", 256, [("death", 1, 0)]),
    ]
    out = []
    for name, size, steps in cases:
        window = ReplayWindow(size=size)
        rows = []
        for what, boot, seq in steps:
            try:
                window.accept_death(boot) if what == "death" else window.accept(boot, seq)
                verdict = "accept"
            except Exception:
                verdict = "replayed"
            rows.append({"kind": what, "boot": boot, "seq": seq, "expect": verdict})
        out.append({"name": name, "window": size, "steps": rows})
    return out


def main() -> None:
    envelopes = valid_vectors() + invalid_vectors()
    (HERE / "envelopes.json").write_text(json.dumps(envelopes, indent=1) + "\n")
    (HERE / "replay.json").write_text(json.dumps(replay_vectors(), indent=1) + "\n")
    print(f"wrote {len(envelopes)} envelope vectors and {len(replay_vectors())} replay cases to {HERE}")


if __name__ == "__main__":
    main()
