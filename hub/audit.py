"""The audit log: every operator action, and every refused request, as one signed entry in a hash chain
(IEC 62443-4-2 CR 2.8 auditable events, CR 2.12 non-repudiation).

DATA/audit.log holds JSON lines, appended and fsync'd before the API answers (the entries of requests that come
while one is being written go together in the next append: one fsync for all of them). An entry:

    {"seq": 7, "at": ms, "who": token name, "role": its role, "action": "run.submit", "target": "r-12",
     "params": {...no secrets...}, "from": client address, "status": HTTP status (0: done by the CLI on the data
     directory), "prev": hash of entry 6, "kid": signing key id, "hash": sha256 hex, "sig": Ed25519 hex}

A Sparkplug host's command the hub acts on (hub/sparkplug/bridge.py: a DCMD drain, an NCMD rebirth) is an entry too:
`who` is `sparkplug` or `sparkplug:HOST_ID` (the broker login that may publish commands is its only authentication),
`role` operator, `from` `mqtt:` and the topic it came on, `status` what the same action through the API would answer.

`hash` is SHA-256 of the entry without `hash` and `sig`, as canonical JSON (sorted keys, no spaces); `sig` signs
"fleetflow audit entry v1\\n" + hash with the hub key `kid` names (hub/keys.py). Entry 1 has a `prev` of 64 zeros. So
an entry changed, removed or moved breaks the chain or a hash, and one rewritten whole needs the hub's key.

DATA/audit.head, replaced after each append, names the last entry (seq and hash), signed the same way: a log cut short
at its end no longer matches it. Only a copy of the log kept elsewhere defends against someone holding the hub's
key, or rolling both files back together; ship the log off the machine for that.

Key rotations: `fleetflow hub rotate-key` writes an entry signed by the *next* key that names the current one
(`params.previous_key`). `audit verify` trusts the keys in the data directory (hub.key, and hub.key.next during a
rotation) and, going back through those entries, every key they name; entries signed by a retired key stay valid.

The hub and the CLI both append (the CLI for rotations done on the data directory): each append holds an exclusive
flock of the log while it reads the last entry, writes, fsyncs and replaces the head.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.signing

from agent.runtime.clock import now_ms
from agent.runtime.keys import load_key
from agent.runtime.storage import sync_dir, write_all, write_private
from protocols import FleetflowError, kid_for

from .keys import KEY_FILE, NEXT_KEY_FILE, utc

log = logging.getLogger("fleetflow.hub")

LOG_FILE: Final = "audit.log"
HEAD_FILE: Final = "audit.head"
GENESIS: Final = "0" * 64
ENTRY_DOMAIN: Final = b"fleetflow audit entry v1\n"
HEAD_DOMAIN: Final = b"fleetflow audit head v1\n"
ROTATE_KEY: Final = "hub.rotate-key"
LOCAL_STATUS: Final = 0  # an action the CLI did on the data directory itself: no HTTP answer
MAX_LINE: Final = 1 << 20  # an entry is a few hundred bytes; a longer last line is not ours
# Entries written together at most. A crash between the log's fsync and the new head leaves the head naming the last
# entry of the append before, so `verify` accepts a head up to this many entries behind the log.
MAX_GROUP: Final = 64
SIGNED: Final = ("seq", "at", "who", "role", "action", "target", "params", "from", "status", "prev", "kid")
FIELDS: Final = (*SIGNED, "hash", "sig")


class AuditError(FleetflowError):
    """The audit log cannot be appended to (unreadable, or its last line is not an entry)."""


def canonical(value: Any) -> bytes:
    # ASCII with escapes: any text, even a lone surrogate from a request, encodes, and the bytes hashed are the same
    # on every platform.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: entry[k] for k in SIGNED})).hexdigest()


def _head_message(seq: int, digest: str) -> bytes:
    return HEAD_DOMAIN + seq.to_bytes(8, "big") + bytes.fromhex(digest)


@dataclass(frozen=True, slots=True)
class Record:
    """One action as it happened, before it is chained and signed. `params` never holds a secret."""

    at: int
    who: str
    role: str
    action: str
    target: str
    source: str  # "from": the client's address, or local:HOST for the CLI on the data directory
    status: int
    params: Mapping[str, Any] = field(default_factory=dict)


def seal(record: Record, seq: int, prev: str, key: nacl.signing.SigningKey) -> dict[str, Any]:
    """The entry `record` becomes at `seq` after the entry hashed `prev`, signed with `key`."""
    entry: dict[str, Any] = {"seq": seq, "at": record.at, "who": record.who, "role": record.role,
                             "action": record.action, "target": record.target, "params": dict(record.params),
                             "from": record.source, "status": record.status, "prev": prev,
                             "kid": kid_for(bytes(key.verify_key)).hex()}
    entry["hash"] = entry_hash(entry)
    entry["sig"] = key.sign(ENTRY_DOMAIN + bytes.fromhex(entry["hash"])).signature.hex()
    return entry


def _last_line(fd: int) -> tuple[int, bytes]:
    """(where the last complete line ends, that line): read backwards from the end of the file, at most MAX_LINE."""
    size = os.fstat(fd).st_size
    pos, buf = size, b""
    while pos > 0 and size - pos <= MAX_LINE:
        step = min(4096, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        end = buf.rfind(b"\n")
        if end == -1:
            continue
        start = buf.rfind(b"\n", 0, end)
        if start != -1 or pos == 0:
            return pos + end + 1, buf[start + 1:end]
    if pos == 0:
        return 0, b""  # no complete line: nothing, or one torn write
    raise AuditError(f"the last line of the audit log is over {MAX_LINE} bytes: not an audit entry")


class AuditLog:
    """Appends entries to DATA/audit.log, each signed with the key `key()` returns when it is written (the hub's
    current key: a rotation switches it)."""

    def __init__(self, data: Path, key: Callable[[], nacl.signing.SigningKey]) -> None:
        self.data = Path(data)
        self.path = self.data / LOG_FILE
        self.key = key
        self._waiting: list[tuple[Record, asyncio.Future[dict[str, Any]]]] = []
        self._writer: asyncio.Task[None] | None = None

    def append(self, record: Record) -> dict[str, Any]:
        """Write `record` as the next entry, durably, and move the head to it. Blocking (flock, fsync)."""
        written = self.append_all([record])[0]
        if isinstance(written, Exception):
            raise written
        return written

    def append_all(self, records: Sequence[Record]) -> list[dict[str, Any] | Exception]:
        """Write `records` as the next entries, in order, durably (one fsync of the log), then move the head to the
        last of them. Blocking (flock, fsync). In each record's place: its entry, or why it has none (a parameter JSON
        cannot hold: that record alone is left out). An error writing the log raises, and what it wrote is taken
        back: none of these entries is on record, and none is acknowledged. An error writing the head only logs: the
        entries are on record, and `verify` accepts a head up to MAX_GROUP entries behind (as after a crash)."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            end, last = _last_line(fd)
            if os.fstat(fd).st_size > end:
                # A write cut short by a crash: never acknowledged (fsync had not returned), never chained to.
                log.warning("audit log %s: dropping a torn last line (%d bytes) left by a crash", self.path,
                            os.fstat(fd).st_size - end)
                os.ftruncate(fd, end)
            seq, prev = 0, GENESIS
            if last:
                try:
                    previous = json.loads(last)
                    seq, prev = int(previous["seq"]), str(previous["hash"])
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"the last line of {self.path} is not an audit entry; run fleetflow audit "
                                     f"verify, and move the log aside to start a new one") from None
            key = self.key()
            out: list[dict[str, Any] | Exception] = []
            lines = []
            for record in records:
                try:
                    entry = seal(record, seq + 1, prev, key)
                    lines.append(canonical(entry) + b"\n")
                except (TypeError, ValueError) as exc:
                    out.append(exc)
                    continue
                seq, prev = entry["seq"], entry["hash"]
                out.append(entry)
            if not lines:
                return out
            try:
                write_all(fd, b"".join(lines), self.path)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
            if created:
                sync_dir(self.data)
            head = {"seq": seq, "hash": prev, "kid": kid_for(bytes(key.verify_key)).hex(),
                    "sig": key.sign(_head_message(seq, prev)).signature.hex()}
            try:
                write_private(self.data / HEAD_FILE, json.dumps(head).encode() + b"\n")
            except OSError as exc:
                # The entries are on record (the log's fsync returned): their requests are answered as done. The head
                # stays where it was, as after a crash at this point, and the next append writes a new one.
                log.error("audit log %s: entries up to seq %d are written, but %s could not be replaced (%s); the "
                          "next append replaces it", self.path, seq, HEAD_FILE, exc)
        finally:
            os.close(fd)  # releases the lock
        return out

    async def write(self, record: Record) -> dict[str, Any]:
        """`append` from the event loop, in a worker thread, answered once the entry is durable. The appends asked
        for while one is being written go together in the next, up to MAX_GROUP (one fsync of the log and one new
        head for all: a busy API's requests no longer queue three fsyncs each behind the journal's)."""
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((record, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting(), name="audit log writer")
        return await done

    async def _write_waiting(self) -> None:
        group: list[tuple[Record, asyncio.Future[dict[str, Any]]]] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                try:
                    results = await asyncio.to_thread(self.append_all, [record for record, _ in group])
                except Exception as exc:  # nothing of the group is on record: each request hears why
                    results = [exc] * len(group)
                for (_, done), result in zip(group, results):
                    if done.done():  # its request was cancelled (a client gone): the entry stands all the same
                        continue
                    if isinstance(result, Exception):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            for _, done in [*group, *self._waiting]:  # cancelled (the hub stops): nobody waits forever
                if not done.done():
                    done.cancel()
            self._waiting = []


def local_record(action: str, target: str, params: Mapping[str, Any]) -> Record:
    """An action done by the CLI on the data directory: whoever can write there is its admin."""
    return Record(now_ms(), f"local:{getpass.getuser()}", "admin", action, target, f"local:{socket.gethostname()}",
                  LOCAL_STATUS, params)


def append_local(data: Path, action: str, target: str, params: Mapping[str, Any],
                 key: nacl.signing.SigningKey | None = None) -> dict[str, Any]:
    """Audit a CLI action on the data directory, signed with `key` or else the hub's current key (hub.key)."""
    signer = key if key is not None else load_key(Path(data) / KEY_FILE)
    return AuditLog(Path(data), lambda: signer).append(local_record(action, target, params))


class RefusalBudget:
    """Refused requests are audited, but one address must not fill the disk or keep the log busy with them: each
    address gets `per_minute` entries a minute; the refusals beyond are counted into its next entry (`params.
    unaudited`). At most `addresses` are tracked; past that, new addresses share one budget."""

    def __init__(self, per_minute: int = 30, addresses: int = 1024) -> None:
        self.per_minute, self.addresses = per_minute, addresses
        self._windows: dict[str, list[int]] = {}  # address -> [window start ms, written, skipped]

    def take(self, source: str, now: int) -> int | None:
        """None: do not write this one. Else write it, with this many refusals left unwritten before it."""
        window = self._windows.get(source)
        if window is None:
            if len(self._windows) >= self.addresses:
                self._windows = {k: w for k, w in self._windows.items() if w[2] or now - w[0] < 60_000}
            if len(self._windows) >= self.addresses:
                source = "*"
            window = self._windows.setdefault(source, [now, 0, 0])
        if now - window[0] >= 60_000:
            window[0], window[1] = now, 0
        if window[1] >= self.per_minute:
            if window[2] == 0:
                log.warning("refused API requests from %s: over %d a minute, the rest are counted in its next audit "
                            "entry", source, self.per_minute)
            window[2] += 1
            return None
        window[1] += 1
        skipped, window[2] = window[2], 0
        return skipped


# -- reading and verifying ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    entries: int
    message: str  # one line: the summary, or the first bad entry and why


def read_entries(data: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed line or None when it is not JSON) for each line of the log, streamed."""
    path = Path(data) / LOG_FILE
    if not path.exists():
        return
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                yield number, json.loads(raw)
            except ValueError:
                yield number, None


def _problem(entry: Any) -> str | None:
    """Why a parsed line is not an entry (fields, types), or None."""
    if not isinstance(entry, dict):
        return "not an audit entry (not a JSON object)"
    missing = [k for k in FIELDS if k not in entry]
    if missing:
        return f"not an audit entry (missing {', '.join(missing)})"
    if not isinstance(entry["seq"], int) or not all(isinstance(entry[k], str) for k in ("hash", "sig", "kid", "prev")):
        return "not an audit entry (seq, hash, sig, kid or prev of the wrong type)"
    return None


def _signed(public_key: bytes, message: bytes, sig: str) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, bytes.fromhex(sig))
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def trust_roots(data: Path) -> dict[str, bytes]:
    """kid -> public key of the keys in the data directory: hub.key, and hub.key.next during a rotation. Loaded from
    the private key files (mode 0600) rather than the .pub files beside them. Raises KeyFileError."""
    keys = [load_key(Path(data) / KEY_FILE)]
    if (Path(data) / NEXT_KEY_FILE).exists():
        keys.append(load_key(Path(data) / NEXT_KEY_FILE))
    return {kid_for(bytes(k.verify_key)).hex(): bytes(k.verify_key) for k in keys}


def vouched_keys(data: Path, roots: Mapping[str, bytes]) -> dict[str, bytes]:
    """The roots, and every key a rotation entry signed by a trusted key names as the one before it."""
    trusted = dict(roots)
    rotations: list[tuple[str, str, str, bytes]] = []  # (signer kid, sig, hash, the key it names as previous)
    for _, entry in read_entries(data):
        if _problem(entry) is not None or entry["action"] != ROTATE_KEY or entry_hash(entry) != entry["hash"]:
            continue
        try:
            previous = bytes.fromhex(str(entry["params"]["previous_key"]))
        except (KeyError, TypeError, ValueError):
            continue
        if len(previous) == 32:
            rotations.append((entry["kid"], entry["sig"], entry["hash"], previous))
    grew = True
    while grew:  # a chain of rotations: each round trusts the keys one rotation further back
        grew = False
        for kid, sig, digest, previous in rotations:
            key_id = kid_for(previous).hex()
            if (key_id not in trusted and kid in trusted
                    and _signed(trusted[kid], ENTRY_DOMAIN + bytes.fromhex(digest), sig)):
                trusted[key_id] = previous
                grew = True
    return trusted


def verify(data: Path, roots: Mapping[str, bytes] | None = None) -> Verdict:
    """Check every entry (fields, hash, signature by a trusted key, seq order, chain) and the head; the verdict names
    the first bad entry. Raises KeyFileError when the data directory's keys cannot be read."""
    data = Path(data)
    trusted = vouched_keys(data, trust_roots(data) if roots is None else roots)
    seqs = {e["seq"] for _, e in read_entries(data) if _problem(e) is None}
    expected, prev = 1, GENESIS
    recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=MAX_GROUP + 1)  # (seq, hash) at the end
    kids: list[str] = []
    last_at: int | None = None
    for number, entry in read_entries(data):
        where = f"line {number}" + (f" (seq {entry['seq']})" if isinstance(entry, dict) and "seq" in entry else "")
        problem = _problem(entry)
        if problem is None:
            problem = _entry_problem(entry, trusted, expected, prev, seqs)
        if problem is not None:
            return Verdict(False, number - 1, f"{where}: {problem}")
        expected, prev = entry["seq"] + 1, entry["hash"]
        recent.append((entry["seq"], prev))
        if entry["kid"] not in kids:
            kids.append(entry["kid"])
        last_at = entry["at"] if isinstance(entry["at"], int) else last_at
    count = expected - 1
    problem = _head_problem(data, count, dict(recent), trusted)
    if problem is not None:
        return Verdict(False, count, problem)
    if count == 0:
        return Verdict(True, 0, f"audit log {data / LOG_FILE}: no entries yet")
    last = f"; last entry at {utc(last_at)}" if last_at is not None else ""
    return Verdict(True, count, f"audit log ok: {count} entries (seq 1-{count}), hash chain and signatures verified, "
                                f"signed by kid {', '.join(kids)}{last}")


