"""Journal throughput and restart time, measured side by side in one run.

    python bench/journal.py [--events 20000] [--restart-events 1000000] [--smoke]

1. Durable appends (WAL, synchronous=FULL) at batch sizes 1, 10, 100, 1000, against the same inserts without fsync
   (synchronous=OFF): the ratio is what durability costs, and the batch size is what group commit buys back.
2. Restart: a journal of about N events written by the real reducer and scheduler (runs submitted, placed, started
   and finished on 50 nodes); time to load from the latest snapshot + tail against a full replay.
Targets (issue 5): >= 5,000 durable transitions/s (batches of 100: the group commit the hub does under load);
restart of 1M events < 5 s. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.events import Event, NodeBorn, ResultReported, RunSubmitted, StepReported  # noqa: E402
from hub.journal import Journal  # noqa: E402
from hub.state import Core  # noqa: E402
from hub.workflow import workflow_from_data  # noqa: E402

SPEC = workflow_from_data({"name": "bench", "steps": [{"id": "a", "uses": "echo"},
                                                      {"id": "b", "uses": "echo", "needs": ["a"]}]}).model_dump(
    by_alias=True, mode="json")


def appends(tmp: Path, total: int, batch: int, durable: bool) -> float:
    path = tmp / f"j-{batch}-{durable}.sqlite"
    journal = Journal(path)
    if not durable:
        journal._db.execute("PRAGMA synchronous=OFF")
    events = [RunSubmitted(i, f"r{i}", SPEC, {}, None, 10**12) for i in range(total)]
    started = time.perf_counter()
    for i in range(0, total, batch):
        journal.append_now(events[i:i + batch])
    elapsed = time.perf_counter() - started
    journal.close()
    return total / elapsed


def build(path: Path, target: int) -> int:
    """A realistic journal: facts and decisions from the real core, as the hub writes them."""
    journal = Journal(path, snapshot_every=10**12)
    core = Core()
    now = 1_000
    batch: list[Event] = [NodeBorn(now, f"n{i}", 1, "p", {}, ("echo",), 64, {}, (), 5.0) for i in range(50)]
    run = 0
    written = 0
    snapshotted = False
    while written < target:
        if not snapshotted and written >= 0.9 * target:  # the hub snapshots every N events: leave a tail
            journal.snapshot(core)
            snapshotted = True
        for _ in range(200):
            batch.append(RunSubmitted(now, f"r{run}", SPEC, {}, None, 10**13))
            run += 1
        for event in batch:
            core.apply(event)
        journal.append_now(batch)
        written += len(batch)
        batch = []
        for _ in range(4):
            now += 10
            for node in core.nodes.values():
                node.last_seen = now
            decisions = core.decide(now, placement_limit=5000)
            for decision in decisions:
                core.apply(decision)
            journal.append_now(decisions)
            written += len(decisions)
            reports: list[Event] = []
            for attempt in core.live_attempts():
                reports.append(StepReported(now, attempt.node, attempt.id, attempt.fence, "started"))
                reports.append(ResultReported(now, attempt.node, attempt.id, attempt.fence, True, {"v": 1}, None))
            for event in reports:
                core.apply(event)
            journal.append_now(reports)
            written += len(reports)
    journal.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--restart-events", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.restart_events = 500, 5_000
    figures: dict[str, float] = {"events": args.events}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"durable appends, {args.events} RunSubmitted events, WAL synchronous=FULL vs OFF, one run\n")
        print(f"{'batch':>6s} {'durable ev/s':>13s} {'no-fsync ev/s':>14s} {'ratio':>7s}")
        for batch in (1, 10, 100, 1000):
            total = min(args.events, 2000) if batch == 1 else args.events
            durable = appends(tmp, total, batch, True)
            loose = appends(tmp, total, batch, False)
            print(f"{batch:6d} {durable:13,.0f} {loose:14,.0f} {durable / loose:6.2f}x")
            figures[f"durable_batch{batch}_per_s"], figures[f"loose_batch{batch}_per_s"] = round(durable), round(loose)
        path = tmp / "restart.sqlite"
        started = time.perf_counter()
        written = build(path, args.restart_events)
        print(f"\nrestart: journal of {written:,} events written by the real core in "
              f"{time.perf_counter() - started:.0f} s ({path.stat().st_size / 2**20:.0f} MB)")
        journal = Journal(path)
        started = time.perf_counter()
        core = journal.load()
        with_snapshot = time.perf_counter() - started
        runs = len(core.runs)
        journal._db.execute("DELETE FROM snapshots")
        started = time.perf_counter()
        replayed = journal.load()
        full = time.perf_counter() - started
        assert len(replayed.runs) == runs
        print(f"load from snapshot + tail: {with_snapshot:.2f} s; full replay: {full:.2f} s; "
              f"ratio {with_snapshot / full:.2f}x ({runs:,} runs)")
        print(f"target < 5 s for 1M events: {'MET' if with_snapshot < 5 and written >= 1_000_000 else 'see above'}")
        figures.update(restart_events=written, restart_snapshot_s=round(with_snapshot, 3),
                       restart_replay_s=round(full, 3), runs=runs)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
