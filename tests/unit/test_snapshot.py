"""Snapshots: the core to and from versioned plain data (hub/snapshot.py), and the journal storing them as CBOR,
never as a pickle: a snapshot it cannot use is skipped and the events are replayed instead."""

from __future__ import annotations

import logging
import pickle
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from hub.events import (ActionTaken, Event, HealthChanged, HubLoadChanged, NodeConflict, NodeFailed, ReplayMarks,
                        RunSubmitted, StepReported)
from hub.health import Breaker, Policy
from hub.journal import Journal, JournalError, SnapshotError
from hub.snapshot import VERSION
from hub.state import Core, SendAssign
from tests.unit.test_hub_core import Driver, spec

POLICY = Policy(breaker=Breaker(failures=2, window=600, cooldown=3600, successes=1))
PLAIN = (dict, list, str, int, float, bool, type(None))


def busy(monkeypatch: pytest.MonkeyPatch) -> Driver:
    """A core after a journal with something of everything a snapshot must carry: archived and finished runs, a
    run compensating, a for_each half done, retries, a failed node, an open breaker, a migration, a conflict mark,
    a throttled and draining node, health, overload and replay windows."""
    monkeypatch.setattr("hub.runs.RETAIN_FINISHED", 3)
    d = Driver()
    d.silent = set()
    d.core.policy = POLICY
    for node in ("g1", "g2"):
        d.node(node, labels={"class": "gw"}, slots=4)
    d.node("n3", slots=4)
    for i in range(6):
        d.submit(f"done{i}", spec({"id": "a", "uses": "echo"}))
    for cmd in d.tick():
        d.finish(cmd, output={"i": cmd.run})
    d.submit("saga", spec({"id": "a", "uses": "echo", "compensate": {"uses": "echo", "with": {"undo": 1}}},
                          {"id": "a2", "uses": "echo", "needs": ["a"], "compensate": {"uses": "echo"}},
                          {"id": "b", "uses": "fail", "needs": ["a2"], "retry": {"max_attempts": 1}}))
    d.submit("fan", spec({"id": "up", "uses": "echo", "for_each": {"labels": {"class": "gw"}}},
                         {"id": "after", "uses": "echo", "needs": ["up"]}))
    d.submit("move", spec({"id": "m", "uses": "sleep", "migratable": True,
                           "placement": {"selector": {"nodes": ["g2"]}}}))
    d.submit("retry", spec({"id": "r", "uses": "fail", "retry": {"max_attempts": 3, "initial": 30}}))
    d.submit("later", spec({"id": "x", "uses": "echo", "placement": {"selector": {"labels": {"site": "none"}}}}))
    sent = {(c.run, c.step): c for c in d.tick() if isinstance(c, SendAssign)}
    d.finish(sent[("saga", "a")])
    d.finish(sent[("fan", "up.g1")], output={"v": 1})
    d.feed(StepReported(d.now, "g2", sent[("fan", "up.g2")].attempt, sent[("fan", "up.g2")].fence, "accepted"))
    d.feed(StepReported(d.now, "g2", sent[("move", "m")].attempt, sent[("move", "m")].fence, "started"))
    d.finish(sent[("retry", "r")], ok=False)
    for step in ("a2", "b"):
        for cmd in d.tick():
            if isinstance(cmd, SendAssign) and cmd.run == "saga":
                d.finish(cmd, ok=step == "a2")  # then b fails: the saga's compensations are queued
    d.node("n4", slots=2)
    d.submit("orphan", spec({"id": "o", "uses": "sleep", "placement": {"selector": {"nodes": ["n4"]}}}))
    d.tick()
    d.feed(NodeFailed(d.now, "n4", "test"))
    for i in range(2):  # two failures on n3 open its breaker
        d.submit(f"bad{i}", spec({"id": "f", "uses": "fail", "retry": {"max_attempts": 1},
                                  "placement": {"selector": {"nodes": ["n3"]}}}))
    for cmd in d.tick():
        if isinstance(cmd, SendAssign) and cmd.run.startswith("bad"):
            d.finish(cmd, ok=False)
    d.tick()
    d.feed(ActionTaken(d.now, "g2", "migrate", "temp 95 over 85"))
    d.feed(ActionTaken(d.now, "g1", "throttle", "temp 80 over 75"))
    d.feed(ActionTaken(d.now, "g1", "drain", "unhealthy"))
    d.feed(HealthChanged(d.now, "g1", "degraded", "temp", 80.0, 75.0, 30.0, "temp 80 over 75 for 30 s"))
    d.feed(NodeConflict(d.now, "g1", 3, 4, "a second device signs as g1"))
    d.feed(ReplayMarks(d.now, {"g1": {"boot": 4, "top": 17, "bitmap": 2**200 + 5}}))
    d.feed(HubLoadChanged(d.now, True, "event-loop lag"))
    d.tick()
    core = d.core
    assert core.archived and core.finished and core.runs["saga"].state == "compensating"
    assert core.runs["saga"].compensations == ["undo-a2", "undo-a"]
    assert core.nodes["n4"].state == "failed" and core.nodes["n3"].breaker == "open"
    assert core.runs["move"].migrations == 1 and core.nodes["g1"].conflict is not None
    assert core.runs["fan"].steps["up"].state == "running" and core.queue
    return d


def specs(core: Core) -> dict[tuple[str, str], Any]:
    return {(run.id, step.id): step.spec for run in core.runs.values() for step in run.steps.values()}


def plain_only(value: Any, where: str = "snapshot") -> None:
    """Nothing but plain data: no enums, tuples, sets or objects (exact types, not subclasses)."""
    assert type(value) in PLAIN, f"{where}: {type(value).__name__}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            plain_only(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            plain_only(item, f"{where}[{i}]")


