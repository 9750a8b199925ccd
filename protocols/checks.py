"""Field checks for the wire codec (protocols/messages.py): (decode, encode) pairs, one per kind of field, and the
limits they enforce. decode(value) returns the Python value or raises `Invalid`; the field path is added while the
error unwinds, so the happy path never builds path strings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .errors import Malformed
from .topics import is_valid_id

__all__ = ["BOOL", "BROKER_PASSWORD", "COUNTS", "DATA", "FAST_NAMES", "ID", "KEY32", "KID8", "LABELS", "MAC32",
           "MAX_BROKER_PASSWORD", "MAX_CONTAINER", "MAX_TEXT", "METRICS", "MIN_BROKER_PASSWORD", "NUMBER", "POSITIVE",
           "TEXT", "UINT", "UINT_MAX", "Check", "Encode", "Invalid", "expected", "list_of", "map_of", "one_of"]

MAX_CONTAINER: Final = 4096
MAX_TEXT: Final = 4096
# A node's own broker password in its enroll request (docs/protocol.md 7.1): random, so 16 characters is a floor.
MIN_BROKER_PASSWORD: Final = 16
MAX_BROKER_PASSWORD: Final = 128
UINT_MAX: Final = 2**63 - 1

Encode = Callable[[Any], Any]


class Invalid(Exception):
    """A field that fails its check; the codec turns it into `Malformed`, naming the field's path."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path: list[str] = []

    def at(self, part: str) -> Invalid:
        self.path.append(part)
        return self

    def to_malformed(self) -> Malformed:
        path = "".join(reversed(self.path)).lstrip(".")
        return Malformed(f"field '{path}': {self.detail}" if path else self.detail)


@dataclass(frozen=True, slots=True)
class Check:
    decode: Callable[[Any], Any]
    encode: Encode = staticmethod(lambda value: value)
    describe: str = ""
    # A Python expression over `{v}` that is true only where `decode(v)` would return `v` itself: the compiled codec
    # (protocols/messages.py) tests it inline and calls `decode` only when it is false, which saves a call per field
    # on the receive path. It may use the names in `FAST_NAMES`; `str.format` fills in `{v}`, so a literal brace is
    # written doubled. Empty: always call `decode`.
    fast: str = ""


def expected(what: str, value: Any) -> Invalid:
    return Invalid(f"expected {what}, got {type(value).__name__}")


def _uint(value: Any) -> int:
    if type(value) is not int:
        raise expected("an unsigned integer", value)
    if not 0 <= value <= UINT_MAX:
        raise Invalid(f"{value} is out of range")
    return value


def _id(value: Any) -> str:
    if not is_valid_id(value):
        if isinstance(value, str):
            raise Invalid(f"{value[:80]!r} is not an id ([A-Za-z0-9_.-]{{1,64}})")
        raise expected("an id", value)
    return value


def _text(value: Any) -> str:
    if type(value) is not str:
        raise expected("a text string", value)
    if len(value) > MAX_TEXT:
        raise Invalid(f"text of {len(value)} characters is over {MAX_TEXT}")
    return value


def _broker_password(value: Any) -> str:
    text = _text(value)
    if not MIN_BROKER_PASSWORD <= len(text) <= MAX_BROKER_PASSWORD or not text.isascii() or not text.isprintable():
        raise Invalid(f"a broker password is {MIN_BROKER_PASSWORD} to {MAX_BROKER_PASSWORD} printable ASCII "
                       f"characters")
    return text


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise expected("true or false", value)
    return value


def _number(value: Any) -> float:
    if type(value) is float:
        if not math.isfinite(value):
            raise Invalid(f"{value} is not a finite number")
        return value
    if type(value) is int:
        return float(value)
    raise expected("a number", value)


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise Invalid(f"must be greater than 0, got {number}")
    return number


def _key32(value: Any) -> bytes:
    if type(value) is not bytes:
        raise expected("a 32-byte public key", value)
    if len(value) != 32:
        raise Invalid(f"a public key has 32 bytes, got {len(value)}")
    return value


