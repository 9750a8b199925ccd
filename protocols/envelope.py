"""COSE_Sign1 (RFC 9052, CBOR tag 18) with EdDSA over Ed25519, built and parsed by hand.

The structure is fixed, so it is laid out byte by byte instead of going through a generic CBOR encoder: this keeps
the receive path close to the cost of the signature check itself (see bench/protocol.py).

    envelope      = 18([protected: bstr .cbor {1: -8, 4: kid}, unprotected: {}, payload: bstr, signature: bstr .size 64])
    Sig_structure = ["Signature1", protected, external_aad = UTF-8 topic, payload]
"""

from __future__ import annotations

import hashlib
from typing import Final, NamedTuple

import nacl.bindings
import nacl.exceptions
import nacl.signing

from . import cbor
from .errors import BadSignature, LocalProtocolError, Malformed, TooLarge

ALG_EDDSA: Final = -8
HEADER_ALG: Final = 1
HEADER_KID: Final = 4
KID_SIZE: Final = 8
SIGNATURE_SIZE: Final = 64
KEY_SIZE: Final = 32
DEFAULT_MAX_SIZE: Final = 64 * 1024

_TAG18_ARRAY4: Final = b"\xd2\x84"
_EMPTY_MAP: Final = b"\xa0"
_SIG1_CONTEXT: Final = b"\x84\x6aSignature1"
# The protected header exactly as we write it: {1: -8, 4: h'<8 bytes>'}.
_PROTECTED_PREFIX: Final = b"\xa2\x01\x27\x04\x48"
_FAST_PREFIX: Final = _TAG18_ARRAY4 + b"\x4d" + _PROTECTED_PREFIX


def kid_for(public_key: bytes) -> bytes:
    """Key id: the first 8 bytes of SHA-256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).digest()[:KID_SIZE]


def _bstr_head(length: int) -> bytes:
    if length < 24:
        return bytes((0x40 | length,))
    if length < 0x100:
        return bytes((0x58, length))
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big")
    return b"\x5a" + length.to_bytes(4, "big")


def _bstr(data: bytes) -> bytes:
    return _bstr_head(len(data)) + data


_prefixes: dict[tuple[bytes, str], bytes] = {}  # (protected, topic) -> encoded prefix; both repeat per sender


def _prefix(protected: bytes, topic: str) -> bytes:
    """The Sig_structure up to the payload's length."""
    prefix = _prefixes.get((protected, topic))
    if prefix is None:
        prefix = _SIG1_CONTEXT + _bstr(protected) + _bstr(topic.encode())
        if len(_prefixes) >= 65536:
            _prefixes.clear()
        _prefixes[(protected, topic)] = prefix
    return prefix


def sig_structure(protected: bytes, topic: str, payload: bytes) -> bytes:
    """The bytes that are signed (RFC 9052 section 4.4), with the topic as external_aad."""
    return _prefix(protected, topic) + _bstr_head(len(payload)) + payload


def seal(payload: bytes, topic: str, key: nacl.signing.SigningKey, kid: bytes) -> bytes:
    """Sign `payload` (already CBOR) for `topic`; returns the COSE_Sign1 envelope."""
    if len(kid) != KID_SIZE:
        raise LocalProtocolError(f"kid must be {KID_SIZE} bytes, got {len(kid)}")
    protected = _PROTECTED_PREFIX + kid
    signature = key.sign(sig_structure(protected, topic, payload)).signature
    return _TAG18_ARRAY4 + _bstr(protected) + _EMPTY_MAP + _bstr(payload) + b"\x58\x40" + signature


def _signed_message(signature: bytes, protected: bytes, topic: str, payload: bytes) -> bytes:
    """libsodium's signed-message form, signature then message, with the Sig_structure as the message."""
    return b"".join((signature, _prefix(protected, topic), _bstr_head(len(payload)), payload))