def test_a_round_trip_gives_the_same_core_and_the_same_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    d = busy(monkeypatch)
    data = d.core.to_snapshot()
    assert data["version"] == VERSION
    plain_only(data)
    restored = Core.from_snapshot(cbor2.loads(cbor2.dumps(data)), POLICY)
    assert restored.to_snapshot() == data
    assert specs(restored) == specs(d.core)  # the steps the core made up (instances, compensations) rebuilt alike
    now = d.now
    for step in (100, 5_000, 40_000, 4_000_000):  # retries, unanswered, timeouts, the breaker's cooldown, deadlines
        now += step
        expected = d.core.decide(now)
        assert restored.decide(now) == expected
        for decision in expected:
            assert restored.apply(decision) == d.core.apply(decision)
        assert restored.to_snapshot() == d.core.to_snapshot()


@pytest.mark.parametrize("version", [1, 99, None])
def test_a_snapshot_of_another_version_is_refused(version: int | None) -> None:
    data = {**Core().to_snapshot(), "version": version}
    with pytest.raises(SnapshotError, match=f"snapshot version {version!r}: this hub reads version {VERSION}"):
        Core.from_snapshot(data)
    assert issubclass(SnapshotError, JournalError)


def test_a_malformed_snapshot_is_refused_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    data = busy(monkeypatch).core.to_snapshot()
    for broken in ({k: v for k, v in data.items() if k != "runs"}, {**data, "nodes": [{"id": "n1"}]},
                   {**data, "runs": [{**data["runs"][0], "state": "exploded"}]}, [data], b"\x80\x05"):
        with pytest.raises(SnapshotError):
            Core.from_snapshot(broken)


def journal_of(tmp_path: Path, events: list[Event]) -> Journal:
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_now(events)
    return journal


def test_snapshot_plus_tail_of_a_busy_journal_equals_a_full_replay(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    events = busy(monkeypatch).journal
    half = len(events) // 2
    journal = journal_of(tmp_path, events[:half])
    journal.snapshot(journal.load())
    journal.append_now(events[half:])
    assert journal._db.execute("SELECT format FROM snapshots").fetchall() == [(VERSION,)]
    loaded = journal.load()
    assert loaded.to_snapshot() == Core().fold(events).to_snapshot()


class _Trap:
    """A pickle that creates a file when it is loaded: proof that a snapshot blob was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


def test_the_journal_replays_instead_of_using_an_old_or_unknown_snapshot(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    events = busy(monkeypatch).journal
    journal = journal_of(tmp_path, events)
    marker = tmp_path / "unpickled"
    newer = cbor2.dumps({**journal.load().to_snapshot(), "version": 99})
    rows = [(len(events), VERSION, newer),                                    # a version this hub does not read
            (len(events) - 1, 1, pickle.dumps(_Trap(marker), protocol=pickle.HIGHEST_PROTOCOL)),  # the old format
            (len(events) - 2, VERSION, pickle.dumps(_Trap(marker), protocol=0))]  # a pickle under the current number
    journal._db.executemany("INSERT INTO snapshots (seq, format, data) VALUES (?, ?, ?)", rows)
    with caplog.at_level(logging.WARNING, logger="fleetflow.hub.journal"):
        loaded = journal.load()
    assert not marker.exists()
    assert loaded.to_snapshot() == Core().fold(events).to_snapshot()
    (record,) = caplog.records  # once per load, naming each snapshot skipped
    assert "skipped 3 snapshot(s)" in record.getMessage() and "replaying every event" in record.getMessage()
    assert "version 99" in record.getMessage() and "format 1" in record.getMessage()


def test_an_unusable_snapshot_falls_back_to_an_older_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = journal_of(tmp_path, [RunSubmitted(1, "r1", spec({"id": "a", "uses": "echo"}), {}, None, 10**12)])
    journal.snapshot(journal.load())
    journal.append_now([RunSubmitted(2, "r2", spec({"id": "a", "uses": "echo"}), {}, None, 10**12)])
    journal._db.execute("INSERT INTO snapshots (seq, format, data) VALUES (2, ?, x'a1')", (VERSION,))  # truncated
    with caplog.at_level(logging.WARNING, logger="fleetflow.hub.journal"):
        assert sorted(journal.load().runs) == ["r1", "r2"]
    assert "loading the one at event 1" in caplog.records[0].getMessage()
    path = journal.path
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM snapshots").fetchone() == (2,)  # reading changed nothing
    db.close()


@pytest.mark.parametrize("damage", [
    {"loaded_at": float("inf")},                                   # int(inf): OverflowError
    {"workflows": [{"name": "w", "steps": "not a list"}]},         # a spec the workflow model refuses
])
def test_whatever_a_snapshot_raises_the_journal_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture,
                                                        damage: dict[str, Any]) -> None:
    events = busy(monkeypatch).journal
    journal = journal_of(tmp_path, events)
    bad = cbor2.dumps({**journal.load().to_snapshot(), **damage})
    journal._db.execute("INSERT INTO snapshots (seq, format, data) VALUES (?, ?, ?)", (len(events), VERSION, bad))
    with caplog.at_level(logging.WARNING, logger="fleetflow.hub.journal"):
        loaded = journal.load()
    assert loaded.to_snapshot() == Core().fold(events).to_snapshot()
    (record,) = caplog.records  # one line, naming the snapshot skipped
    assert "skipped 1 snapshot(s)" in record.getMessage() and "replaying every event" in record.getMessage()


def test_a_snapshot_whose_rebuild_raises_anything_is_refused_as_a_snapshot_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = busy(monkeypatch).core.to_snapshot()

    def too_deep(spec: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("hub.snapshot.compile_workflow", too_deep)
    with pytest.raises(SnapshotError, match="RecursionError"):
        Core.from_snapshot(data)
