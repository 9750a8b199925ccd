"""The event journal: SQLite in WAL mode, synchronous=FULL, appends grouped into one transaction per batch on a
writer thread (group commit: one fsync for every event that arrived meanwhile), and snapshots every N events.

Restart = the latest snapshot + the events after it. The replay high-water mark of every sender (boot, highest seq,
death certificate seen) is kept in a table of its own, upserted in the same transaction as the batch whose messages
moved it: the marks are durable before anything those messages caused is acted on or acknowledged, and they cost
one row per sender, not a journal that grows with every heartbeat. Snapshots are a cache, stored as CBOR of the core's
plain-data form (hub/snapshot.py), never a pickle: one of another format or version, or one that cannot be read, is
skipped (logged once per load) and the journal falls back to an older snapshot or a replay from the first event. The
schema is versioned; a journal of an unknown version is refused.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cbor2

from .events import Event, JournalError, SnapshotError, from_record, to_record
from .snapshot import VERSION as SNAPSHOT_FORMAT
from .state import Core

__all__ = ["CommitStats", "Journal", "JournalError", "Mark", "SnapshotError"]

log = logging.getLogger("fleetflow.hub.journal")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY, format INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS marks (sender TEXT PRIMARY KEY, boot INTEGER NOT NULL, top INTEGER NOT NULL,
                                  death_seen INTEGER NOT NULL);
"""
Mark = tuple[int, int, bool]  # (boot, highest seq accepted, death certificate seen)


def _encode(event: Event) -> tuple[int, str, bytes]:
    kind, data = to_record(event)
    return event.at, kind, cbor2.dumps(data)


@dataclass
class CommitStats:
    commits: int = 0
    events: int = 0
    last_seconds: float = 0.0


class Journal:
    def __init__(self, path: Path, snapshot_every: int = 10_000, inline: bool = False) -> None:
        self.path = Path(path)
        self.snapshot_every = snapshot_every
        # `inline`: `append` commits on the calling thread, without a writer thread (and without group commit). For
        # the deterministic simulation (sim/dst.py), where a thread's timing would make a run unrepeatable.
        self.inline = inline
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise JournalError(f"journal {self.path} has schema version {version}; this hub reads {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        self.last_seq = int(row[0])
        self._since_snapshot = 0
        self.stats = CommitStats()
        self._queue: queue.Queue[tuple[list[Event], dict[str, Mark], asyncio.Future[None],
                                       asyncio.AbstractEventLoop] | None] = queue.Queue()
        self._writer: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------------------------

    def events(self, after: int = 0) -> Iterator[tuple[int, Event]]:
        cursor = self._db.execute("SELECT seq, kind, data FROM events WHERE seq > ? ORDER BY seq", (after,))
        for seq, kind, data in cursor:
            yield seq, from_record(kind, cbor2.loads(data))

    def marks(self) -> dict[str, Mark]:
        return {sender: (int(boot), int(top), bool(death)) for sender, boot, top, death in
                self._db.execute("SELECT sender, boot, top, death_seen FROM marks")}

    def load(self) -> Core:
        """The latest usable snapshot plus the events after it."""
        core, after, skipped = None, 0, []
        for seq, fmt, data in self._db.execute("SELECT seq, format, data FROM snapshots ORDER BY seq DESC LIMIT 3"):
            try:
                if fmt != SNAPSHOT_FORMAT:  # 1 was a pickle: its bytes are never read
                    raise SnapshotError(f"format {fmt}: this hub reads format {SNAPSHOT_FORMAT}")
                core, after = Core.from_snapshot(cbor2.loads(data)), seq
                break
            except Exception as exc:  # a snapshot is a cache: whatever it raises, an older one or the replay serves
                reason = str(exc) if isinstance(exc, SnapshotError) else f"{type(exc).__name__}: {exc}"
                skipped.append(f"at event {seq}: {reason}")
        if skipped:  # only a cache: an older snapshot or a replay from the first event gives the same state
            log.warning("journal %s: skipped %d snapshot(s) (%s); %s", self.path, len(skipped), "; ".join(skipped),
                        f"loading the one at event {after}" if core is not None else "replaying every event")
        core = core or Core()
        for _, event in self.events(after):
            core.apply(event)
        return core

    # -- writing -------------------------------------------------------------------------------------------------

    def append_now(self, events: Sequence[Event], marks: dict[str, Mark] | None = None) -> None:
        """Synchronous durable append (tests, tools, benchmarks)."""
        self._write(events, marks or {})

    def _write(self, events: Sequence[Event], marks: dict[str, Mark]) -> None:
        started = time.perf_counter()
        rows = [(self.last_seq + i + 1, *_encode(e)) for i, e in enumerate(events)]
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT INTO events (seq, at, kind, data) VALUES (?, ?, ?, ?)", rows)
            # An upsert updates the row in place (REPLACE deletes and inserts it: 2.5 against 2.0 us a mark, and the
            # hub writes one per sender per batch)
            self._db.executemany("INSERT INTO marks (sender, boot, top, death_seen) VALUES (?, ?, ?, ?) ON CONFLICT"
                                 "(sender) DO UPDATE SET boot = excluded.boot, top = excluded.top, "
                                 "death_seen = excluded.death_seen",
                                 [(sender, *mark) for sender, mark in marks.items()])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.last_seq += len(rows)
        self._since_snapshot += len(rows)
        self.stats.commits += 1
        self.stats.events += len(rows)
        self.stats.last_seconds = time.perf_counter() - started

    async def append(self, events: list[Event], marks: dict[str, Mark] | None = None) -> None:
        """Durable append (events, and replay marks that moved) from the event loop; concurrent callers share one
        commit."""
        if not events and not marks:
            return
        if self.inline:
            self._write(events, marks or {})
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
            self._writer.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((events, marks or {}, done, loop))
        await done

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:  # group commit: take everything already waiting
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            marks: dict[str, Mark] = {}
            for _, more_marks, _, _ in batch:
                marks.update(more_marks)  # later batches carry later marks
            try:
                self._write([e for events, _, _, _ in batch for e in events], marks)
                error = None
            except Exception as exc:
                error = exc
            for _, _, future, loop in batch:
                loop.call_soon_threadsafe(_settle, future, error)

    def snapshot_due(self) -> bool:
        return self._since_snapshot >= self.snapshot_every

    def snapshot(self, core: Core) -> None:
        """Store `core`, which must reflect exactly the events up to `last_seq`."""
        data = cbor2.dumps(core.to_snapshot())
        self._db.execute("INSERT OR REPLACE INTO snapshots (seq, format, data) VALUES (?, ?, ?)",
                         (self.last_seq, SNAPSHOT_FORMAT, data))
        self._db.execute("DELETE FROM snapshots WHERE seq < (SELECT MIN(seq) FROM "
                         "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT 2))")
        self._since_snapshot = 0

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)
        self._db.close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
