"""Verify one captured fleetflow message with pycose, a generic COSE library, and print its payload as JSON.

Standalone: it imports nothing from fleetflow. pycose 1.1.0 needs cbor2 5.x, so give it an environment of its own:

    python3 -m venv cose-env && cose-env/bin/pip install 'pycose==1.1.0' 'cbor2>=5.4,<6'

Capture a message (mosquitto_sub prints the payload as hex with -F %x), then verify it with the sender's public key
(a node's: `fleetflow nodes show ID -o json`, field "key"; the hub's: `fleetflow hub identity`) and the topic it
was published on, which is signed as the COSE external AAD (docs/protocol.md, sections 3 and 10):

    TOPIC=fleetflow/v1/plant-1/node/press-07/birth
    mosquitto_sub -h broker -t "$TOPIC" -C 1 -F %x > birth.hex
    cose-env/bin/python verify_envelope.py --public-key KEYHEX --topic "$TOPIC" --hex-file birth.hex

Exit 0 and the payload (byte strings as hex) when the signature verifies; exit 1 with the reason when it does not;
exit 2 for bad arguments. A signature check is all a generic library does: replay, expiry and the payload's schema
are the receiver's own checks (docs/protocol.md, sections 4 to 8).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import cbor2
from pycose.keys.curves import Ed25519
from pycose.keys.okp import OKPKey
from pycose.messages import Sign1Message

MAX_SIZE = 65536  # the protocol's default message limit: refuse anything bigger before decoding it


def _json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def verify(envelope: bytes, public_key: bytes, topic: str) -> dict[str, Any]:
    """The decoded payload if the COSE_Sign1 signature verifies with `public_key` over `topic`; else ValueError."""
    if len(envelope) > MAX_SIZE:
        raise ValueError(f"{len(envelope)} bytes: over the {MAX_SIZE}-byte message limit")
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    stream = io.BytesIO(envelope)
    try:
        cbor2.CBORDecoder(stream).decode()
    except Exception as exc:
        raise ValueError(f"not CBOR: {exc}") from None
    if stream.tell() != len(envelope):  # pycose ignores them; a fleetflow receiver refuses them
        raise ValueError(f"{len(envelope) - stream.tell()} bytes after the COSE_Sign1 item")
    try:
        message = Sign1Message.decode(envelope)
    except Exception as exc:  # pycose raises several kinds for a malformed structure
        raise ValueError(f"not a COSE_Sign1 message: {exc}") from None
    message.key = OKPKey(crv=Ed25519, x=public_key)
    message.external_aad = topic.encode()  # fleetflow signs the topic: a message moved to another topic fails here
    try:
        valid = message.verify_signature()
    except Exception as exc:
        raise ValueError(f"cannot verify: {exc}") from None
    if not valid:
        raise ValueError("the signature does not verify with this key and topic")
    try:
        payload = cbor2.loads(message.payload)
    except Exception as exc:
        raise ValueError(f"the signature verifies, but the payload is not CBOR: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("the signature verifies, but the payload is not a CBOR map")
    return _json(payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--public-key", required=True, help="the sender's Ed25519 public key, 64 hex digits")
    parser.add_argument("--topic", required=True, help="the topic the message was published on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hex", help="the message as hex")
    source.add_argument("--hex-file", help="a file holding the message as hex (mosquitto_sub -F %%x)")
    source.add_argument("--file", help="a file holding the raw message bytes ('-': standard input)")
    args = parser.parse_args(argv)
    try:
        key = bytes.fromhex(args.public_key)
        if args.hex is not None:
            envelope = bytes.fromhex(args.hex.strip())
        elif args.hex_file is not None:
            with open(args.hex_file) as f:
                envelope = bytes.fromhex(f.read().strip())
        elif args.file == "-":
            envelope = sys.stdin.buffer.read(MAX_SIZE + 1)
        else:
            with open(args.file, "rb") as f:
                envelope = f.read(MAX_SIZE + 1)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        payload = verify(envelope, key, args.topic)
    except ValueError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(payload, sort_keys=True, default=str))  # a CBOR tag decodes to a date, a bignum...
    return 0


if __name__ == "__main__":
    sys.exit(main())
