"""Checks protocols/vectors/envelopes.json with pycose, an independent COSE implementation.

Runs inside its own environment (pycose 1.1.0 needs cbor2 5.x; fleetflow uses cbor2 6), so it imports nothing from
fleetflow. Prints one JSON object: vector name -> true if pycose verified the signature with the topic as
external_aad, false if it refused the envelope or the signature.
"""

import json
import sys

from pycose.keys.curves import Ed25519
from pycose.keys.okp import OKPKey
from pycose.messages import Sign1Message


def verdict(vector):
    try:
        message = Sign1Message.decode(bytes.fromhex(vector["envelope_hex"]))
        message.key = OKPKey(crv=Ed25519, x=bytes.fromhex(vector["public_key_hex"]))
        message.external_aad = vector["topic"].encode()
        return bool(message.verify_signature())
    except Exception:
        return False


def main():
    with open(sys.argv[1]) as f:
        vectors = json.load(f)
    print(json.dumps({v["name"]: verdict(v) for v in vectors}))


if __name__ == "__main__":
    main()
