"""The hub's own secrets in its data directory, and their rotation with an overlap, so that neither a device nor an
API client is cut off.

- Signing key. `hub.key` (+ `hub.key.pub`) is the key the hub signs with. `fleetflow hub rotate-key` writes the next
  key to `hub.key.next` (+ `.pub`) and the plan to `key-rotation.json`. The hub announces the next key in its signed
  hub state (docs/protocol.md 7.2); nodes that trust the current key trust the announced one too. `overlap` after
  the broker first took that announcement the hub switches: `hub.key.next` replaces `hub.key` and everything is
  signed with it. The overlap counts from the announcement, not from the command, so a rotation made while the hub is
  stopped still gives nodes the whole overlap to learn the key.
- API token. `fleetflow hub rotate-token` writes a new `api.token` and keeps the old one, with the time it stops
  being accepted, in `api.token.previous`.

The CLI and the hub both write these files, so every write holds an exclusive flock of `.secrets.lock` and replaces a
file atomically (mode 0600, fsync'd): a rotation and a switch never interleave and a reader never sees half a file. A
running hub notices the files change by itself (the key plan at most a second later, the tokens at the next request),
so neither rotation needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import nacl.signing

from agent.runtime.keys import KeyFileError, load_key, public_path, read_private_text, write_new_key
from agent.runtime.storage import sync_dir, write_private
from protocols import FleetflowError, HubState, Signer, kid_for

log = logging.getLogger("fleetflow.hub")

KEY_FILE: Final = "hub.key"
NEXT_KEY_FILE: Final = "hub.key.next"
ROTATION_FILE: Final = "key-rotation.json"
TOKEN_FILE: Final = "api.token"
PREVIOUS_TOKEN_FILE: Final = "api.token.previous"
LOCK_FILE: Final = ".secrets.lock"
# A node must see the announcement during the overlap: as long as devices may stay offline, for the key. API
# clients re-read a token file on every call, so an hour covers scripts and dashboards that hold the token.
DEFAULT_KEY_OVERLAP: Final = "24h"
DEFAULT_TOKEN_OVERLAP: Final = "1h"
CHECK_S: Final = 1.0  # how often a connected hub looks for a rotation the CLI started, or one that is due


class RotationError(FleetflowError):
    """A rotation that cannot be done; nothing was changed."""


# -- durations ---------------------------------------------------------------------------------------------------

_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `24h` or `7d`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if match is None:
        raise ValueError(f"{text[:40]!r} is not a duration (e.g. 90s, 30m, 24h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


# -- files -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(data: Path) -> Iterator[None]:
    """Exclusive use of the data directory's secrets, between the CLI and the hub (held for a few file writes)."""
    fd = os.open(Path(data) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _stamp(*paths: Path) -> tuple[Any, ...]:
    """What changes when one of the files is replaced: cheap to compare on every check."""
    out: list[Any] = []
    for path in paths:
        try:
            st = path.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        raw = json.loads(read_private_text(path, what))
    except ValueError:
        raise KeyFileError(f"{what} {path} is not JSON") from None
    if not isinstance(raw, dict):
        raise KeyFileError(f"{what} {path}: expected a JSON object")
    return raw


# -- the signing key ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyRotation:
    """A rotation under way: the next public key, the overlap, and when the hub first announced it (None: not yet)."""

    next_key: bytes
    overlap_ms: int
    created_at: int
    announced_at: int | None = None

    @property
    def kid(self) -> str:
        return kid_for(self.next_key).hex()

    @property
    def switch_at(self) -> int | None:
        return None if self.announced_at is None else self.announced_at + self.overlap_ms

    def to_json(self) -> bytes:
        return json.dumps({"next_key": self.next_key.hex(), "kid": self.kid, "overlap_ms": self.overlap_ms,
                           "created_at": self.created_at, "announced_at": self.announced_at}, indent=1).encode()

    @classmethod
    def read(cls, path: Path) -> KeyRotation | None:
        raw = _read_json(path, "key rotation file")
        if raw is None:
            return None
        try:
            next_key = bytes.fromhex(raw["next_key"])
            announced = raw.get("announced_at")
            rotation = cls(next_key, int(raw["overlap_ms"]), int(raw["created_at"]),
                           None if announced is None else int(announced))
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"key rotation file {path}: missing or bad field {exc}") from None
        if len(next_key) != 32 or rotation.overlap_ms < 0:
            raise KeyFileError(f"key rotation file {path}: bad next_key or overlap_ms")
        return rotation


