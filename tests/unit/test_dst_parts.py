"""Parts of the deterministic simulation: the virtual-time loop, task ownership (a crash ends what a process runs),
the journal's inline commits, the seams of a world (a planted core, repeatable notes), the runner's handling of a
seed that raises, and the history checker on hand-made evidence."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from nacl.signing import SigningKey

from agent.runtime.memory import MemoryBroker, MemoryTransport, WireRecord
from agent.runtime.startup import DataLock
from hub.events import AttemptAssigned, Event, ReplayMarks, ResultReported, RunSubmitted
from hub.journal import Journal
from hub.service import HubConfig
from hub.state import Command, Core
from protocols import Assign, Signer
from sim import virtual_time
from sim.dst import Options, World, make_plan
from sim.history import Evidence, check
from sim.inprocess import memory_hub, unmeasured_policy, virtual_clock_ms
from sim.virtual_time import Owner, SimulationStalled, kill, spawn

EPOCH = 1_700_000_000_000
ROOT = Path(__file__).resolve().parents[2]


def test_virtual_time_costs_no_wall_time_and_threads_run_inline() -> None:
    async def test() -> tuple[float, int, bool]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(3600)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(100), 2.5)
        caller = threading.get_ident()
        same_thread = await asyncio.to_thread(lambda: threading.get_ident() == caller)
        return loop.time() - started, 42, same_thread

    wall = time.perf_counter()
    assert virtual_time.run(test()) == (3602.5, 42, True)
    assert time.perf_counter() - wall < 5


def test_killing_an_owner_ends_every_task_it_started_and_nothing_else() -> None:
    async def test() -> tuple[bool, bool, bool]:
        owner = Owner("agent")
        grandchild: list[asyncio.Task[None]] = []

        async def process() -> None:
            grandchild.append(asyncio.get_running_loop().create_task(asyncio.sleep(1000)))
            await asyncio.sleep(1000)

        main = spawn(owner, process())
        bystander = asyncio.get_running_loop().create_task(asyncio.sleep(1000))
        await asyncio.sleep(1)
        await kill(owner)
        return main.cancelled(), grandchild[0].cancelled(), bystander.done()

    assert virtual_time.run(test()) == (True, True, False)


def test_an_inline_journal_commits_on_the_caller_s_thread(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", inline=True)

    async def append() -> None:
        await journal.append([RunSubmitted(1, "r1")])

    threads = threading.active_count()
    virtual_time.run(append())
    assert threading.active_count() == threads  # no writer thread
    assert [e.run for _, e in journal.events() if isinstance(e, RunSubmitted)] == ["r1"]
    journal.close()


def test_a_task_that_never_lets_time_move_fails_the_run_and_is_named() -> None:
    async def spin() -> None:
        while True:
            await asyncio.sleep(0)

    async def main() -> None:
        spawn(Owner("n1#3"), spin(), name="flusher")
        await asyncio.sleep(10)

    wall = time.perf_counter()
    with pytest.raises(SimulationStalled, match=r"stood still at 0\.000 s .*; ready: flusher \(of n1#3\)"):
        virtual_time.run(main())
    assert time.perf_counter() - wall < 30


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_dst", ROOT / "bench" / "dst.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_seed_that_raises_fails_alone_and_the_summary_still_prints(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # set: the runner does not re-execute itself
    bench = _bench()

    def simulate(seed: int) -> SimpleNamespace:
        if seed == 2:
            raise SimulationStalled("nothing is ready and no timer is set")
        return SimpleNamespace(violations=[], simulated_s=60.0)

    monkeypatch.setattr(bench, "simulate", simulate)
    assert bench.many(1, 3, 1) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("seed 2: raised: SimulationStalled: nothing is ready and no timer is set  rerun: "
                        "python bench/dst.py --seed 2 --history")
    assert lines[-2].startswith("3 seeds, 1 failures, ") and len(lines) == 3
    assert json.loads(lines[-1])["failures"] == 1  # the same summary for bench/run_all.py


def test_a_seed_that_never_ends_fails_after_its_wall_clock_bound(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A hang the loop cannot see (code that never yields to it): the runner's alarm ends the seed, even where the
    code under test swallows what the alarm raises."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    bench = _bench()
    monkeypatch.setattr(bench, "SEED_WALL_S", 1)

    def simulate(seed: int) -> SimpleNamespace:
        deadline = time.monotonic() + 60  # the test's own bound, should the alarm never come
        try:
            while time.monotonic() < deadline:
                pass
        except BaseException:
            if seed == 1:
                raise
        return SimpleNamespace(violations=[], simulated_s=1.0)  # seed 2 swallowed it and went on

    monkeypatch.setattr(bench, "simulate", simulate)
    wall = time.perf_counter()
    assert bench.many(1, 2, 1) == 1
    assert time.perf_counter() - wall < 30
    lines = capsys.readouterr().out.splitlines()
    for seed in (1, 2):
        assert lines[seed - 1] == (f"seed {seed}: raised: OutOfTime: no end after 1 s of wall-clock time  rerun: "
                                   f"python bench/dst.py --seed {seed} --history")
    assert lines[-2].startswith("2 seeds, 2 failures, ") and json.loads(lines[-1])["failures"] == 2


class TracedCore(Core):
    """Overrides one of Core's event handlers (not `apply`): the hub must call it."""

    marks: ClassVar[list[dict[str, Any]]] = []  # on the class: a recast core runs no __init__ of its own

    def _on_replay_marks(self, ev: ReplayMarks) -> list[Command]:
        TracedCore.marks.append(ev.windows)
        return super()._on_replay_marks(ev)


