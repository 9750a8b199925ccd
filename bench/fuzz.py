"""Fuzz every decoder with generated and mutated input: 0 crashes and 0 hangs is the bar (issue 13, item 8).

    python bench/fuzz.py [--count 100000] [--seed 1] [--only NAME ...] [--budget 2.0] [--smoke]
    python bench/fuzz.py --only NAME --seed S --index I     # run one input again, in process, with its traceback
    python bench/fuzz.py --replay bench/fuzz-crashes/FILE     # the same, from a saved input

Targets: fuzz_protocol.py (the wire), fuzz_targets.py (files, conditions, profiles, Sparkplug) and fuzz_api.py (the
HTTP API); input makers: fuzz_inputs.py. Input `i` of a target is a pure function of (seed, target, i), so any input
is made again from its numbers.

A crash is any exception other than the target's documented refusals. A hang is one input that takes more than
`--budget` seconds of CPU, or more than WALL_FACTOR times that on the clock (blocked, or starved): CPU time, because
on a shared machine the clock says as much about the neighbours as about the decoder. Each target runs in a forked
worker process: timers inside it turn a hang in Python code into a traceback, and the parent, watching the index and
start time the worker publishes in shared memory, kills a worker stuck where signals are not seen (C code) or dead of
a signal, records that input, and starts a new worker after it. Every crashing or hanging input is written to
bench/fuzz-crashes/ with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import multiprocessing.connection
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from fuzz_targets import Target, all_targets

TARGETS: dict[str, Target] = {t.name: t for t in all_targets()}
CRASH_DIR = HERE / "fuzz-crashes"
SAVED_PER_KIND = 3           # inputs saved per distinct crash (same exception at the same line)
STATS_EVERY_S = 0.25
WALL_FACTOR = 5              # clock seconds an input may take, per second of CPU budget
_fork = multiprocessing.get_context("fork")  # workers inherit the targets, test-only ones included


class Hang(BaseException):
    """Raised by the per-input timers; a BaseException so a decoder's `except Exception` cannot swallow it."""


@dataclass
class Finding:
    kind: str            # "crash" or "hang"
    index: int
    error: str           # exception type, or how the worker ended
    detail: str          # message and traceback
    where: str = ""      # innermost frame, to group findings

    @property
    def signature(self) -> tuple[str, str, str]:
        return self.kind, self.error, self.where


@dataclass
class Report:
    target: str
    inputs: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)  # accepted, by label
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)  # by reason
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[float, int] = (0.0, -1)  # (seconds, index)
    saved: list[Path] = field(default_factory=list)

    @property
    def crashes(self) -> int:
        return sum(f.kind == "crash" for f in self.findings)

    @property
    def hangs(self) -> int:
        return sum(f.kind == "hang" for f in self.findings)


def rng_for(seed: int, name: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{name}:{index}")


def make_input(target: Target, seed: int, index: int) -> Any:
    return target.generate(rng_for(seed, target.name, index))


def feed(target: Target, item: Any) -> tuple[str, bool]:
    """(label, refused): the outcome of one input. Raises whatever the decoder raises that is not a refusal."""
    try:
        return target.run(item), False
    except target.refusals as exc:
        return target.reason(exc), True


def _innermost(tb: Any) -> str:
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if str(HERE.parent) in f.filename and "/bench/" not in f.filename] or frames
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"


# -- the worker ------------------------------------------------------------------------------------------------------


def _on_timer(signum: int, frame: Any) -> None:
    raise Hang("CPU" if signum == signal.SIGPROF else "clock")


def _work(name: str, seed: int, start: int, stop: int, budget: float, memory_mb: int, scratch: str,
          conn: multiprocessing.connection.Connection, shared: Any) -> None:
    """Feed inputs start..stop-1 of one target, publishing (index, start time) before each, stats now and then."""
    tempfile.tempdir = scratch  # what a target writes goes where the parent removes it: a killed worker cleans nothing
    if memory_mb:
        space = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (space, space))  # a runaway allocation is a MemoryError, not the OOM killer
    signal.signal(signal.SIGPROF, _on_timer)  # CPU time of the whole process, its threads included
    signal.signal(signal.SIGALRM, _on_timer)
    logging.disable(logging.CRITICAL)  # refusals are logged once per sender: noise among the results
    warnings.simplefilter("ignore")  # ast.parse warns about odd literals in conditions: noise among the results
    target = TARGETS[name]
    outcomes: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    slowest, sent_at, done_since = (0.0, -1), time.monotonic(), start

    def flush(upto: int) -> None:
        nonlocal outcomes, refusals, slowest, done_since
        conn.send(("stats", upto - done_since, dict(outcomes), dict(refusals), slowest))
        outcomes, refusals, slowest, done_since = collections.Counter(), collections.Counter(), (0.0, -1), upto

    for index in range(start, stop):
        try:
            item = make_input(target, seed, index)
        except Exception:  # noqa: BLE001 - a bug of the fuzzer itself: stop, do not count it against the decoder
            conn.send(("error", index, traceback.format_exc()))
            return
        began = time.monotonic()
        shared[0], shared[1] = index, began
        try:
            signal.setitimer(signal.ITIMER_PROF, budget)
            signal.setitimer(signal.ITIMER_REAL, budget * WALL_FACTOR)
            try:
                label, refused = feed(target, item)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Hang as hang:
            flush(index)
            limit = f"{budget:g} s of CPU" if hang.args[0] == "CPU" else f"{budget * WALL_FACTOR:g} s on the clock"
            conn.send(("hang", index, f"over {limit}", traceback.format_exc(), _innermost(sys.exc_info()[2])))
            return  # the decoder was stopped halfway: its process state is not to be trusted
        except BaseException as exc:  # noqa: BLE001 - anything that is not a refusal is the finding
            label, refused = "crashed", False
            conn.send(("crash", index, type(exc).__name__, traceback.format_exc(), _innermost(exc.__traceback__)))
        finally:
            shared[0] = -1
        took = time.monotonic() - began
        if took > slowest[0]:
            slowest = (took, index)
        if label != "crashed":
            (refusals if refused else outcomes)[label] += 1
        if began - sent_at > STATS_EVERY_S:
            flush(index + 1)
            sent_at = began
    flush(stop)
    conn.send(("done",))