class HubKeys:
    """The key the hub signs with now, and the rotation under way (if any), as the files in `data` say."""

    def __init__(self, data: Path, current: nacl.signing.SigningKey) -> None:
        self.data = Path(data)
        self.current = current
        self.next: nacl.signing.SigningKey | None = None
        self.rotation: KeyRotation | None = None
        self._stamp: tuple[Any, ...] = ()

    @classmethod
    def open(cls, data: Path, now: int) -> HubKeys:
        """The keys at start: hub.key (made on first start), a rotation under way, and the switch if it is due."""
        data = Path(data)
        with locked(data):
            path = data / KEY_FILE
            keys = cls(data, load_key(path) if path.exists() else write_new_key(path))
            keys._load()
            if keys.due(now):
                keys._switch()
        return keys

    @property
    def public_key(self) -> bytes:
        return bytes(self.current.verify_key)

    def state(self, online: bool, version: str) -> HubState:
        """The hub state to sign: the current key, and the next one while a rotation is under way."""
        return HubState(online, self.public_key, version,
                        bytes(self.next.verify_key) if self.next is not None else None)

    def _paths(self) -> tuple[Path, Path]:
        return self.data / ROTATION_FILE, self.data / NEXT_KEY_FILE

    def _load(self, report: bool = True) -> None:
        """Read the rotation plan (the lock is held). A plan whose next key is gone or does not match is ignored and
        logged: the hub keeps signing with its current key rather than stop."""
        plan_path, next_path = self._paths()
        self._stamp = _stamp(plan_path, next_path)
        self.rotation, self.next = None, None
        try:
            rotation = KeyRotation.read(plan_path)
            if rotation is None:
                return
            if rotation.next_key == self.public_key:
                # A switch was interrupted after hub.key was replaced: finish it.
                public_path(self.data / KEY_FILE).write_text(self.public_key.hex() + "\n")
                plan_path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    public_path(next_path).unlink()
                self._stamp = _stamp(plan_path, next_path)
                return
            following = load_key(next_path)
        except (KeyFileError, OSError) as exc:
            if not report:
                return
            log.error("ignoring the hub key rotation in %s (the hub keeps its current key): %s; start it again with "
                      "fleetflow hub rotate-key --data %s", self.data, exc, shlex.quote(str(self.data.resolve())))
            return
        if bytes(following.verify_key) != rotation.next_key:
            if not report:
                return
            log.error("ignoring the hub key rotation in %s: %s does not hold the key %s names", self.data, next_path,
                      plan_path.name)
            return
        self.rotation, self.next = rotation, following

    def refresh(self) -> bool:
        """Re-read the plan if its files changed (the CLI started a rotation). True if the next key changed."""
        if _stamp(*self._paths()) == self._stamp:
            return False
        before = self.rotation.next_key if self.rotation else None
        with locked(self.data):
            self._load()
        return (self.rotation.next_key if self.rotation else None) != before

    def announced(self, now: int) -> None:
        """The broker took a hub state carrying the next key: the overlap starts now (once)."""
        rotation = self.rotation
        if rotation is None or rotation.announced_at is not None:
            return
        with locked(self.data):
            plan_path = self.data / ROTATION_FILE
            on_disk = KeyRotation.read(plan_path)
            if on_disk is None or on_disk.next_key != rotation.next_key:
                return  # replaced meanwhile: the next refresh reads the new plan
            self.rotation = replace(rotation, announced_at=now)
            write_private(plan_path, self.rotation.to_json())
            self._stamp = _stamp(*self._paths())

    def due(self, now: int) -> bool:
        switch_at = self.rotation.switch_at if self.rotation is not None else None
        return self.next is not None and switch_at is not None and now >= switch_at

    def switch(self) -> None:
        with locked(self.data):
            self._switch()

    def _switch(self) -> None:
        """hub.key.next becomes hub.key (the lock is held). The plan goes last: a crash in between is finished by
        `_load` at the next start, since the plan then names the key hub.key holds."""
        assert self.next is not None
        plan_path, next_path = self._paths()
        key_path = self.data / KEY_FILE
        os.replace(next_path, key_path)
        sync_dir(self.data)
        self.current, self.next = self.next, None
        with contextlib.suppress(FileNotFoundError):
            os.replace(public_path(next_path), public_path(key_path))
        plan_path.unlink()
        sync_dir(self.data)
        self.rotation = None
        self._stamp = _stamp(plan_path, next_path)


def start_key_rotation(data: Path, overlap_s: float, now: int) -> KeyRotation:
    """`fleetflow hub rotate-key`: write the next key and the plan. Refused while a rotation is under way: a node
    that learnt the first next key and then went offline would never learn a second one."""
    data = Path(data)
    if not (data / KEY_FILE).exists():
        raise RotationError(f"{data} holds no {KEY_FILE} (is it a hub data directory?)")
    with locked(data):
        current = load_key(data / KEY_FILE)
        keys = HubKeys(data, current)
        keys._load(report=False)  # a broken plan is replaced by this one
        if keys.rotation is not None:
            rotation = keys.rotation
            when = (f"switches at {utc(rotation.switch_at)}" if rotation.switch_at is not None
                    else "not announced yet (the hub announces it when it runs)")
            raise RotationError(f"a hub key rotation is under way: next key kid {rotation.kid}, {when}; wait until "
                                f"it ends")
        following = write_new_key(data / NEXT_KEY_FILE, force=True)
        rotation = KeyRotation(bytes(following.verify_key), int(overlap_s * 1000), now)
        write_private(data / ROTATION_FILE, rotation.to_json())
    return rotation


def read_rotation(data: Path) -> KeyRotation | None:
    """The plan as written (for `hub identity`), without checking the key file."""
    return KeyRotation.read(Path(data) / ROTATION_FILE)