def test_a_core_class_planted_in_the_hub_has_its_own_handlers_called(tmp_path: Path) -> None:
    async def main() -> tuple[bool, dict[str, Any]]:
        config = HubConfig(broker="mqtt://memory.invalid", fleet="f", data=tmp_path / "hub", auto_accept=True,
                           policy=unmeasured_policy())
        hub = memory_hub(config, MemoryTransport(MemoryBroker(), "hub"), virtual_clock_ms, TracedCore)
        try:
            hub.core.apply(ReplayMarks(1, {"n1": {"boot": 1}}))
            return isinstance(hub.core, TracedCore), hub.core.windows
        finally:
            hub.journal.close()
            hub.lock.release()

    assert virtual_time.run(main()) == (True, {"n1": {"boot": 1}})
    assert TracedCore.marks == [{"n1": {"boot": 1}}]


def test_a_history_names_neither_the_temporary_directory_nor_a_pid(tmp_path: Path) -> None:
    """A hub that cannot start (its data lock still held) is noted with the reason, repeatably."""
    world = World(make_plan(1, faults=False), Options(), tmp_path)
    lock = DataLock.acquire(tmp_path / "hub")

    async def start() -> None:
        world._start_hub()

    try:
        virtual_time.run(start())
    finally:
        lock.release()
    said = world.events[-1][2]
    assert said.startswith("hub#1 failed to start: StartupError: data directory <data>/hub (--data) is in use by "
                           "another fleetflow process (pid ?)"), said
    assert str(tmp_path) not in said and tmp_path.name not in said


def evidence(journal: list[Event], wire: list[WireRecord], keys: dict[str, bytes],
             committed: dict[int, int] | None = None) -> Evidence:
    return Evidence(EPOCH, keys, wire, [], journal, {}, [], None, committed=committed or {})


def test_the_checker_flags_a_fence_that_goes_back_and_an_assignment_sent_before_it_was_journaled() -> None:
    """Sent before it was journaled: judged by the journal's commits at the send (the simulation's broker notes
    them), not by the event's `at`, stamped before its commit and earlier than the send here."""
    hub = SigningKey(bytes(32))
    signer = Signer(hub, "f", "hub", boot=1)
    sent = signer.seal(Assign("r1", "a", "a2", 2, "echo"), EPOCH + 1000, dst="n1", ttl_ms=60_000)
    journal: list[Event] = [AttemptAssigned(EPOCH + 500, "r1", "a", "a1", 5, "n1"),
                            AttemptAssigned(EPOCH + 900, "r1", "a", "a2", 2, "n1"),  # committed after the send, lower
                            ResultReported(EPOCH + 3000, "n1", "a2", 2, True)]
    wire = [WireRecord(1.0, "hub", sent.topic, sent.payload, 1, False, False, True)]
    keys = {"hub": bytes(hub.verify_key)}
    found = {v.invariant: v.detail for v in check(evidence(journal, wire, keys, committed={0: 1}))}
    assert "fence 2 after 5" in found["fences"]
    assert found["assign-journaled"].endswith("#0: a2 (run r1 step a fence 2) sent when the journal held 1 events, "
                                              "journaled later as event 2")
    assert "assign-journaled" not in {v.invariant for v in check(evidence(journal, wire, keys, committed={0: 2}))}
    # A real broker's recording carries no commits: the order is not judged there, only that it was journaled.
    assert "assign-journaled" not in {v.invariant for v in check(evidence(journal, wire, keys))}
