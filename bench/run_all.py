"""Run every benchmark in bench/, one at a time, each in its own process, and publish one table of figures.

    python bench/run_all.py [--lock PATH] [--results bench/RESULTS.md]
    python bench/run_all.py --smoke          # every bench at its tiny size (CI): the table goes to stdout only
    python bench/run_all.py --only NAME      # some benches at full size: the table goes to stdout only

Each bench prints its own table and, last, one JSON line of figures; this reads that line. The table gives, for each
figure, the value, the reference measured beside it in the same run, their ratio, the target and MET / NOT MET (a dash
where the issue set no target). A full run writes it into bench/RESULTS.md between the markers below, with the machine
(cores, CPU model, Python, Mosquitto), when it ran and on which commit (and whether the tree had uncommitted changes),
and leaves the rest of that file alone. Exit status 1 when any bench failed (a non-zero exit, or no JSON line),
whatever its figures (a bench that exits non-zero after its JSON line, as one whose checker failed, keeps its figures
in the table, followed by a FAILED row); a NOT MET is a figure, not a failure.
`--lock PATH` holds an exclusive flock on PATH around each bench, so others sharing the machine can wait their turn.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
DASH = "—"
SMOKE_TIMEOUT_S = 600
FULL_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    reference: str = DASH
    ratio: str = DASH
    target: str = DASH
    verdict: str = DASH


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def x(value: float) -> str:
    return f"{value:.2f}x"


# -- each bench's JSON line, as figures --------------------------------------------------------------------------

def protocol_figures(f: dict[str, Any]) -> list[Figure]:
    def per_s(us: float) -> str:
        return f"{1e6 / us:,.0f}/s"

    return [Figure("open (`Receiver.receive`, every check)", per_s(f["open_us"]),
                   f"bare PyNaCl verify {per_s(f['bare_verify_us'])}", x(f["open_ratio"]),
                   f">= {f['target_open_ratio']}x", verdict(f["open_ratio"] >= f["target_open_ratio"])),
            Figure("open against libsodium's verify alone", per_s(f["open_us"]),
                   f"`crypto_sign_open` {per_s(f['libsodium_verify_us'])}", x(f["open_vs_libsodium_ratio"])),
            Figure("seal", per_s(f["seal_us"]), f"bare PyNaCl sign {per_s(f['bare_sign_us'])}", x(f["seal_ratio"]))]


def ingest_figures(f: dict[str, Any]) -> list[Figure]:
    def missed(workers: int) -> str:
        n = f.get(f"ingest_workers{workers}_not_accepted")
        return f" (not accepted: {n['lost']} lost, {n['shed']} shed, {n['rejected']} refused)" if n else ""

    out = []
    if f.get("ingest_ratio") is not None:
        out.append(Figure(f"hub ingest, one process (accepted/s){missed(0)}", f"{f['ingest_workers0_per_s']:,}/s",
                          f"bare verify, one core {f['verify_per_s']:,}/s", x(f["ingest_ratio"]),
                          f">= {f['target_ingest_ratio']}x", verdict(f["ingest_ratio"] >= f["target_ingest_ratio"])))
    if f.get("workers_ratio") is not None:
        out.append(Figure(f"hub ingest, 2 workers{missed(2)}", f"{f['ingest_workers2_per_s']:,}/s",
                          f"1 worker {f['ingest_workers1_per_s']:,}/s{missed(1)}", x(f["workers_ratio"]),
                          f">= {f['target_workers_ratio']}x", verdict(f["workers_ratio"] >= f["target_workers_ratio"])))
    return out


def dispatch_figures(f: dict[str, Any]) -> list[Figure]:
    out = []
    bare = f["bare_p50_ms"]
    for r in f["rates"]:
        at_target = r["offered_per_s"] >= 1000
        met = r["p50_ms"] < 10 and r["p99_ms"] < 50 and r["missing_steps"] == 0
        out.append(Figure(f"dispatch at {r['offered_per_s']:g} steps/s offered: p50 / p99, submit -> result "
                          f"accepted ({r['accepted_steps']} of {r['submitted_steps']} steps)",
                          f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms",
                          f"bare MQTT round trip p50 {bare:.2f} ms", x(r["p50_ms"] / bare),
                          "p50 < 10 ms, p99 < 50 ms" if at_target else DASH, verdict(met) if at_target else DASH))
    return out


def adaptation_figures(f: dict[str, Any]) -> list[Figure]:
    floor = f["duration_s"] * 1000
    policy = f"{f['policy']} policy: duration {floor:.0f} ms"
    return [Figure(f"adaptation: first critical sample -> migrated step started elsewhere, p50 ({f['steps']} steps)",
                   f"{f['total_p50_ms']:,.0f} ms", policy, x(f["total_p50_ms"] / floor)),
            Figure("  detection: first critical sample -> the sample that completes the policy's duration, p50",
                   f"{f['detection_p50_ms']:,.0f} ms", f"duration {floor:.0f} ms, up to one telemetry interval "
                   f"({f['telemetry_interval_s'] * 1000:,.0f} ms) more", x(f["detection_p50_ms"] / floor)),
            Figure("  reaction: that sample -> started on the new node, p50", f"{f['reaction_p50_ms']:,.0f} ms",
                   f"the hub's part (to the new assignment) {f['hub_reaction_p50_ms']:,.0f} ms")]


def agent_figures(f: dict[str, Any]) -> list[Figure]:
    return [Figure("idle agent RSS", f"{f['rss_mb']:.1f} MB", f"dependencies-only interpreter {f['floor_rss_mb']:.1f} MB",
                   x(f["rss_ratio"]), "<= 1.05x", verdict(f["rss_ratio"] <= 1.05)),
            Figure(f"idle agent CPU at heartbeat 5 s (over {f['seconds']:.0f} s)", f"{f['cpu_percent']:.3f}% of a core",
                   target="<= 0.1%", verdict=verdict(f["cpu_percent"] <= 0.1)),
            Figure("agent start -> online (birth on the wire)", f"{f['start_to_online_ms']:,.0f} ms",
                   f"interpreter start + dependencies {f['floor_start_ms']:,.0f} ms",
                   x(f["start_to_online_ms"] / f["floor_start_ms"]))]


def journal_figures(f: dict[str, Any]) -> list[Figure]:
    durable, loose = f["durable_batch100_per_s"], f["loose_batch100_per_s"]
    out = [Figure("journal: durable appends, batches of 100", f"{durable:,}/s", f"same without fsync {loose:,}/s",
                  x(durable / loose), ">= 5,000/s", verdict(durable >= 5000))]
    if "restart_snapshot_s" in f:
        out.append(Figure(f"journal: restart from snapshot + tail ({f['restart_events']:,} events)",
                          f"{f['restart_snapshot_s']:.2f} s", f"full replay {f['restart_replay_s']:.2f} s",
                          x(f["restart_snapshot_s"] / f["restart_replay_s"]), "< 5 s for 1M events",
                          verdict(f["restart_snapshot_s"] < 5) if f["restart_events"] >= 1_000_000 else DASH))
    return out


def sim_figures(f: dict[str, Any]) -> list[Figure]:
    def worst(d: Any) -> str:
        return f"{d['max']:,} ms" if isinstance(d, dict) and "max" in d else str(d)

    tried = "/".join(f"{n:,}" for n in f.get("sizes_tried", []))
    out = [Figure(f"simulated devices sustained, the largest size tried ({tried}): >= 99% of heartbeats due accepted, "
                  "hub lag p99 < 1 s", f"{f['largest_sustained']:,}"),
           Figure("power cut (connection reset, no DISCONNECT: the broker sends the Will at once) -> Failed, worst",
                  worst(f["detection_ms"]), "1.5 x keepalive 7,500 ms"),
           Figure("partition, or power lost with no packet at all (keepalive finds it) -> Failed, worst",
                  worst(f["partition_detection_ms"]), "1.5 x keepalive 7,500 ms")]
    work = f.get("work")
    if work and "error" in work:
        out.append(Figure(f"{work['devices']:,} devices with work running", "did not run: " + " ".join(work["error"]),
                          verdict="NOT MET"))
    elif work:
        sent, accepted = work["hb_on_wire"], work["hb_accepted"]
        due = work["runs_submitted"] + work["runs_late"]
        results = work["results"] or {}
        detected = work["detection_ms"] or {}
        lost = results.get("sent", 0) - results.get("journaled", 0) - results.get("still_in_outboxes", 0)
        out += [Figure(f"{work['devices']:,} devices with work running: history checker", "PASS" if work["passed"]
                       else "FAIL: " + "; ".join(work["failed_checks"])[:200], target="PASS",
                       verdict=verdict(work["passed"])),
                Figure("  heartbeats accepted", f"{accepted:,.0f}", f"sent (a recorder's count) {sent:,}",
                       x(accepted / sent) if sent else DASH, "every one", verdict(sent > 0 and accepted == sent)),
                Figure("  hub ingest lag p99, every device up (histogram bucket)", f"<= {work['lag_p99_s']:g} s",
                       f"with the boot <= {work['lag_p99_with_boot_s']:g} s", target="< 1 s",
                       verdict=verdict(work["lag_p99_s"] < 1)),
                Figure("  results lost", f"{lost} of {results.get('sent', 0):,} sent", target="0",
                       verdict=verdict(bool(work["results_lost_check"]))),
                Figure(f"  power cuts (connection reset) on 1% ({work['killed']}) -> Failed, p99",
                       f"{detected.get('p99', '?')} ms",
                       target="< 1,000 ms", verdict=verdict(detected.get("p99", 10**9) < 1000)),
                Figure("  workload: runs submitted (a run per device every 5 min)", f"{work['runs_submitted']:,}",
                       f"due {due:,}", x(work["runs_submitted"] / due) if due else DASH, "every one",
                       verdict(work["runs_late"] == 0)),
                Figure("  CPU, % of one core", ", ".join(f"{k} {v}" for k, v in work["cpu_percent_of_a_core"].items()))]
    return out


def dst_figures(f: dict[str, Any]) -> list[Figure]:
    return [Figure("deterministic simulation: seeds failing", f"{f['failures']} of {f['seeds']}", target="0",
                   verdict=verdict(f["failures"] == 0)),
            Figure("  simulated hours per wall-clock second", f"{f['simulated_hours_per_s']:.3g}")]


def fuzz_figures(f: dict[str, Any]) -> list[Figure]:
    return [Figure("fuzzing: crashes and hangs", f"{f['crashes']} / {f['hangs']} in {f['inputs']:,} inputs",
                   target="0 / 0", verdict=verdict(f["crashes"] == 0 and f["hangs"] == 0))]


def deploy_figures(f: dict[str, Any]) -> list[Figure]:
    return [Figure(f"deployment to {f['nodes']:,} nodes: pace ({f['succeeded']:,} succeeded, {f['state']})",
                   f"{f['starts_per_min']:,} starts/min", f"asked {f['rate_per_min']:,g}/min",
                   x(f["starts_per_min"] / f["rate_per_min"])),
            Figure("  last node's success -> SUCCEEDED journaled", f"{f['last_success_to_succeeded_journal_ms']} ms"),
            Figure("  hub CPU while it ran", f"{f['hub_cpu_pct']}% of a core", f"idling {f['hub_cpu_idle_pct']}%")]


def dashboard_figures(f: dict[str, Any]) -> list[Figure]:
    target = f"< {f['target_ms']:,} ms"
    return [Figure(f"dashboard: fleet view interactive ({f['nodes']:,} nodes), median", f"{f['fleet_interactive_ms']:,} ms",
                   f"its snapshot fetched and parsed {f['snapshot_fetch_parse_ms']:,} ms",
                   x(f["fleet_interactive_ms"] / max(f["snapshot_fetch_parse_ms"], 0.1)), target,
                   verdict(f["fleet_interactive_met"])),
            Figure("dashboard: killed device -> failed on the page, median", f"{f['kill_to_page_failed_ms']:,} ms",
                   f"-> failed in the API {f['kill_to_api_failed_ms']:,} ms",
                   x(f["kill_to_page_failed_ms"] / max(f["kill_to_api_failed_ms"], 0.1)), target,
                   verdict(f["kill_to_page_met"]))]


@dataclass(frozen=True)
class Bench:
    name: str
    full: tuple[str, ...]  # arguments at full size (the bench's defaults unless given)
    figures: Callable[[dict[str, Any]], list[Figure]]


BENCHES = (Bench("protocol", (), protocol_figures),
           Bench("journal", (), journal_figures),
           Bench("ingest", (), ingest_figures),
           Bench("dispatch", (), dispatch_figures),
           Bench("adaptation", (), adaptation_figures),
           Bench("agent", (), agent_figures),
           Bench("sim", (), sim_figures),
           Bench("deploy", (), deploy_figures),
           Bench("dashboard", (), dashboard_figures),
           Bench("dst", ("--seeds", "1000", "--jobs", "2"), dst_figures),
           Bench("fuzz", (), fuzz_figures))
# The modules of bench/ that are not benchmarks: the fuzzer's parts, the wire recorder, this runner.
NOT_BENCHES = frozenset({"fuzz_api", "fuzz_inputs", "fuzz_protocol", "fuzz_targets", "wirerecorder", "run_all"})


def unlisted() -> list[str]:
    """Benchmarks in bench/ this runner does not know: each must be added to BENCHES (or to NOT_BENCHES)."""
    known = {b.name for b in BENCHES} | NOT_BENCHES
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in known)


@dataclass
class Outcome:
    bench: Bench
    seconds: float
    figures: list[Figure]
    failure: str | None = None  # why the bench failed


def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def run_one(bench: Bench, smoke: bool, lock: Path | None) -> Outcome:
    command = [sys.executable, str(HERE / f"{bench.name}.py"), *(("--smoke",) if smoke else bench.full)]
    with open(lock, "a") if lock else open(os.devnull) as held:
        if lock:
            fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                                  timeout=SMOKE_TIMEOUT_S if smoke else FULL_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            return Outcome(bench, time.monotonic() - started, [], f"no end after {exc.timeout:.0f} s")
    seconds = time.monotonic() - started
    figures = last_json(done.stdout)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    if figures is None:
        why = f"exit {done.returncode}" if done.returncode != 0 else "no JSON line of figures"
        return Outcome(bench, seconds, [], f"{why}:\n{tail}")
    try:
        shown = bench.figures(figures)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return Outcome(bench, seconds, [], f"figures not as expected ({type(exc).__name__}: {exc}):\n{tail}")
    # A bench that found a failure (a checker's FAIL, a missing step) still shows what it measured, then why it failed.
    return Outcome(bench, seconds, shown, f"exit {done.returncode}:\n{tail}" if done.returncode != 0 else None)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    try:
        mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10,
                                   check=False).stdout.split("\n")[0]
    except OSError:
        mosquitto = "Mosquitto not found"
    return (f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, "
            f"{mosquitto.replace('mosquitto version', 'Mosquitto').strip()}")


def revision() -> str:
    """The commit the figures were measured on, and whether the tree had changes beside it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE.parent, timeout=30,
                              check=True).stdout.strip()
    try:
        commit, changed = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"commit {commit}" + (" with uncommitted changes" if changed else "")


