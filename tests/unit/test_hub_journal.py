"""The journal: durable appends, snapshot + tail equals a full replay, group commit, versioning, kill -9."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub.events import NodeBorn, ReplayMarks, RunSubmitted
from hub.journal import Journal, JournalError
from hub.workflow import workflow_from_data

SPEC = workflow_from_data({"name": "t", "steps": [{"id": "a", "uses": "echo"}]}).model_dump(by_alias=True, mode="json")


def events(n: int, start: int = 0) -> list:
    out: list = [NodeBorn(0, "n1", 1, "p", {}, ("echo",), 4, {}, (), 5.0)] if start == 0 else []
    out += [RunSubmitted(i, f"r{i}", SPEC, {}, None, 10**12) for i in range(start, start + n)]
    return out


def test_snapshot_plus_tail_equals_full_replay(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite", snapshot_every=50)
    journal.append_now(events(60))
    core = journal.load()
    journal.snapshot(core)
    journal.append_now(events(30, start=60) + [ReplayMarks(99, {"n1": {"boot": 1}})])
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    from_snapshot = reopened.load()
    reopened._db.execute("DELETE FROM snapshots")
    replayed = reopened.load()
    assert sorted(from_snapshot.runs) == sorted(replayed.runs) and len(replayed.runs) == 90
    assert from_snapshot.windows == replayed.windows == {"n1": {"boot": 1}}
    assert from_snapshot.queue.keys() == replayed.queue.keys()


def test_a_corrupt_snapshot_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_now(events(5))
    journal._db.execute("INSERT INTO snapshots (seq, format, data) VALUES (6, 1, x'00ff')")
    assert len(journal.load().runs) == 5


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(path)


def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")

    async def many() -> None:
        await asyncio.gather(*(journal.append(events(1, start=i + 1)) for i in range(200)))

    asyncio.run(many())
    assert journal.last_seq == 200 and journal.stats.commits < 200  # grouped
    assert len(journal.load().runs) == 200
    journal.close()


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from hub.journal import Journal
from tests.unit.test_hub_journal import events
j = Journal({path!r})
i = 0
while True:
    j.append_now(events(10, start=1 + i))
    i += 10
    print(i, flush=True)
"""


def test_kill_9_of_a_writer_loses_no_committed_event(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, path=str(path))], stdout=subprocess.PIPE,
                            text=True)
    committed = 0
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while committed < 300 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    core = Journal(path).load()
    assert len(core.runs) >= committed  # everything reported committed is there (perhaps one batch more)


def test_registry_writes_once_per_flush_and_survives_reopen(tmp_path: Path) -> None:
    from hub.registry import EnrollPolicy, Registry

    registry = Registry(tmp_path / "nodes.json")
    auto = EnrollPolicy(auto_accept=True)
    for i in range(50):
        assert registry.request(f"n{i}", bytes([i]) * 32, "rpi4", {}, i, auto).verdict == "accepted"
    assert Registry(tmp_path / "nodes.json").all() == []  # nothing written before the flush
    registry.flush()
    reopened = Registry(tmp_path / "nodes.json")
    assert len(reopened.all()) == 50 and reopened.get("n7")["key"] == (bytes([7]) * 32).hex()  # type: ignore[index]
    assert reopened.request("n7", b"x" * 32, "rpi4", {}, 99, auto).verdict == "taken"
    reopened.set_state("n3", "revoked", 100)  # operator actions are written at once
    assert Registry(tmp_path / "nodes.json").get("n3")["state"] == "revoked"  # type: ignore[index]


def test_replay_marks_are_upserted_and_survive_a_reopen(tmp_path: Path) -> None:
    """A sender's mark is one row, moved by every batch that moves it (boot, top seq, death seen); others are kept."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_now([], {"n1": (1, 5, False), "n2": (3, 9, False)})
    journal.append_now(events(1), {"n1": (1, 12, False)})
    journal.append_now([], {"n1": (2, 1, True)})
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    assert reopened.marks() == {"n1": (2, 1, True), "n2": (3, 9, False)}
    assert reopened._db.execute("SELECT COUNT(*) FROM marks").fetchone()[0] == 2
    reopened.close()
