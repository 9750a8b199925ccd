"""The deterministic simulation of the whole fleet (sim/dst.py, bench/dst.py): seeds keep every invariant, a seed's
history is the same in every process, and a bug planted in an agent or in the hub's core is caught by some seed
within a bound, whose history then replays exactly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent import Agent, AgentConfig, Outbox, OutboxEntry
from hub.events import ResultReported
from hub.state import ATTEMPT_LIVE, Command, Core
from sim.dst import Options, Outcome, simulate

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(ROOT / "bench" / "dst.py")]
SEEDS = 40
HISTORY_SEED = 4  # hub and agent crashes, partitions of both, a full disk: most of what a history can hold


class ForgetfulOutbox(Outbox):
    """Planted bug: a result leaves the outbox as soon as it is handed to the flusher, not when the hub acks it."""

    def pending(self, after_eid: int = 0, limit: int = 500) -> list[OutboxEntry]:
        entries = super().pending(after_eid, limit)
        self.remove([e.eid for e in entries if e.type == "result"])
        return entries


def forgetful_agent(config: AgentConfig, **kwargs: Any) -> Agent:
    agent = Agent(config, **kwargs)
    agent.outbox.__class__ = ForgetfulOutbox
    return agent


class StaleFenceCore(Core):
    """Planted bug: a successful result from an attempt the hub moved away from (an older fence) is taken as the
    result of the step's newest attempt. In the core's handler of results (not `apply`): the hub must run a handler
    its core's class overrides."""

    def _on_result_reported(self, event: ResultReported) -> list[Command]:
        if event.ok and self.current(event.attempt, event.node, event.fence) is None:
            old = self.attempts.get(event.attempt)
            run = self.runs.get(old.run) if old is not None else None
            step = run.steps.get(old.step) if run is not None and old is not None else None
            newest = self.attempts.get(step.attempts[-1]) if step is not None and step.attempts else None
            if newest is not None and newest.state in ATTEMPT_LIVE:
                event = dataclasses.replace(event, attempt=newest.id, node=newest.node, fence=newest.fence)
        return super()._on_result_reported(event)


def first_failing(options: Options, invariant: str, bound: int) -> Outcome:
    for seed in range(1, bound + 1):
        outcome = simulate(seed, options)
        if any(v.invariant == invariant for v in outcome.violations):
            return outcome
    raise AssertionError(f"no seed in 1..{bound} broke {invariant}")


def test_a_few_dozen_seeds_keep_every_invariant() -> None:
    result = subprocess.run([*BENCH, "--seeds", str(SEEDS), "--jobs", "2"], capture_output=True, text=True,
                            timeout=240, cwd=ROOT, check=False)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{SEEDS} seeds, 0 failures, "), result.stdout + result.stderr[-3000:]
    assert lines[0].endswith(" simulated hours per wall-clock second") and result.returncode == 0
    assert json.loads(lines[1])["failures"] == 0  # the same summary as bench/run_all.py reads it


def test_a_seed_s_history_is_identical_in_every_process() -> None:
    runs = [subprocess.run([*BENCH, "--seed", str(HISTORY_SEED), "--history"], capture_output=True, timeout=120,
                           cwd=ROOT, check=False) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stdout[-3000:] + runs[0].stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout
    history = runs[0].stdout.decode()
    for kind in ("fault crash hub", "fault partition", "fault disk-full", "journal AttemptAssigned", "deliver #",
                 "(will)"):
        assert kind in history, kind


def test_an_agent_that_drops_results_before_their_ack_is_caught_and_its_seed_replays() -> None:
    caught = first_failing(Options(make_agent=forgetful_agent), "results-journaled", bound=20)
    again = simulate(caught.seed, Options(make_agent=forgetful_agent))
    assert again.violations == caught.violations
    assert again.history() == caught.history()


def test_a_core_that_accepts_a_stale_fence_is_caught() -> None:
    caught = first_failing(Options(core_class=StaleFenceCore), "accepted-once", bound=30)
    detail = next(v.detail for v in caught.violations if v.invariant == "accepted-once")
    assert "but the step's newest attempt is" in detail
    # The checker folds the journal with the hub's core class, so it would see the bug even in a hub that never ran
    # it; the hub did run it: what it decided from the wrong state no longer replays with the correct core.
    assert "replay" in {v.invariant for v in caught.violations}, caught.violations