def _fixed_bytes(size: int, what: str) -> Callable[[Any], bytes]:
    def decode(value: Any) -> bytes:
        if type(value) is not bytes:
            raise expected(f"{what} ({size} bytes)", value)
        if len(value) != size:
            raise Invalid(f"{what} has {size} bytes, got {len(value)}")
        return value

    return decode


def _container_size(value: Any) -> None:
    if len(value) > MAX_CONTAINER:
        raise Invalid(f"{len(value)} entries is over the limit of {MAX_CONTAINER}")


def _data(value: Any) -> Any:
    """Free-form step data: null, bool, int, float, text, bytes, arrays and maps with text keys."""
    kind = type(value)
    if value is None or kind in (bool, int, float, bytes, str):
        return value
    if kind is list:
        _container_size(value)
        for i, item in enumerate(value):
            try:
                _data(item)
            except Invalid as exc:
                raise exc.at(f"[{i}]") from None
        return value
    if kind is dict:
        _container_size(value)
        for key, item in value.items():
            if type(key) is not str:
                raise Invalid(f"map keys must be text, got {type(key).__name__}")
            try:
                _data(item)
            except Invalid as exc:
                raise exc.at(f".{key}") from None
        return value
    raise expected("plain data (null, bool, number, text, bytes, array, map)", value)


def _data_map(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise expected("a map", value)
    return _data(value)


def list_of(item: Check) -> Check:
    decode_item = item.decode

    def decode(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise expected("an array", value)
        _container_size(value)
        out = []
        for i, entry in enumerate(value):
            try:
                out.append(decode_item(entry))
            except Invalid as exc:
                raise exc.at(f"[{i}]") from None
        return tuple(out)

    return Check(decode, lambda value: [item.encode(entry) for entry in value], f"[{item.describe}]")


def map_of(item: Check) -> Check:
    """A map from ids to `item` values (labels, metrics, counters)."""
    decode_item = item.decode
    to_float = decode_item is _number  # the only item checker that converts (int -> float)

    def decode(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise expected("a map", value)
        _container_size(value)
        out = {}
        for k, v in value.items():
            if not is_valid_id(k):
                try:
                    _id(k)
                except Invalid as exc:
                    raise exc.at(".<key>") from None
            kind = type(v)
            # Hot path for metric maps: a finite float or an int needs no call.
            if to_float and (kind is int or (kind is float and v - v == 0.0)):
                out[k] = float(v)
                continue
            try:
                out[k] = decode_item(v)
            except Invalid as exc:
                raise exc.at(f".{k}") from None
        return out

    return Check(decode, lambda value: {k: item.encode(v) for k, v in value.items()}, "{* id => " + item.describe + "}")


def one_of(*choices: str) -> Check:
    allowed = frozenset(choices)

    def decode(value: Any) -> str:
        if type(value) is not str or value not in allowed:
            raise Invalid(f"expected one of {', '.join(choices)}, got {str(value)[:40]!r}")
        return value

    return Check(decode, describe="|".join(choices))


FAST_NAMES: Final = {"UINT_MAX": UINT_MAX, "MAX_TEXT": MAX_TEXT, "is_valid_id": is_valid_id}
UINT: Final = Check(_uint, describe="uint", fast="type({v}) is int and 0 <= {v} <= UINT_MAX")
ID: Final = Check(_id, describe="id", fast="is_valid_id({v})")
TEXT: Final = Check(_text, describe="tstr", fast="type({v}) is str and len({v}) <= MAX_TEXT")
BROKER_PASSWORD: Final = Check(_broker_password, describe="tstr .size (16..128)")
BOOL: Final = Check(_bool, describe="bool", fast="type({v}) is bool")
NUMBER: Final = Check(_number, describe="number")
POSITIVE: Final = Check(_positive, describe="number > 0")
KEY32: Final = Check(_key32, describe="bstr .size 32")
MAC32: Final = Check(_fixed_bytes(32, "an HMAC-SHA256 tag"), describe="bstr .size 32")
KID8: Final = Check(_fixed_bytes(8, "a kid"), describe="bstr .size 8")
DATA: Final = Check(_data_map, describe="{* tstr => any}")
LABELS: Final = map_of(TEXT)
METRICS: Final = map_of(NUMBER)
COUNTS: Final = map_of(UINT)