# -- the parent --------------------------------------------------------------------------------------------------------


def run_target(target: Target, seed: int, count: int, budget: float, crash_dir: Path | None,
               memory_mb: int = 4096) -> Report:
    """All `count` inputs of one target, through as many workers as crashes of the process and hangs need."""
    report = Report(target.name)
    began = time.monotonic()
    shared = _fork.Array("d", 2, lock=False)
    scratch = tempfile.mkdtemp(prefix=f"fleetflow-fuzz-{target.name}-")
    index = 0
    while index < count:
        shared[0] = -1
        receiver, sender = _fork.Pipe(duplex=False)
        worker = _fork.Process(target=_work, args=(target.name, seed, index, count, budget, memory_mb, scratch, sender,
                                                   shared), daemon=True)
        worker.start()
        sender.close()
        index = _watch(worker, receiver, shared, report, budget, count, index)
        receiver.close()
        worker.join(5)
        if worker.is_alive():
            worker.kill()
            worker.join()
    shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.monotonic() - began
    report.inputs = count
    if crash_dir is not None:
        _save_findings(target, seed, report, crash_dir)
    return report


def _watch(worker: Any, receiver: Any, shared: Any, report: Report, budget: float, count: int, index: int) -> int:
    """Follow one worker until it is done, hangs or dies; returns the index to go on from."""
    while True:
        if receiver.poll(0.05):
            try:
                message = receiver.recv()
            except (EOFError, OSError):
                message = None
            if message is None:
                return _died(worker, shared, report, index)
            kind = message[0]
            if kind == "stats":
                _, done, outcomes, refusals, slowest = message
                report.outcomes.update(outcomes)
                report.refusals.update(refusals)
                report.slowest = max(report.slowest, slowest)
                index += done
            elif kind == "crash":
                _, at, error, detail, where = message
                report.findings.append(Finding("crash", at, error, detail, where))
            elif kind == "hang":
                _, at, error, detail, where = message
                report.findings.append(Finding("hang", at, error, detail, where))
                return at + 1
            elif kind == "done":
                return count
            elif kind == "error":
                raise RuntimeError(f"{report.target}: making input {message[1]} failed (a bug of the fuzzer):\n"
                                   f"{message[2]}")
            continue
        at, started = int(shared[0]), shared[1]
        # The worker's own timers have fired by then: one still busy is stuck where signals are not seen.
        deadline = budget * WALL_FACTOR + 1
        if at >= 0 and time.monotonic() - started > deadline:
            worker.kill()
            worker.join()
            _lost(report, index, at)
            report.findings.append(Finding("hang", at, "killed", f"still running {deadline:g} s after it started "
                                           f"(its timers were not seen: stuck in C code, or signals blocked)", "?"))
            report.slowest = max(report.slowest, (deadline, at))
            return at + 1
        if not worker.is_alive() and not receiver.poll(0):
            return _died(worker, shared, report, index)


def _died(worker: Any, shared: Any, report: Report, index: int) -> int:
    worker.join()
    at = int(shared[0])
    at = at if at >= 0 else index
    _lost(report, index, at)
    code = worker.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    report.findings.append(Finding("crash", at, "worker died", f"the worker process {how} on this input",
                                   f"exit {code}"))
    return at + 1


def _lost(report: Report, counted: int, at: int) -> None:
    """Inputs a worker ran after its last stats and before the one it died on: their outcomes went with it."""
    if at > counted:
        report.outcomes["(outcome lost with the worker)"] += at - counted


