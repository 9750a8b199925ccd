"""The CBOR profile fleetflow accepts: bounded depth, definite lengths, no tags, no duplicate keys, no trailing bytes.

cbor2 (6.x) decodes without pre-allocating from declared lengths and enforces depth itself, so a hostile length or
nesting fails fast. Tags are refused while decoding: `_TAGS_WITH_DECODERS` lists the tags cbor2 would otherwise turn
into Python objects (dates, bignums, sets, ...); every other tag goes to `tag_hook`. A test pins this list against
cbor2 across the whole tag range, so an upgrade that adds a decoder is caught.
"""

from __future__ import annotations

import io
import threading
from typing import Any, Final

import cbor2

from .errors import Malformed

MAX_DEPTH: Final = 8

# Tags cbor2 6.x decodes itself (found by probing every tag number; pinned by tests/unit/test_cbor_profile.py).
_TAGS_WITH_DECODERS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
                              43000, 55799)


class _TagRefused(cbor2.CBORDecodeError):
    pass


def _refuse_semantic(decoder: Any) -> Any:
    raise _TagRefused("CBOR tags are not allowed")


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise _TagRefused(f"CBOR tag {tag.tag} is not allowed")


_SEMANTIC: Final = {tag: _refuse_semantic for tag in _TAGS_WITH_DECODERS}


class _Local(threading.local):
    # Building a decoder costs more than decoding a heartbeat, so each thread keeps one and gives it a new stream.
    def __init__(self) -> None:
        self.decoder = cbor2.CBORDecoder(
            io.BytesIO(b""),
            tag_hook=_refuse_tag,
            semantic_decoders=_SEMANTIC,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )


_local = _Local()


def loads(data: bytes, what: str = "payload") -> Any:
    """Decode one CBOR item under the profile; any violation raises `Malformed` naming `what`."""
    stream = io.BytesIO(data)
    decoder = _local.decoder
    try:
        decoder.fp = stream
        value = decoder.decode()
    except _TagRefused as exc:
        raise Malformed(f"{what}: CBOR tags are not allowed") from exc
    except RecursionError as exc:  # belt and braces: max_depth should stop this first
        raise Malformed(f"{what}: nested too deeply") from exc
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise Malformed(f"{what}: invalid CBOR ({_first_line(exc)})") from exc
    if stream.tell() != len(data):
        raise Malformed(f"{what}: {len(data) - stream.tell()} trailing bytes after the CBOR item")
    return value


def dumps(value: Any) -> bytes:
    """Encode for the wire. Deterministic for the maps we build (insertion order is kept)."""
    return cbor2.dumps(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
