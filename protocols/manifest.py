"""Artifact manifests and artifact fetch requests: COSE_Sign1 envelopes (the ones every message uses) bound to their
own `external_aad`, so neither can ever pass for a message or for the other (docs/protocol.md section 12).

A manifest says which bytes an artifact version is: `{name, version, sha256, size, file, created, ?url}` as
deterministically encoded CBOR, signed by the hub key. A fetch request is a node proving who asks for a blob:
`{fleet, node, sha256}` signed by the node's key. Pure: callers pass keys, times and bytes in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import cbor2
import nacl.signing

from . import cbor, envelope
from .errors import BadSignature, LocalProtocolError, Malformed, UnknownKey
from .topics import is_valid_id

MANIFEST_AAD: Final = "fleetflow artifact manifest v1"
FETCH_AAD: Final = "fleetflow artifact fetch v1"
# A manifest is a few hundred bytes; anything much larger was not written by a hub.
MAX_MANIFEST_BYTES: Final = 4096
MAX_URL_CHARS: Final = 2048
SEMVER: Final = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
# An id that is also a safe directory name on every side: no leading dot (so never `.` or `..`).
ARTIFACT_NAME: Final = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
FILE_NAME: Final = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,127}$")
SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
_FIELDS: Final = frozenset({"name", "version", "sha256", "size", "file", "created", "url"})


def artifact_problem(name: Any, version: Any) -> str | None:
    """Why `name`@`version` cannot name an artifact, or None."""
    if not isinstance(name, str) or not ARTIFACT_NAME.match(name):
        return f"name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - and not start with a dot"
    if not isinstance(version, str) or not SEMVER.match(version):
        return f"version {version!r} is not semantic (MAJOR.MINOR.PATCH)"
    return None


def url_problem(url: Any) -> str | None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > MAX_URL_CHARS:
        return f"url {str(url)[:80]!r} must be an http:// or https:// URL of at most {MAX_URL_CHARS} characters"
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        return "url must carry no credentials (every node would receive them)"
    return None


@dataclass(frozen=True, slots=True)
class Manifest:
    """One artifact version: `file` is the name it is installed as, `created` ms since the epoch (the hub's clock)."""

    name: str
    version: str
    sha256: str  # 64 lowercase hex digits
    size: int
    file: str
    created: int
    url: str | None = None  # a mirror that serves the same bytes (a CDN, a local cache); the hub serves them too

    def __post_init__(self) -> None:
        problem = manifest_problem(self)
        if problem is not None:
            raise LocalProtocolError(f"manifest: {problem}")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size,
                               "file": self.file, "created": self.created}
        if self.url is not None:
            out["url"] = self.url
        return out

    @classmethod
    def from_map(cls, raw: Any) -> Manifest:
        """A decoded manifest payload, every field checked; `Malformed` names the first field that is wrong."""
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise Malformed("manifest: expected a map with text keys")
        unknown = set(raw) - _FIELDS
        if unknown:  # a manifest is signed as a whole: a field this version cannot honour must not be ignored
            raise Malformed(f"manifest: unknown field(s) {', '.join(sorted(unknown))}")
        for name, kind in (("name", str), ("version", str), ("sha256", str), ("file", str), ("size", int),
                           ("created", int)):
            value = raw.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise Malformed(f"manifest: {name} is missing or not a {'text' if kind is str else 'integer'}")
        url = raw.get("url")
        try:
            return cls(raw["name"], raw["version"], raw["sha256"], raw["size"], raw["file"], raw["created"], url)
        except LocalProtocolError as exc:
            raise Malformed(str(exc)) from None