class Parsed(NamedTuple):
    """An envelope whose structure is valid; its signature is not checked yet. (A named tuple, not a frozen
    dataclass: one is built per message received, and a tuple costs half as much to build.)"""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes

    def verify(self, topic: str, public_key: bytes) -> None:
        """Raise `BadSignature` unless the signature verifies for `topic` under the raw 32-byte Ed25519 key."""
        if not self.signed_for(topic, public_key):
            raise BadSignature("signature does not verify for this topic and key")

    def signed_for(self, topic: str, public_key: bytes) -> bool:
        # libsodium's crypto_sign_open on the signed-message form built in one join: `VerifyKey.verify` would copy
        # the message once more to put the signature in front. PyNaCl's private cffi module could skip the output
        # copy too (~1.5 us of ~55, 0.02x on bench/protocol.py), not worth a private import on the signature path.
        if type(public_key) is not bytes or len(public_key) != KEY_SIZE:
            raise LocalProtocolError(f"an Ed25519 public key is {KEY_SIZE} raw bytes")
        try:
            nacl.bindings.crypto_sign_open(_signed_message(self.signature, self.protected, topic, self.payload),
                                           public_key)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


def _read_bstr(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos >= len(data):
        raise Malformed(f"envelope: {what} is missing")
    head = data[pos]
    if head >> 5 != 2:
        raise Malformed(f"envelope: {what} must be a byte string")
    info = head & 0x1F
    pos += 1
    if info < 24:
        length = info
    elif info <= 27:
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise Malformed(f"envelope: {what} length is truncated")
        length = int.from_bytes(data[pos:pos + width], "big")
        pos += width
    else:
        raise Malformed(f"envelope: {what} has an indefinite or reserved length")
    end = pos + length
    if end > len(data):
        raise Malformed(f"envelope: {what} declares {length} bytes but only {len(data) - pos} follow")
    return data[pos:end], end


def _parse_protected(protected: bytes) -> bytes:
    if len(protected) == len(_PROTECTED_PREFIX) + KID_SIZE and protected.startswith(_PROTECTED_PREFIX):
        return protected[len(_PROTECTED_PREFIX):]
    header = cbor.loads(protected, "protected header")
    if not isinstance(header, dict):
        raise Malformed("envelope: protected header must be a map")
    alg = header.get(HEADER_ALG)
    if alg != ALG_EDDSA or isinstance(alg, bool):
        raise Malformed(f"envelope: protected header alg must be EdDSA (-8), got {alg!r}")
    kid = header.get(HEADER_KID)
    if not isinstance(kid, bytes) or len(kid) != KID_SIZE:
        raise Malformed(f"envelope: protected header kid must be {KID_SIZE} bytes")
    extra = set(header) - {HEADER_ALG, HEADER_KID}
    if extra:
        raise Malformed(f"envelope: protected header has unsupported labels {sorted(map(repr, extra))}")
    return kid


def parse(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Parsed:
    """Check the size limit, then the COSE_Sign1 structure. Does not verify the signature."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed("envelope must be bytes")
    if len(data) > max_size:
        raise TooLarge(f"message of {len(data)} bytes is over the {max_size}-byte limit")
    data = bytes(data)
    # Fast path: the exact layout `seal` writes (13-byte protected header, empty map, 64-byte signature at the end).
    if len(data) >= 84 and data[:8] == _FAST_PREFIX and data[16] == 0xA0 and data[-66:-64] == b"\x58\x40":
        head = data[17]
        if 0x40 <= head < 0x58:
            start, length = 18, head - 0x40
        elif head == 0x58:
            start, length = 19, data[18]
        elif head == 0x59:
            start, length = 20, int.from_bytes(data[18:20], "big")
        else:
            start, length = 0, -1
        if start + length == len(data) - 66:
            return Parsed(data[3:16], data[8:16], data[start:start + length], data[-64:])
    if not data.startswith(_TAG18_ARRAY4):
        raise Malformed("envelope: not a COSE_Sign1 (expected CBOR tag 18 around an array of 4)")
    protected, pos = _read_bstr(data, 2, "protected header")
    if data[pos:pos + 1] != _EMPTY_MAP:
        raise Malformed("envelope: unprotected header must be an empty map")
    payload, pos = _read_bstr(data, pos + 1, "payload")
    signature, pos = _read_bstr(data, pos, "signature")
    if len(signature) != SIGNATURE_SIZE:
        raise Malformed(f"envelope: signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    if pos != len(data):
        raise Malformed(f"envelope: {len(data) - pos} trailing bytes after the COSE_Sign1")
    return Parsed(protected, _parse_protected(protected), payload, signature)
