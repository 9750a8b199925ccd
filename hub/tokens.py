"""API tokens with names and roles, and who a bearer token belongs to.

Roles, each allowed what the ones before it are: `viewer` reads (runs, nodes, health, metrics); `operator` also acts
on runs (submit, cancel, fail) and drains nodes; `admin` also manages nodes (accept, reject, revoke, add, delete) and
tokens. The hub's own token, DATA/api.token (hub/keys.py `ApiTokens`, with its rotation overlap), is the admin token
named `admin`; `fleetflow token create NAME --role ROLE` makes the others through the API.

DATA/tokens.json (mode 0600) holds a SHA-256 of each token, never the token: it is 256 random bits, so the hash
cannot be reversed by guessing and a slow KDF would buy nothing. Writes replace the file atomically, fsync'd. A
check compares the hash with every stored one in constant time. The file is re-read when it changes, so a token
removed by hand (the hub stopped or not) is refused at the next request too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from agent.runtime.keys import KeyFileError, read_private_text
from agent.runtime.storage import write_private

from .errors import Conflict, NotFound, Unavailable, Unprocessable
from .keys import TOKEN_FILE

log = logging.getLogger("fleetflow.hub")

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)  # in order: each role may do what the ones before it may
VIEWER: Final[Role] = "viewer"
OPERATOR: Final[Role] = "operator"
ADMIN: Final[Role] = "admin"
ADMIN_NAME: Final = "admin"  # DATA/api.token
TOKENS_FILE: Final = "tokens.json"
_NO_FILE_STAMP: Final = object()  # equal to no stamp: `_broken` when every read so far worked
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def allows(have: Role, need: Role) -> bool:
    return ROLES.index(have) >= ROLES.index(need)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the token's name and its role."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class NamedToken:
    name: str
    role: Role
    digest: bytes  # SHA-256 of the token
    created_at: int
    created_by: str

    def public(self) -> dict[str, Any]:
        """What `token list` shows: never the hash."""
        return {"name": self.name, "role": self.role, "created_at": self.created_at, "created_by": self.created_by}

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "sha256": self.digest.hex(), "created_at": self.created_at,
                "created_by": self.created_by}

    @classmethod
    def from_json(cls, name: str, raw: Any, path: Path) -> NamedToken:
        try:
            role, digest = raw["role"], bytes.fromhex(raw["sha256"])
            token = cls(name, role, digest, int(raw["created_at"]), str(raw["created_by"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"token file {path}: token {name!r} has a missing or bad field {exc}") from None
        if role not in ROLES or len(digest) != 32 or not NAME_PATTERN.fullmatch(name) or name == ADMIN_NAME:
            raise KeyFileError(f"token file {path}: token {name!r} has a bad name, role or sha256")
        return token


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise Unprocessable(f"token name {name[:80]!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
    if name == ADMIN_NAME:
        raise Conflict(f"the token {ADMIN_NAME!r} is {TOKEN_FILE} in the hub's data directory; replace it with "
                       f"fleetflow hub rotate-token")


class TokenStore:
    """The named tokens of DATA/tokens.json, and the admin token through `check_admin` (hub/keys.py `ApiTokens`).

    Writers (create, revoke) run in a worker thread, one at a time; a check reads the mapping in place, which a
    writer replaces whole once the file is durable."""

    def __init__(self, data: Path, check_admin: Callable[[str], bool]) -> None:
        self.path = Path(data) / TOKENS_FILE
        self.check_admin = check_admin
        self._write = threading.Lock()
        self._stamp = self._file_stamp()
        self._broken: Any = _NO_FILE_STAMP  # the stamp of a file that could not be read
        self._unreadable: KeyFileError | None = None  # why the file as it is now cannot be read
        self._tokens: dict[str, NamedToken] = {}
        try:
            self._tokens = self._read()
        except KeyFileError as exc:
            # Refusing every named token is safe, and the admin token still works to put things right.
            self._broken, self._unreadable = self._stamp, exc
            log.error("no named API token is accepted until the token file is fixed: %s", exc)

    def _file_stamp(self) -> Any:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> dict[str, NamedToken]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(read_private_text(self.path, "token file"))
            entries = raw["tokens"]
            if not isinstance(entries, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise KeyFileError(f"token file {self.path}: expected JSON with a 'tokens' object") from None
        return {name: NamedToken.from_json(name, value, self.path) for name, value in entries.items()}

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._broken:
            return  # unreadable as it is now: said once
        if stamp == self._stamp:
            self._unreadable = None  # back to the file last read (a broken edit undone)
            return
        try:
            tokens = self._read()
        except KeyFileError as exc:
            self._broken, self._unreadable = stamp, exc  # said once per change of the file; the tokens read last stay
            log.error("the token file changed but cannot be used (the hub keeps the tokens it had): %s", exc)
            return
        self._tokens, self._stamp, self._unreadable = tokens, stamp, None

    def _refresh_to_write(self) -> None:
        """A writer saves the whole map: from one the file no longer matches, it would drop every token the file
        holds. So nothing is written while the file cannot be read; the tokens in use stay as they are."""
        self._refresh()
        if self._unreadable is not None:
            raise Unavailable(f"{self._unreadable}; fix or remove {self.path} (the admin token still works), then "
                              f"try again")

    def identify(self, given: str) -> Caller | None:
        """The caller a bearer token names, or None. Every stored hash is compared, in constant time each, so the
        time taken says nothing about which one matched or how much of it."""
        if not given:
            return None
        if self.check_admin(given):
            return Caller(ADMIN_NAME, ADMIN)
        self._refresh()
        digest = _digest(given)
        found: NamedToken | None = None
        for token in self._tokens.values():
            if hmac.compare_digest(digest, token.digest):
                found = token
        return None if found is None else Caller(found.name, found.role)

    def listing(self) -> list[dict[str, Any]]:
        self._refresh()
        return [{"name": ADMIN_NAME, "role": ADMIN, "created_at": None, "created_by": None, "file": TOKEN_FILE},
                *(t.public() for t in sorted(self._tokens.values(), key=lambda t: t.name))]

    def create(self, name: str, role: str, by: str, at: int) -> tuple[NamedToken, str]:
        """A new token (returned once, kept only as its hash). Blocking: call it in a worker thread."""
        check_name(name)
        if role not in ROLES:
            raise Unprocessable(f"role {role[:40]!r}: one of {', '.join(ROLES)}")
        secret = secrets.token_urlsafe(32)
        with self._write:
            self._refresh_to_write()
            if name in self._tokens:
                raise Conflict(f"a token named {name!r} exists: revoke it first (fleetflow token revoke {name})")
            token = NamedToken(name, role, _digest(secret), at, by)  # role checked above
            self._save({**self._tokens, name: token})
        return token, secret

    def revoke(self, name: str) -> NamedToken:
        """Remove a token: refused from the next request on. Blocking: call it in a worker thread."""
        check_name(name)
        with self._write:
            self._refresh_to_write()
            token = self._tokens.get(name)
            if token is None:
                raise NotFound(f"no token named {name!r}")
            self._save({k: v for k, v in self._tokens.items() if k != name})
        return token

    def _save(self, tokens: dict[str, NamedToken]) -> None:
        body = {"tokens": {name: t.to_json() for name, t in sorted(tokens.items())}}
        write_private(self.path, json.dumps(body, indent=1).encode() + b"\n")
        self._tokens, self._stamp, self._broken, self._unreadable = tokens, self._file_stamp(), _NO_FILE_STAMP, None
