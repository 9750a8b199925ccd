"""Ed25519 key files: the private key as hex in a 0600 file, the public key as hex in `PATH.pub` beside it."""

from __future__ import annotations

import stat
from pathlib import Path

import nacl.signing

from protocols import FleetflowError, kid_for

from .storage import write_private


class KeyFileError(FleetflowError):
    """A key file is missing, unreadable, malformed, or readable by others."""


def write_new_key(path: Path, force: bool = False) -> nacl.signing.SigningKey:
    """Make a key and write it atomically with mode 0600 (never briefly world-readable)."""
    path = Path(path)
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = nacl.signing.SigningKey.generate()
    write_private(path, bytes(key).hex().encode() + b"\n")
    public_path(path).write_text(bytes(key.verify_key).hex() + "\n")
    return key


def public_path(path: Path) -> Path:
    return Path(f"{path}.pub")


def read_private_text(path: str | Path, what: str = "key file") -> str:
    """The stripped text of a file only its owner may read (a key, a token). A file other users can read is
    refused: the secret may already be out, and the operator must know."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                           f"run: chmod 600 {path}")
    if not text:
        raise KeyFileError(f"{what} {path} is empty")
    return text


def load_key(path: Path) -> nacl.signing.SigningKey:
    path = Path(path)
    return nacl.signing.SigningKey(_key_bytes(read_private_text(path), f"key file {path}"))


def parse_public_key(value: str) -> bytes:
    """A public key given as 64 hex characters or as the path of a file holding them."""
    text = value.strip()
    if len(text) != 64 or not all(c in "0123456789abcdefABCDEF" for c in text):
        candidate = Path(value)
        if not is_readable_file(value):
            raise KeyFileError(f"public key {value[:80]!r} is neither 64 hex characters nor a readable file")
        try:
            text = candidate.read_text().strip()
        except OSError as exc:
            raise KeyFileError(f"cannot read public key file {value}: {exc.strerror}") from None
    return _key_bytes(text, f"public key {value[:80]!r}")


def _key_bytes(text: str, what: str) -> bytes:
    """The 32 bytes of an Ed25519 key (private seed or public key) written as hex; `what` names it in the error."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{what} is not hex") from None
    if len(key) != 32:
        raise KeyFileError(f"{what} has {len(key)} bytes; an Ed25519 key has 32")
    return key


def is_readable_file(value: str) -> bool:
    """Path.is_file() raises on names over the OS limit (a long hex string is one); those are not files."""
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False


def describe(public_key: bytes) -> dict[str, str]:
    return {"kid": kid_for(public_key).hex(), "public_key": public_key.hex()}