def manifest_problem(m: Manifest) -> str | None:
    problem = artifact_problem(m.name, m.version)
    if problem is not None:
        return problem
    if not SHA256_HEX.match(m.sha256):
        return "sha256 must be 64 lowercase hex digits"
    if not 0 <= m.size < 1 << 63:
        return f"size {m.size} is out of range"
    if not FILE_NAME.match(m.file):
        return f"file {m.file!r} must be a plain file name (1-128 of A-Z a-z 0-9 _ . + -, no leading dot)"
    if not 0 <= m.created < 1 << 63:
        return f"created {m.created} is out of range"
    return None if m.url is None else url_problem(m.url)


def _canonical(value: dict[str, Any]) -> bytes:
    # RFC 8949 section 4.2.1 (deterministic encoding): shortest forms, map keys sorted by their encoded bytes.
    return cbor2.dumps(value, canonical=True)


def seal_manifest(manifest: Manifest, key: nacl.signing.SigningKey) -> bytes:
    return envelope.seal(_canonical(manifest.to_map()), MANIFEST_AAD, key,
                         envelope.kid_for(bytes(key.verify_key)))


def peek_manifest(data: bytes) -> tuple[Manifest, bytes]:
    """The manifest and the kid that signed it, signature NOT checked (for listings and for choosing the key)."""
    parsed = envelope.parse(data, MAX_MANIFEST_BYTES)
    return Manifest.from_map(cbor.loads(parsed.payload, "manifest")), parsed.kid


def open_manifest(data: bytes, trusted: Iterable[bytes]) -> Manifest:
    """Verify a signed manifest against the hub keys the caller trusts (raw 32-byte Ed25519 keys).

    Raises `Malformed` (not a manifest), `UnknownKey` (signed by no trusted key) or `BadSignature`."""
    parsed = envelope.parse(data, MAX_MANIFEST_BYTES)
    keys = {envelope.kid_for(k): k for k in trusted if k}
    key = keys.get(parsed.kid)
    if key is None:
        raise UnknownKey(f"manifest signed by key {parsed.kid.hex()}, which is not a hub key this node trusts")
    try:
        parsed.verify(MANIFEST_AAD, bytes(key))
    except BadSignature:
        raise BadSignature(f"manifest signature does not verify with hub key {parsed.kid.hex()}") from None
    return Manifest.from_map(cbor.loads(parsed.payload, "manifest"))


# -- fetch requests ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FetchRequest:
    """What a node signs to fetch a blob: no time in it, so devices without a clock can fetch. Replaying one gets
    its holder only the blob it names, which travelled beside it anyway; revoking the node ends it."""

    fleet: str
    node: str
    sha256: str

    def to_map(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "node": self.node, "sha256": self.sha256}


def seal_fetch(request: FetchRequest, key: nacl.signing.SigningKey) -> bytes:
    return envelope.seal(_canonical(request.to_map()), FETCH_AAD, key, envelope.kid_for(bytes(key.verify_key)))


def peek_fetch(data: bytes) -> tuple[FetchRequest, envelope.Parsed]:
    """The request a node claims to make (signature NOT checked: the caller looks up the node's key and calls
    `verify_fetch`)."""
    parsed = envelope.parse(data, MAX_MANIFEST_BYTES)
    raw = cbor.loads(parsed.payload, "fetch request")
    if not isinstance(raw, dict) or set(raw) != {"fleet", "node", "sha256"}:
        raise Malformed("fetch request: expected exactly fleet, node and sha256")
    fleet, node, sha256 = raw["fleet"], raw["node"], raw["sha256"]
    if not is_valid_id(fleet) or not is_valid_id(node) or not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
        raise Malformed("fetch request: fleet and node must be ids, sha256 64 lowercase hex digits")
    return FetchRequest(fleet, node, sha256), parsed


def verify_fetch(parsed: envelope.Parsed, node_key: bytes) -> None:
    if parsed.kid != envelope.kid_for(node_key):
        raise UnknownKey(f"fetch request signed by key {parsed.kid.hex()}, not by the node's enrolled key")
    try:
        parsed.verify(FETCH_AAD, bytes(node_key))
    except BadSignature:
        raise BadSignature("fetch request signature does not verify with the node's key") from None