def _save_findings(target: Target, seed: int, report: Report, crash_dir: Path) -> None:
    crash_dir.mkdir(parents=True, exist_ok=True)
    per_kind: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for finding in report.findings:
        per_kind[finding.signature] += 1
        if per_kind[finding.signature] > SAVED_PER_KIND:
            continue
        stem = f"{target.name}.{seed}.{finding.index}"
        path = crash_dir / f"{stem}.{target.codec.ext}"
        path.write_bytes(target.codec.dump(make_input(target, seed, finding.index)))
        shown = path.resolve().relative_to(HERE.parent) if path.resolve().is_relative_to(HERE.parent) else path
        (crash_dir / f"{stem}.txt").write_text(
            f"{finding.kind}: {finding.error} at {finding.where} (target {target.name}, seed {seed}, input "
            f"{finding.index})\n\nreproduce:\n"
            f"  python bench/fuzz.py --only {target.name} --seed {seed} --index {finding.index}\n"
            f"  python bench/fuzz.py --replay {shown}\n\n{finding.detail}")
        report.saved.append(path)


# -- the command line --------------------------------------------------------------------------------------------------


def shares(names: Sequence[str], count: int) -> dict[str, int]:
    """`count` inputs spread over the targets by weight (every target gets at least one)."""
    weights = {n: TARGETS[n].weight for n in names}
    total = sum(weights.values())
    out = {n: max(1, int(count * w / total)) for n, w in weights.items()}
    out[names[0]] += max(0, count - sum(out.values()))
    return out


def run(names: Sequence[str], count: int, seed: int, budget: float, crash_dir: Path | None,
        out: TextIO = sys.stdout, memory_mb: int = 4096) -> list[Report]:
    reports = []
    for name, n in shares(names, count).items():
        reports.append(run_target(TARGETS[name], seed, n, budget, crash_dir, memory_mb))
        print(f"  {name}: {n} inputs in {reports[-1].seconds:.1f} s", file=out, flush=True)
    print_table(reports, out)
    return reports


def print_table(reports: list[Report], out: TextIO) -> None:
    header = (f"{'target':<14}{'inputs':>8}{'accepted':>10}{'refused':>9}{'crashes':>9}{'hangs':>7}{'inputs/s':>10}"
              f"{'slowest ms (input)':>20}  most frequent outcomes (refusals by reason)")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in reports:
        top = ", ".join(f"{k} {v}" for k, v in (r.refusals + r.outcomes).most_common(4))
        slowest = f"{r.slowest[0] * 1000:.1f} ({r.slowest[1]})"
        print(f"{r.target:<14}{r.inputs:>8}{sum(r.outcomes.values()):>10}{sum(r.refusals.values()):>9}"
              f"{r.crashes:>9}{r.hangs:>7}{r.inputs / max(r.seconds, 1e-9):>10.0f}{slowest:>20}  {top}", file=out)
    for r in reports:
        kinds: dict[tuple[str, str, str], list[Finding]] = collections.defaultdict(list)
        for f in r.findings:
            kinds[f.signature].append(f)
        for (kind, error, where), found in kinds.items():
            last = found[0].detail.strip().splitlines()[-1][:160]
            print(f"{r.target}: {len(found)} {kind}(es) {error} at {where} (first: input {found[0].index}): {last}",
                  file=out)
    saved = [p for r in reports for p in r.saved]
    if saved:
        print(f"inputs saved to {saved[0].parent} ({len(saved)}), with the command that reproduces each", file=out)
    total = sum(r.inputs for r in reports)
    print(f"{total} inputs, {sum(r.crashes for r in reports)} crashes, {sum(r.hangs for r in reports)} hangs",
          file=out)


def reproduce(target: Target, item: Any) -> int:
    """One input in this process, with the decoder's own traceback if it crashes."""
    scratch = tempfile.mkdtemp(prefix=f"fleetflow-fuzz-{target.name}-")
    tempfile.tempdir = scratch
    try:
        label, refused = feed(target, item)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{target.name}: {'refused' if refused else 'no crash'}: {label}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs in all, spread over the targets")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", choices=sorted(TARGETS), help="this target only (repeatable)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help=f"CPU seconds one input may take before it is a hang ({WALL_FACTOR}x that on the clock)")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address space of a worker (0: no limit)")
    parser.add_argument("--index", type=int, help="run input INDEX of --only NAME again, in this process")
    parser.add_argument("--replay", type=Path, help="run a saved input again, in this process")
    parser.add_argument("--crash-dir", type=Path, default=CRASH_DIR)
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count = 500
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:<14} {t.about}")
        return 0
    if args.replay is not None:
        target = TARGETS[args.replay.name.split(".")[0]]
        return reproduce(target, target.codec.load(args.replay.read_bytes()))
    if args.index is not None:
        if not args.only or len(args.only) != 1:
            parser.error("--index needs exactly one --only NAME")
        target = TARGETS[args.only[0]]
        return reproduce(target, make_input(target, args.seed, args.index))
    names = args.only or list(TARGETS)
    print(f"fuzzing {', '.join(names)}: {args.count} inputs, seed {args.seed}, budget {args.budget:g} s per input",
          flush=True)
    reports = run(names, args.count, args.seed, args.budget, args.crash_dir, memory_mb=args.memory_mb)
    seconds = sum(r.seconds for r in reports)
    print(json.dumps({"inputs": sum(r.inputs for r in reports), "crashes": sum(r.crashes for r in reports),
                      "hangs": sum(r.hangs for r in reports), "targets": len(reports),
                      "inputs_per_s": round(sum(r.inputs for r in reports) / max(seconds, 1e-9))}))
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