def table(outcomes: list[Outcome], smoke: bool, started: datetime.datetime | None = None) -> str:
    """`started`: when the run began (now if not given); the tree is read as it is now, at the run's end."""
    begun = (started or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    ended = datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
    lines = ["## Figures (bench/run_all.py)", "",
             (f"Machine: {machine()}. Run from {begun} to {ended} on {revision()}, "
              f"{'smoke size (the figures mean nothing)' if smoke else 'full size'}, "
              f"every bench one after the other; each ratio is of two figures measured side by side in that bench's "
              "run."),
             "", "| bench | figure | value | same-run reference | ratio | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        name = f"`{outcome.bench.name}` ({outcome.seconds:.0f} s)"
        for f in outcome.figures:
            lines.append(f"| {name} | {f.name} | {f.value} | {f.reference} | {f.ratio} | {f.target} | {f.verdict} |")
        if outcome.failure is not None:
            why = outcome.failure.splitlines()
            lines.append(f"| {name} | FAILED: {why[0].rstrip(':')}: {why[-1].strip().replace('|', '/')[:160]} | {DASH} "
                         f"| {DASH} | {DASH} | {DASH} | FAILED |")
    return "\n".join(lines)


def write_between_markers(text: str, block: str) -> str:
    """`text` with `block` between the run_all markers, and nothing else changed. Without markers, the block and
    its markers go after the first line (the file's title)."""
    wrapped = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        return text[:text.index(BEGIN)] + wrapped + text[text.index(END) + len(END):]
    if BEGIN in text or END in text:
        raise ValueError(f"{BEGIN} and {END} must both be there, in that order, or neither")
    title, newline, rest = text.partition("\n")
    return f"{title}{newline}\n{wrapped}\n{rest}" if newline else f"{wrapped}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every bench at its tiny size; never writes the results")
    parser.add_argument("--only", action="append", choices=[b.name for b in BENCHES],
                        help="this bench (repeatable); prints, never writes the results")
    parser.add_argument("--lock", type=Path, help="hold an exclusive flock on this file around each bench")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where a full run writes its table")
    args = parser.parse_args()
    if unlisted():
        parser.error(f"bench/ holds benchmarks this runner does not list: {', '.join(unlisted())} (add each to BENCHES "
                     "with its figures, or to NOT_BENCHES)")
    outcomes = []
    started = datetime.datetime.now(datetime.UTC)
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        print(f"{bench.name} ...", file=sys.stderr, flush=True)
        outcome = run_one(bench, args.smoke, args.lock)
        outcomes.append(outcome)
        print(f"{bench.name}: {'FAILED' if outcome.failure else 'done'} in {outcome.seconds:.0f} s"
              + (f"\n{outcome.failure}" if outcome.failure else ""), file=sys.stderr, flush=True)
    block = table(outcomes, args.smoke, started)
    print(block)
    if not args.smoke and not args.only:  # the table is always of one whole run
        text = args.results.read_text() if args.results.exists() else "# Benchmark and test-quality results\n"
        args.results.write_text(write_between_markers(text, block))
        print(f"\nwritten to {args.results}", file=sys.stderr)
    failed = [o.bench.name for o in outcomes if o.failure]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