def _entry_problem(entry: dict[str, Any], trusted: Mapping[str, bytes], expected: int, prev: str,
                   seqs: set[int]) -> str | None:
    if entry_hash(entry) != entry["hash"]:
        return "changed: its content does not match its hash"
    key = trusted.get(entry["kid"])
    if key is None:
        return (f"bad signature: signed by kid {entry['kid'][:16]}, which is neither the hub's key nor one a key "
                f"rotation entry vouches for")
    if not _signed(key, ENTRY_DOMAIN + bytes.fromhex(entry["hash"]), entry["sig"]):
        return f"bad signature: it does not verify with the hub key kid {entry['kid']}"
    seq = entry["seq"]
    if seq < expected:
        return f"reordered: seq {seq} comes after seq {expected - 1}"
    if seq > expected:
        if expected in seqs:
            return f"reordered: seq {seq} stands where seq {expected} belongs"
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}-{seq - 1}"
        return f"removed: {missing} missing before it"
    if entry["prev"] != prev:
        return f"changed: its prev does not match the hash of seq {seq - 1} (an entry before it was replaced)"
    return None


def _head_problem(data: Path, count: int, hashes: Mapping[int, str], trusted: Mapping[str, bytes]) -> str | None:
    """The head names the last entry written (or, after a crash between the log's fsync and the new head, the last
    of the append before: at most MAX_GROUP entries back)."""
    path = data / HEAD_FILE
    if not path.exists():
        return None if count == 0 else f"removed: {HEAD_FILE} is missing, so the end of the log cannot be checked"
    try:
        head = json.loads(path.read_text())
        seq, digest, kid, sig = int(head["seq"]), str(head["hash"]), str(head["kid"]), str(head["sig"])
        message = _head_message(seq, digest)
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return f"{HEAD_FILE}: not an audit head"
    if kid not in trusted or not _signed(trusted[kid], message, sig):
        return f"{HEAD_FILE}: bad signature (kid {kid[:16]})"
    if seq > count:
        return (f"removed: the log ends at seq {count} but {HEAD_FILE} says seq {seq} was written "
                f"(entries cut off its end)")
    if seq < count - MAX_GROUP:
        return f"changed: {HEAD_FILE} names seq {seq} but the log goes on to seq {count} (the head was rolled back)"
    if hashes.get(seq) != digest:
        return f"changed: {HEAD_FILE} names seq {seq} with another hash than the log's (the log was replaced)"
    return None
