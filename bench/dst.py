"""Deterministic simulation of the whole fleet (sim/dst.py), seed by seed.

    python bench/dst.py --seeds 1000 [--start 1] [--jobs 2]   # one line per failing seed, then a summary
    python bench/dst.py --seed 17 --history                   # that seed's history, identical on every run
    python bench/dst.py --smoke                               # 3 seeds, for CI (bench/run_all.py --smoke)

A failing seed prints the invariant it broke and the command that replays it; a seed that raises, stalls (virtual time
standing still) or runs past SEED_WALL_S of wall-clock time fails the same way, as `raised`. The summary line reads
`N seeds, F failures, X simulated hours per wall-clock second`, then the same as one JSON line. The process
re-executes itself with PYTHONHASHSEED=0 when that is not set: the hub's core iterates sets of strings, whose order
follows the per-process hash salt.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("PYTHONHASHSEED") is None:  # before anything hashes a string that matters
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.dst import simulate  # noqa: E402


SEED_WALL_S = 300  # a seed takes seconds; one still running after this hangs (in code that never yields to the loop,
                   # or that moves virtual time by specks), which sim/virtual_time.py cannot see from its selector


class OutOfTime(BaseException):
    """A seed ran past SEED_WALL_S. A BaseException: the code under test catches Exception and must not swallow it."""


_expired: list[bool] = []  # not empty: the seed running in this process ran out of time


def _out_of_time(signum: int, frame: FrameType | None) -> None:
    # Raised in whatever runs now, perhaps a task of the simulation, which keeps it as that task's end (asyncio does
    # so with any BaseException but two): so noted here too, and raised again every second until the seed is over.
    _expired.append(True)
    signal.alarm(1)
    raise OutOfTime(f"no end after {SEED_WALL_S} s of wall-clock time")


def rerun(seed: int) -> str:
    return f"python bench/dst.py --seed {seed} --history"


def judge(seed: int) -> tuple[int, list[tuple[str, str]], float]:
    """(seed, violations as (invariant, detail), simulated seconds): plain data, to cross a process boundary. A seed
    whose simulation raised (it stalled, ran out of wall-clock time, or its setup or the checker failed) is a failure
    of that seed alone: the other seeds still run, and the summary still prints."""
    _expired.clear()
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(SEED_WALL_S)
    try:
        outcome = simulate(seed)
        if _expired:  # the alarm ended some task, and the simulation went on without it
            raise OutOfTime(f"no end after {SEED_WALL_S} s of wall-clock time")
    except (Exception, OutOfTime) as exc:  # any error is this seed's failure, reported with its rerun command
        return seed, [("raised", f"{type(exc).__name__}: {exc}")], 0.0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return seed, [(v.invariant, v.detail) for v in outcome.violations], outcome.simulated_s


def many(start: int, count: int, jobs: int) -> int:
    started = time.perf_counter()
    failures = 0
    simulated = 0.0
    seeds = range(start, start + count)
    with multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else _Inline() as pool:
        for seed, violations, simulated_s in pool.imap(judge, seeds):
            simulated += simulated_s
            if violations:
                failures += 1
                invariant, detail = violations[0]
                more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
                print(f"seed {seed}: {invariant}{more}: {detail[:300]}  rerun: {rerun(seed)}", flush=True)
    wall = time.perf_counter() - started
    print(f"{count} seeds, {failures} failures, {simulated / 3600 / wall:.3g} simulated hours per wall-clock second")
    print(json.dumps({"seeds": count, "failures": failures, "simulated_hours_per_s": round(simulated / 3600 / wall, 4),
                      "wall_s": round(wall, 1)}))
    return 1 if failures else 0


class _Inline:
    """`imap` in this process (one job): no fork, and a failure's traceback stays readable."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(function, items):  # type: ignore[no-untyped-def]
        return map(function, items)


def one(seed: int, history: bool) -> int:
    started = time.perf_counter()
    outcome = simulate(seed)
    if history:
        for line in outcome.history():
            print(line)
    for violation in outcome.violations:
        print(f"VIOLATION {violation.invariant}: {violation.detail}")
    verdict = "ok" if not outcome.violations else f"{len(outcome.violations)} invariant(s) broken"
    print(f"seed {seed}: {verdict}, {outcome.simulated_s:.0f} simulated seconds")
    if not history:  # a history is compared byte for byte: no wall time in it
        print(f"({time.perf_counter() - started:.2f} s of wall-clock time)")
    return 1 if outcome.violations else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help="run this many seeds, from --start on")
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--seed", type=int, help="run one seed")
    parser.add_argument("--history", action="store_true", help="print the seed's history, one line per event")
    parser.add_argument("--jobs", type=int, default=1, help="processes running seeds side by side")
    parser.add_argument("--log", default="CRITICAL", help="log level of the hub and agents (to stderr)")
    parser.add_argument("--smoke", action="store_true", help="3 seeds, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.seeds = 3
    logging.basicConfig(level=args.log.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.seed is not None:
        return one(args.seed, args.history)
    if args.seeds is None:
        parser.error("give --seeds N or --seed S")
    return many(args.start, args.seeds, max(1, args.jobs))


if __name__ == "__main__":
    sys.exit(main())
