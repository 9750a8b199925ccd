"""A fleet deployment at scale: 1,000 simulated devices on Mosquitto, one deployment at 1,000 nodes/min.

    python bench/deploy.py [--nodes 1000] [--rate 1000] [--verify 5] [--procs 2] [--smoke]

Measured in one run, from the hub's journal file and its process:
- the rollout's pace: the starts per minute the journal shows against the rate asked, and the least gap between two
  consecutive starts against the rate's spacing (never below it);
- the time from the last node's success to the deployment's SUCCEEDED, as journaled (the hub's own decision) and as
  `GET /deployments` first showed it (what an operator's `deployments show -w` sees, polled every 0.25 s);
- the hub's CPU while the deployment runs (psutil on the hub process: % of one core, mean and the busiest second),
  side by side with the same hub idling with the same fleet for as long before the deployment.
`--smoke`: 20 nodes, a quick check that the bench runs. The last line is one JSON object (bench/run_all.py reads it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.system.deployfleet import DeployFleet, update_step, workflow

POLL_S = 0.25
IDLE_S = 10.0


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def watch(fleet: DeployFleet, dep: str, proc: psutil.Process, bound_s: float) -> tuple[dict[str, Any], int, list[float]]:
    """Poll the summary until the deployment ends: its summary, when it was first seen ended (epoch ms), and the
    hub's CPU % of one core in each second meanwhile."""
    deadline = time.monotonic() + bound_s
    samples: list[float] = []
    mark, used = time.monotonic(), cpu_seconds(proc)
    while time.monotonic() < deadline:
        summary = next(d for d in fleet.hub.get("/deployments") if d["id"] == dep)
        if summary["state"] not in ("running", "scheduled", "paused"):
            return summary, int(time.time() * 1000), samples
        if time.monotonic() - mark >= 1.0:
            now, total = time.monotonic(), cpu_seconds(proc)
            samples.append((total - used) / (now - mark) * 100)
            mark, used = now, total
        time.sleep(POLL_S)
    raise SystemExit(f"deployment {dep} did not end within {bound_s:.0f} s")


def measure(tmp: Path, nodes: int, rate: float, verify: float, procs: int) -> dict[str, Any]:
    with DeployFleet(tmp, fleet="bench", heartbeat=5.0, telemetry=10.0, procs=procs,
                     hub_args=("--log-level", "warning")) as fleet:
        names = [f"b-{i:04d}" for i in range(nodes)]
        booted = time.monotonic()
        fleet.add_devices(dict.fromkeys(names, "dtest"))
        boot_s = time.monotonic() - booted
        assert fleet.hub.proc is not None
        hub = psutil.Process(fleet.hub.proc.pid)
        idle_from, idle_used = time.monotonic(), cpu_seconds(hub)
        time.sleep(IDLE_S)
        idle_cpu = (cpu_seconds(hub) - idle_used) / (time.monotonic() - idle_from) * 100

        started, used = time.monotonic(), cpu_seconds(hub)
        dep = fleet.deploy(workflow("bench-fw", "1.0.0", update_step(0.1)), "--target", "profile=dtest",
                           "--rate", f"{rate:g}/min", "--verify", f"{verify:g}s", "--rollback", "never")
        summary, seen_ms, samples = watch(fleet, dep, hub, 120 + nodes * 60 / rate * 3 + verify)
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(hub) - used) / elapsed * 100

        changes = fleet.execution_events(dep)
        succeeded = [e["at"] for e in changes if e["state"] == "succeeded"]
        ended_at = next(e["at"] for e in fleet.deployment_events(dep) if e["state"] == summary["state"])
        starts = [at for at, _ in fleet.starts(dep)]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        pace = (len(starts) - 1) * 60_000 / (starts[-1] - starts[0]) if len(starts) > 1 else float("nan")
        return {"nodes": nodes, "rate_per_min": rate, "verify_s": verify, "state": summary["state"],
                "succeeded": len(succeeded), "boot_s": round(boot_s, 1), "rollout_s": round(elapsed, 1),
                "starts_per_min": round(pace, 1), "min_start_gap_ms": min(gaps, default=None),
                "spacing_ms": round(60_000 / rate, 1),
                "last_success_to_succeeded_journal_ms": ended_at - max(succeeded) if succeeded else None,
                "last_success_to_succeeded_shown_ms": seen_ms - max(succeeded) if succeeded else None,
                "hub_cpu_pct": round(cpu, 1), "hub_cpu_peak_pct": round(max(samples, default=cpu), 1),
                "hub_cpu_median_pct": round(statistics.median(samples), 1) if samples else None,
                "hub_cpu_idle_pct": round(idle_cpu, 1), "hub_rss_mb": round(hub.memory_info().rss / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="nodes per minute (1-1000)")
    parser.add_argument("--verify", type=float, default=5.0, help="verify window, seconds")
    parser.add_argument("--procs", type=int, default=2, help="simulator worker processes")
    parser.add_argument("--smoke", action="store_true", help="20 nodes, verify 1 s: checks that the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.nodes, args.verify = 20, 1.0
    with tempfile.TemporaryDirectory(prefix="fleetflow-bench-deploy-") as tmp:
        r = measure(Path(tmp), args.nodes, args.rate, args.verify, args.procs)
    print(f"{r['nodes']} simulated nodes on Mosquitto (online in {r['boot_s']} s), one deployment at "
          f"{r['rate_per_min']:g} nodes/min, verify {r['verify_s']:g} s, {args.procs} simulator processes\n")
    print(f"  ended {r['state']}: {r['succeeded']} of {r['nodes']} succeeded in {r['rollout_s']} s")
    print(f"  pace: {r['starts_per_min']} starts/min (asked {r['rate_per_min']:g}); least gap between starts "
          f"{r['min_start_gap_ms']} ms (spacing {r['spacing_ms']} ms)")
    print(f"  last node's success -> SUCCEEDED: {r['last_success_to_succeeded_journal_ms']} ms journaled, "
          f"{r['last_success_to_succeeded_shown_ms']} ms until the API showed it (polled every {POLL_S:g} s)")
    print(f"  hub CPU while it ran: {r['hub_cpu_pct']}% of one core (busiest second {r['hub_cpu_peak_pct']}%), "
          f"against {r['hub_cpu_idle_pct']}% idling with the same fleet; RSS {r['hub_rss_mb']} MB")
    print(json.dumps({"bench": "deploy", **r}))


if __name__ == "__main__":
    main()
