"""Adaptation end to end (issue 17, item 5): from a node's first telemetry sample over the critical threshold to its
migrated step running on another node, with the hub's default policy.

    python bench/adaptation.py [--hot 4] [--spare 2] [--telemetry S] [--smoke]

A real hub with no policy file (the defaults: `duration` 60 s over critical -> unhealthy -> throttle and migrate),
`hot + spare` real agents on Mosquitto whose reported metrics the bench pins through their telemetry overlay files
(cpu, mem and disk low, so a busy machine does not make a node unhealthy by itself), and one long migratable step
running on each hot node. Then every hot node turns critical at once (temp 95) and each step's way is timed:

  detection  the first sample over critical on the wire -> the sample that completes the policy's `duration` over
             critical, on the wire: the policy's own wait (no hub can act on a node before its policy says so)
  reaction   that completing sample on the wire -> the step's new attempt `started` on the wire, sent by another
             node; split into the hub's part (-> the new assignment on the wire: its ingest, classification, journal
             commit and placement) and the new node's (assignment -> started)

Every time is a wire time from a separate recorder process (bench/wirerecorder.py), on this machine's wall clock; the
journal (read from its file, `fleetflow journal export`, never the hub's API) only names the threshold the hub judged
by. Side by side: the policy's own floor, `duration` (detection can be no shorter) and `duration` plus the telemetry
interval (the latest a sample can complete it). Prints a table, then one JSON line. `--smoke` uses a 1 s policy
instead (for CI only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wirerecorder import Record, WireRecorder  # noqa: E402

from hub.health import Policy  # noqa: E402
from tests.brokers import Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

FLEET = "adapt"
HOT_TEMP, COOL_TEMP = 95.0, 40.0  # over every firmware profile's critical temperature / well under every high one
STEP = "name: hot\nsteps:\n  - id: long\n    uses: sleep\n    with: {seconds: 3600}\n    migratable: true\n"
SMOKE_POLICY = "duration: 1\nrecovery: 1\ncooldown: 1\n"
BOUND_S = 600.0


def reading(temp: float) -> str:
    return json.dumps({"cpu": 10, "mem": 30, "disk": 20, "temp": temp})


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def running(hub: HubProcess, run_id: str) -> dict[str, Any] | None:
    attempts = hub.get(f"/runs/{run_id}")["steps"][0]["attempts"]
    return next((a for a in reversed(attempts) if a["state"] == "running"), None)


def journal(hub: HubProcess) -> list[dict[str, Any]]:
    out = subprocess.run([str(Path(sys.executable).parent / "fleetflow"), "journal", "export", "--data", str(hub.data)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def one_step(run_id: str, hot: str, records: list[Record], events: list[dict[str, Any]], duration: float
             ) -> dict[str, float]:
    """The timings of one migrated step (seconds), all from the wire."""
    change = next(e for e in events if e["kind"] == "health_changed" and e["node"] == hot and e["health"] == "unhealthy")
    samples = [r for r in records if r.topic.endswith(f"/node/{hot}/tel")
               and r.fields.get("metrics", {}).get("temp", 0) >= change["threshold"]]
    first = samples[0]
    # the sample that completed `duration` over critical (send times, from the samples' own headers)
    completing = next(r for r in samples if r.fields["ts"] - first.fields["ts"] >= duration * 1000)
    assigned = next(r for r in records if r.fields.get("type") == "assign" and r.fields.get("run") == run_id
                    and r.fields.get("dst") != hot and r.wall >= completing.wall)
    started = next(r for r in records if r.fields.get("type") == "step" and r.fields.get("run") == run_id
                   and r.fields.get("event") == "started" and r.fields.get("src") != hot and r.wall >= assigned.wall)
    return {"total": started.wall - first.wall, "detection": completing.wall - first.wall,
            "reaction": started.wall - completing.wall, "hub_reaction": assigned.wall - completing.wall,
            "agent_start": started.wall - assigned.wall}


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = Broker("mosquitto", tmp / "broker").start()
    hub_args = ["--auto-accept", "--log-level", "warning"]
    duration = Policy().duration
    if args.smoke:
        (tmp / "policy.yaml").write_text(SMOKE_POLICY)
        hub_args += ["--policy", str(tmp / "policy.yaml")]
        duration = 1.0
    hub = HubProcess(broker, FLEET, tmp / "hub", args=tuple(hub_args))
    recorder: WireRecorder | None = None
    try:
        hub.start()
        recorder = WireRecorder(broker, *(f"fleetflow/v1/{FLEET}/node/+/{kind}" for kind in ("tel", "evt", "cmd")),
                                workdir=tmp).start()
        files: dict[str, Path] = {}
        interval = ("--telemetry", str(args.telemetry)) if args.telemetry else ()
        for i in range(args.hot + args.spare):
            name = f"n{i}"
            files[name] = tmp / f"{name}.json"
            files[name].write_text(reading(COOL_TEMP))
            hub.agent(name, "--heartbeat", "5", *interval, "--telemetry-file", str(files[name]),
                      "--max-concurrent", "4", "--log-level", "warning")
        hub.wait_nodes(len(files), 120)
        runs = [hub.submit(STEP) for _ in range(args.hot)]
        first = {run: hub.wait(lambda run=run: running(hub, run), 120, f"run {run} running") for run in runs}
        hot_nodes = {a["node"] for a in first.values()}
        for node in hot_nodes:
            files[node].write_text(reading(HOT_TEMP))
        moved = {run: hub.wait(lambda run=run: (a := running(hub, run)) is not None and a["node"] != first[run]["node"],
                               BOUND_S, f"run {run} migrated") for run in runs}
        records = recorder.stop(f"fleetflow/v1/{FLEET}/node/wire-recorder-end/evt")
        recorder = None
        events = journal(hub)
        steps = [one_step(run, first[run]["node"], records, events, duration) for run in runs if moved[run]]
        for run in runs:
            hub.post(f"/runs/{run}/cancel", {"reason": "bench over"})
    finally:
        if recorder is not None and recorder.proc is not None:
            recorder.proc.kill()
        hub.stop()
        broker.stop()
    by_node: dict[str, list[float]] = {}
    for r in records:
        if r.topic.endswith("/tel"):
            by_node.setdefault(str(r.fields.get("src")), []).append(r.wall)
    intervals = [b - a for walls in by_node.values() for a, b in zip(walls, walls[1:])]
    interval_s = statistics.median(intervals) if intervals else float("nan")

    def ms(key: str, p: float) -> float:
        return round(pct([s[key] for s in steps], p) * 1000, 1)

    return {"policy": "smoke (duration 1 s)" if args.smoke else "default", "duration_s": duration,
            "telemetry_interval_s": round(interval_s, 3), "steps": len(steps), "hot_nodes": len(hot_nodes),
            "runs": len(runs),
            **{f"{key}_{name}_ms": ms(key, p) for key in ("total", "detection", "reaction", "hub_reaction", "agent_start")
               for name, p in (("p50", 50), ("max", 100))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", type=int, default=4, help="nodes turned critical at once, each running one step")
    parser.add_argument("--spare", type=int, default=2, help="nodes that stay cool")
    parser.add_argument("--telemetry", type=float, help="agents' telemetry interval, s (default: their profile's)")
    parser.add_argument("--smoke", action="store_true", help="a tiny size and a 1 s policy, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.hot, args.spare, args.telemetry = 1, 1, 0.5
    with tempfile.TemporaryDirectory() as tmp:
        f = measure(args, Path(tmp))
    print(f"{f['runs']} migratable steps on {f['hot_nodes']} nodes turned critical at once; {f['policy']} policy "
          f"({f['duration_s']:g} s over critical -> unhealthy -> migrate); telemetry every {f['telemetry_interval_s']:g} s; "
          "real hub and agents, Mosquitto\n")
    print(f"{'':44s} {'p50 ms':>9s} {'max ms':>9s}")
    for key, label in (("total", "first critical sample -> started elsewhere"),
                       ("detection", "detection: -> the sample completing duration"),
                       ("reaction", "reaction: that sample -> started elsewhere"),
                       ("hub_reaction", "  the hub: -> new assignment on the wire"),
                       ("agent_start", "  the new node: assignment -> started")):
        print(f"{label:44s} {f[f'{key}_p50_ms']:9.0f} {f[f'{key}_max_ms']:9.0f}")
    floor = f["duration_s"] * 1000
    print(f"\nthe policy's floor: detection >= duration = {floor:.0f} ms, and <= duration + one telemetry interval = "
          f"{floor + f['telemetry_interval_s'] * 1000:.0f} ms; total p50 / duration = {f['total_p50_ms'] / floor:.2f}x")
    print(json.dumps(f))
    return 0 if f["steps"] == f["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
