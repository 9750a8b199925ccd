"""Seal and open throughput against bare PyNaCl sign/verify and bare cbor2, measured side by side in one run.

    python bench/protocol.py [--messages 5000] [--rounds 7] [--smoke]

Each round times every operation over the same messages, interleaved, and the table reports the median round, so
machine noise hits both sides of a ratio alike. Times are the process's CPU time (`time.process_time`), not the wall
clock: on a machine other processes share, a wall-clock round also counts whatever ran in between.
"open" is `Receiver.receive`, every check the hub makes; "bare verify" is PyNaCl's `VerifyKey.verify` over
ready-made Sig_structures. A third row verifies the same bytes with libsodium's `crypto_sign_open` through PyNaCl's
private cffi module, with no output buffer and no copy: the floor of any verify from Python. What is left of "open"
beyond it is the protocol's own work (and the public binding's copy, ~1.5 us). Target (issue 17): open >= 0.9x bare
verify. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cbor2  # noqa: E402
import nacl.signing  # noqa: E402
from nacl._sodium import ffi, lib  # noqa: E402

from protocols import Heartbeat, Keyring, Receiver, Signer, Telemetry  # noqa: E402
from protocols import cbor as profile  # noqa: E402
from protocols import envelope  # noqa: E402

TARGET_OPEN = 0.9


def make_messages(n: int) -> tuple[nacl.signing.SigningKey, list]:
    key = nacl.signing.SigningKey(b"\x01" * 32)
    signer = Signer(key, "bench", "node-0001", boot=1)
    out = []
    for i in range(n):
        if i % 3 == 2:
            body = Telemetry({"cpu": 10.0 + i % 50, "mem": 40.5, "disk": 61.0, "load1": 0.3, "temp": 48.0 + i % 7,
                              "rss_mb": 30.2})
        else:
            body = Heartbeat(running=i % 4, free=4 - i % 4, outbox=i % 3)
        out.append(signer.seal(body, 1_763_900_000_000 + i))
    return key, out


def per_op_us(fn: Callable[[], None], n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds = 300, 3
    key, messages = make_messages(args.messages)
    n = len(messages)
    verify_key = key.verify_key
    parsed = [envelope.parse(m.payload) for m in messages]
    to_sign = [envelope.sig_structure(p.protected, m.topic, p.payload) for p, m in zip(parsed, messages)]
    payloads = [p.payload for p in parsed]
    bodies = [Heartbeat(running=1) if i % 3 != 2 else Telemetry({"cpu": 1.0, "mem": 2.0}) for i in range(n)]

    def bare_verify() -> None:
        for data, p in zip(to_sign, parsed):
            verify_key.verify(data, p.signature)

    signed = [p.signature + data for data, p in zip(to_sign, parsed)]
    raw_key = bytes(verify_key)

    def libsodium_verify() -> None:
        for data in signed:
            if lib.crypto_sign_open(ffi.NULL, ffi.NULL, data, len(data), raw_key) != 0:
                raise AssertionError("a signature of our own did not verify")

    def receive() -> None:
        receiver = Receiver("bench", Keyring([("node-0001", bytes(verify_key))]))
        for m in messages:
            receiver.receive(m.topic, m.payload, 1_763_900_000_000)

    def bare_sign() -> None:
        for data in to_sign:
            key.sign(data)

    def seal() -> None:
        signer = Signer(key, "bench", "node-0001", boot=2)
        for body in bodies:
            signer.seal(body, 1_763_900_000_000)

    def bare_loads() -> None:
        for p in payloads:
            cbor2.loads(p)

    def profile_loads() -> None:
        for p in payloads:
            profile.loads(p)

    ops = {"bare verify": bare_verify, "libsodium verify": libsodium_verify, "open (receive)": receive, "bare sign": bare_sign, "seal": seal,
           "bare cbor2.loads": bare_loads, "profile loads": profile_loads}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.rounds):
        for name, fn in ops.items():
            samples[name].append(per_op_us(fn, n))
    med = {name: statistics.median(v) for name, v in samples.items()}
    size = statistics.mean(len(m.payload) for m in messages)
    print(f"{n} distinct messages (2/3 heartbeat, 1/3 telemetry), mean envelope {size:.0f} bytes, "
          f"median of {args.rounds} interleaved rounds\n")
    print(f"{'operation':22s} {'us/op':>8s} {'ops/s':>10s}   ratio")
    rows = [("bare verify", None), ("libsodium verify", "bare verify"), ("open (receive)", "bare verify"),
            ("bare sign", None), ("seal", "bare sign"),
            ("bare cbor2.loads", None), ("profile loads", "bare cbor2.loads")]
    for name, base in rows:
        ratio = f"{med[base] / med[name]:.2f}x of {base}" if base else ""
        print(f"{name:22s} {med[name]:8.1f} {1e6 / med[name]:10.0f}   {ratio}")
    open_ratio = med["bare verify"] / med["open (receive)"]
    print(f"\nopen / bare verify = {open_ratio:.2f}x (target >= {TARGET_OPEN}x: "
          f"{'MET' if open_ratio >= TARGET_OPEN else 'NOT MET'}); open / libsodium verify = "
          f"{med['libsodium verify'] / med['open (receive)']:.2f}x; the protocol's own work "
          f"{med['open (receive)'] - med['libsodium verify']:.1f} us per message")
    print(json.dumps({"messages": n, "rounds": args.rounds, **{f"{name.split(' (')[0].replace(' ', '_')}_us": round(v, 3)
                                                                for name, v in med.items()},
                      "open_ratio": round(open_ratio, 3), "target_open_ratio": TARGET_OPEN,
                      "open_vs_libsodium_ratio": round(med["libsodium verify"] / med["open (receive)"], 3),
                      "seal_ratio": round(med["bare sign"] / med["seal"], 3),
                      "loads_ratio": round(med["bare cbor2.loads"] / med["profile loads"], 3)}))


if __name__ == "__main__":
    main()
