"""Enrollment proofs: an agent proves it holds the hub's enroll token without sending it (docs/protocol.md 7.1)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from . import cbor
from .errors import LocalProtocolError

ENROLL_PROOF_CONTEXT: Final = "fleetflow-enroll-proof-v1"


def enroll_proof_input(fleet: str, node_id: str, key: bytes) -> bytes:
    """The exact bytes an enroll proof authenticates (docs/protocol.md section 7): the CBOR array
    `["fleetflow-enroll-proof-v1", fleet, node_id, key]`. The context string keeps a proof from meaning anything
    to another use of the same token, and fleet, id and key are all inside, so a proof sniffed off the wire is
    good for that one request only: it enrolls no other key and no other id."""
    if len(key) != 32:
        raise LocalProtocolError(f"an Ed25519 public key has 32 bytes, got {len(key)}")
    return cbor.dumps([ENROLL_PROOF_CONTEXT, fleet, node_id, bytes(key)])


def enroll_proof(token: str, fleet: str, node_id: str, key: bytes) -> bytes:
    """HMAC-SHA256 keyed by the enroll token (UTF-8) over `enroll_proof_input`: possession of the token, proven
    without sending it."""
    return hmac.new(token.encode(), enroll_proof_input(fleet, node_id, key), hashlib.sha256).digest()


def check_enroll_proof(proof: bytes | None, token: str, fleet: str, node_id: str, key: bytes) -> bool:
    """True if `proof` was made with `token` for exactly this fleet, node id and key (constant-time compare)."""
    return proof is not None and hmac.compare_digest(proof, enroll_proof(token, fleet, node_id, key))