async def follow_rotation(keys: HubKeys, signer: Signer, publish_state: Callable[[], Awaitable[None]],
                          clock: Callable[[], int]) -> None:
    """While the hub is connected: announce a rotation the CLI started, and switch once its overlap has passed.
    `publish_state` publishes the retained online hub state (and marks the announcement once the broker took it)."""
    while True:
        try:
            await _rotation_step(keys, signer, publish_state, clock)
        except (KeyFileError, OSError) as exc:  # a file we cannot write: say so, keep signing, try again
            log.error("hub key rotation: %s", exc)
        switch_at = keys.rotation.switch_at if keys.rotation is not None else None
        wait = CHECK_S if switch_at is None else min(CHECK_S, max(0.01, (switch_at - clock()) / 1000))
        await asyncio.sleep(wait)


async def _rotation_step(keys: HubKeys, signer: Signer, publish_state: Callable[[], Awaitable[None]],
                         clock: Callable[[], int]) -> None:
    if keys.refresh() and keys.rotation is not None:
        log.info("hub key rotation found: next key kid %s (public key %s), overlap %s", keys.rotation.kid,
                 keys.rotation.next_key.hex(), human(keys.rotation.overlap_ms / 1000))
    rotation = keys.rotation
    if rotation is not None and rotation.announced_at is None:
        await publish_state()
        switch_at = keys.rotation.switch_at if keys.rotation is not None else None
        if switch_at is not None:
            log.info("announced the next hub key (kid %s) in the hub state; the hub signs with it from %s. Nodes that "
                     "trust the current key trust it from the announcement on; a node offline until then needs "
                     "--hub-key %s", rotation.kid, utc(switch_at), rotation.next_key.hex())
    elif rotation is not None and keys.due(clock()):
        retired = kid_for(keys.public_key).hex()
        keys.switch()
        signer.use_key(keys.current)
        await publish_state()
        log.info("switched to the next hub key: signing with kid %s from now on, kid %s is retired; "
                 "fleetflow hub identity --data %s prints the new public key", kid_for(keys.public_key).hex(), retired,
                 shlex.quote(str(keys.data.resolve())))


# -- the API token -----------------------------------------------------------------------------------------------

def ensure_token(path: Path) -> str:
    """The API token, made (mode 0600) on first start. Like a key file, refused when other users can read it."""
    if path.exists():
        return read_private_text(path, "API token file")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    return token


@dataclass(frozen=True, slots=True)
class PreviousToken:
    token: str
    until: int  # ms: accepted before this time, refused from it on


def _read_previous(path: Path) -> PreviousToken | None:
    raw = _read_json(path, "previous API token file")
    if raw is None:
        return None
    try:
        return PreviousToken(str(raw["token"]), int(raw["until"]))
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"previous API token file {path}: expected token and until") from None


class ApiTokens:
    """The bearer tokens a running hub accepts: `api.token`, and during an overlap the previous one. Both files are
    re-read when they change, so `hub rotate-token` takes effect at the next request."""

    def __init__(self, data: Path) -> None:
        self.path = Path(data) / TOKEN_FILE
        self.previous_path = Path(data) / PREVIOUS_TOKEN_FILE
        self.current = ensure_token(self.path)
        self.previous = _read_previous(self.previous_path)
        self._stamp = _stamp(self.path, self.previous_path)
        self._broken: tuple[Any, ...] = ()

    def _refresh(self) -> None:
        stamp = _stamp(self.path, self.previous_path)
        if stamp == self._stamp or stamp == self._broken:
            return
        try:
            current, previous = read_private_text(self.path, "API token file"), _read_previous(self.previous_path)
        except KeyFileError as exc:
            self._broken = stamp  # logged once per change of the files; the tokens read last stay in use
            log.error("the API token files changed but cannot be used (the hub keeps the tokens it had): %s", exc)
            return
        self.current, self.previous, self._stamp = current, previous, stamp

    def check(self, given: str, now: int) -> bool:
        """Constant time against both tokens, whichever matches (the previous one only before its end)."""
        self._refresh()
        raw = given.encode()
        previous = self.previous
        ok_current = hmac.compare_digest(raw, self.current.encode())
        ok_previous = hmac.compare_digest(raw, (previous.token if previous else self.current).encode())
        return ok_current or (ok_previous and previous is not None and now < previous.until)


def rotate_token(data: Path, overlap_s: float, now: int) -> PreviousToken:
    """`fleetflow hub rotate-token`: a new api.token; the old one stays accepted for `overlap_s`. A rotation during
    the overlap of an earlier one ends that overlap: only one previous token is ever accepted."""
    data = Path(data)
    path = data / TOKEN_FILE
    if not path.exists():
        raise RotationError(f"{data} holds no {TOKEN_FILE} (is it a hub data directory?)")
    with locked(data):
        old = read_private_text(path, "API token file")
        previous = PreviousToken(old, now + int(overlap_s * 1000))
        write_private(data / PREVIOUS_TOKEN_FILE,
                      json.dumps({"token": previous.token, "until": previous.until}).encode())
        write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
    return previous
