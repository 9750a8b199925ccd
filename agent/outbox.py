"""The disk outbox: step events and results wait here until the hub acknowledges them.

SQLite (standard library) in WAL mode with synchronous=NORMAL: a committed entry survives kill -9 at once, and
`sync()` (one fsync of the WAL) makes everything committed so far survive power loss too. The flusher calls it once
per batch before publishing, so durability costs one fsync per batch instead of one per entry (group commit). Bounded in bytes: step events and results are never dropped (when the outbox is over its high-water
mark the agent refuses new assignments instead); telemetry is stored only while offline and is shed oldest-first
when space runs out, with a durable count of what was shed. Running attempts are recorded here too, in the same
transaction as their result, so after a crash the next start knows which attempts were interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from protocols import Malformed, cbor

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    eid     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL,          -- 'evt' (kept until acked) or 'tel' (sheddable, not acked)
    type    TEXT NOT NULL,          -- message type: step, result, tel
    body    BLOB NOT NULL,          -- CBOR of the body's wire map, signed again when sent
    size    INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    attempt TEXT PRIMARY KEY,
    run     TEXT NOT NULL,
    step    TEXT NOT NULL,
    fence   INTEGER NOT NULL,
    pgid    INTEGER,                -- process group of a shell step, killed after a crash
    at_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fences (
    run     TEXT NOT NULL,
    step    TEXT NOT NULL,
    fence   INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (run, step)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
MAX_FENCES = 10_000  # (run, step) fences remembered; older ones are pruned


@dataclass(frozen=True, slots=True)
class Entry:
    eid: int
    kind: str
    type: str
    body: dict[str, Any]
    at_ms: int


@dataclass(frozen=True, slots=True)
class RunningAttempt:
    attempt: str
    run: str
    step: str
    fence: int
    pgid: int | None


class Outbox:
    def __init__(self, path: Path, max_bytes: int = 16 * 1024 * 1024, reserve_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        # Assignments are refused once fewer than `reserve_bytes` remain, so the events of steps already accepted
        # always have room (they are never dropped).
        self.reserve_bytes = min(max_bytes // 2, reserve_bytes if reserve_bytes is not None else max_bytes // 8)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(f"outbox {self.path} has schema {version}; this agent reads {SCHEMA_VERSION}")
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM entries").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- size and admission ----------------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def depth(self) -> int:
        return self._count

    def unacknowledged(self) -> int:
        """Step events and results still waiting for the hub's ack (telemetry is not counted: it may be shed)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries WHERE kind = 'evt'").fetchone()[0])

    def has_room_for_new_work(self) -> bool:
        return self._bytes + self.reserve_bytes <= self.max_bytes

    # -- entries ---------------------------------------------------------------------------------------------------

    def add_event(self, type_name: str, body: dict[str, Any], at_ms: int, *,
                  finish_attempt: str | None = None) -> int:
        """Store a step event or result (never dropped). `finish_attempt` is removed from the running attempts in
        the same transaction, so a crash leaves either both or neither."""
        data = cbor.dumps(body)
        with self._transaction():
            if self._bytes + len(data) > self.max_bytes:
                self._shed_telemetry(self._bytes + len(data) - self.max_bytes)
            eid = self._db.execute("INSERT INTO entries (kind, type, body, size, at_ms) VALUES ('evt', ?, ?, ?, ?)",
                                   (type_name, data, len(data), at_ms)).lastrowid
            if finish_attempt is not None:
                self._db.execute("DELETE FROM attempts WHERE attempt = ?", (finish_attempt,))
        self._bytes += len(data)
        self._count += 1
        return int(eid)  # type: ignore[arg-type]

    def add_telemetry(self, body: dict[str, Any], at_ms: int) -> bool:
        """Keep a telemetry sample taken while offline; sheds the oldest samples when full. False if no room at all."""
        data = cbor.dumps(body)
        with self._transaction():
            # Telemetry may use the space above the reserve only: events keep their headroom.
            limit = self.max_bytes - self.reserve_bytes
            if self._bytes + len(data) > limit:
                self._shed_telemetry(self._bytes + len(data) - limit)
            if self._bytes + len(data) > limit:
                self._bump("shed", 1)
                return False
            self._db.execute("INSERT INTO entries (kind, type, body, size, at_ms) VALUES ('tel', 'tel', ?, ?, ?)",
                             (data, len(data), at_ms))
        self._bytes += len(data)
        self._count += 1
        return True

    def _shed_telemetry(self, need: int) -> None:
        freed = shed = 0
        for eid, size in self._db.execute("SELECT eid, size FROM entries WHERE kind = 'tel' ORDER BY eid").fetchall():
            if freed >= need:
                break
            self._db.execute("DELETE FROM entries WHERE eid = ?", (eid,))
            freed += size
            shed += 1
        if shed:
            self._bump("shed", shed)
            self._bytes -= freed
            self._count -= shed

    def _bump(self, name: str, by: int) -> None:
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, after_eid: int = 0, limit: int = 500) -> list[Entry]:
        """Entries after `after_eid`, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT eid, kind, type, body, at_ms FROM entries WHERE eid > ? ORDER BY eid LIMIT ?",
                                    (after_eid, limit)).fetchall()
        return [Entry(r[0], r[1], r[2], cbor.loads(r[3], "outbox entry"), r[4]) for r in rows]

    def remove(self, eids: list[int] | tuple[int, ...]) -> int:
        """Delete acknowledged (or sent telemetry) entries. Unknown eids are ignored: acks may repeat."""
        if not eids:
            return 0
        removed = freed = 0
        with self._transaction():
            for eid in eids:
                row = self._db.execute("SELECT size FROM entries WHERE eid = ?", (eid,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM entries WHERE eid = ?", (eid,))
                    removed += 1
                    freed += row[0]
        self._bytes -= freed
        self._count -= removed
        return removed

    # -- running attempts and fences -------------------------------------------------------------------------------

    def start_attempt(self, attempt: RunningAttempt, at_ms: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO attempts (attempt, run, step, fence, pgid, at_ms) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (attempt.attempt, attempt.run, attempt.step, attempt.fence, attempt.pgid, at_ms))

    def set_pgid(self, attempt: str, pgid: int | None) -> None:
        with self._lock:
            self._db.execute("UPDATE attempts SET pgid = ? WHERE attempt = ?", (pgid, attempt))

    def running_attempts(self) -> list[RunningAttempt]:
        rows = self._db.execute("SELECT attempt, run, step, fence, pgid FROM attempts ORDER BY at_ms").fetchall()
        return [RunningAttempt(*row) for row in rows]

    def fence(self, run: str, step: str) -> int:
        row = self._db.execute("SELECT fence FROM fences WHERE run = ? AND step = ?", (run, step)).fetchone()
        return int(row[0]) if row else -1

    def raise_fence(self, run: str, step: str, fence: int, at_ms: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO fences (run, step, fence, at_ms) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(run, step) DO UPDATE SET fence = MAX(fence, excluded.fence), "
                             "at_ms = excluded.at_ms", (run, step, fence, at_ms))
            if self._db.total_changes % 1000 == 0:
                self._db.execute("DELETE FROM fences WHERE rowid IN (SELECT rowid FROM fences ORDER BY at_ms DESC "
                                 "LIMIT -1 OFFSET ?)", (MAX_FENCES,))

    def sync(self) -> None:
        """Make every committed entry durable against power loss (fsync of the WAL file)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def save_state(self, values: dict[str, Any]) -> None:
        """Small durable values that change often (the hub's replay window), written in one transaction: cheaper
        here than in TinyDB. Each value goes through the codec that reads it back."""
        rows = [(name, cbor.dumps(value)) for name, value in values.items()]
        for name, data in rows:
            cbor.loads(data, f"outbox state {name}")  # what we cannot read back we must not write
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", rows)

    def load_state(self, name: str, *, legacy_tags: bool = False) -> Any:
        """The value saved under `name`, or None. Raises `Malformed` when the row cannot be read. `legacy_tags`
        also reads a row an earlier version wrote with CBOR tags (the replay bitmap as a bignum, tag 2): it is our
        own write, so the plain decoder may read it once, and the caller saves it again in the current form."""
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        try:
            return cbor.loads(row[0], f"outbox state {name}")
        except Malformed:
            if not legacy_tags:
                raise
        try:
            return cbor2.loads(row[0])
        except Exception as exc:  # corrupt beyond the legacy form too: the caller recovers
            raise Malformed(f"outbox state {name}: unreadable ({type(exc).__name__})") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()
