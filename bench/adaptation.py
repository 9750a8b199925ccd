"""Adaptation latency: from the first critical sample past the duration to the migrated step running elsewhere.

    python bench/adaptation.py [--runs 20] [--telemetry 0.2] [--duration 1]

A real hub (policy: `duration` seconds over critical -> unhealthy -> migrate) and two real agents whose reported
temperature the bench drives through their telemetry overlay files, on Mosquitto. Each round: a migratable step
starts on one node; that node's temperature goes critical; the hub's own clock gives the moment it declared the node
unhealthy (the first critical sample past the duration) and the moment the new attempt started on the other node.
Side by side: the telemetry interval, the floor on how late a hub can notice anything a node reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.brokers import Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

STEP = "name: hot\nsteps:\n  - id: long\n    uses: sleep\n    with: {seconds: 120}\n    migratable: true\n"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--telemetry", type=float, default=0.2)
    parser.add_argument("--duration", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker("mosquitto", tmp / "broker").start()
        policy = tmp / "policy.yaml"
        policy.write_text(f"duration: {args.duration}\nrecovery: 0.5\ncooldown: 0\n"
                          "limits: {max_migrations_per_run: 100, max_migrations_per_node: 1000}\n")
        hub = HubProcess(broker, "bench", tmp / "hub", args=("--auto-accept", "--policy", str(policy),
                                                             "--log-level", "warning")).start()
        files = {}
        try:
            for name in ("n1", "n2"):
                files[name] = tmp / f"{name}.json"
                files[name].write_text(json.dumps({"temp": 40}))
                hub.agent(name, "--telemetry", str(args.telemetry), "--telemetry-file", str(files[name]),
                          "--log-level", "warning")
            hub.wait_nodes(2)
            latencies = []
            for _ in range(args.runs):
                run_id = hub.submit(STEP)
                first = hub.wait(lambda: next((a for s in hub.get(f"/runs/{run_id}")["steps"] for a in s["attempts"]
                                               if a["state"] == "running"), None), 20, "running")
                hot = first["node"]
                heated_at = int(time.time() * 1000)  # the history is capped: select by time, not by position
                files[hot].write_text(json.dumps({"temp": 95}))
                moved = hub.wait(lambda: next((a for s in hub.get(f"/runs/{run_id}")["steps"] for a in s["attempts"]
                                               if a["state"] == "running" and a["node"] != hot), None), 30, "moved")
                declared = next(h for h in hub.get(f"/nodes/{hot}")["history"]
                                if h["kind"] == "health" and h["health"] == "unhealthy" and h["at"] >= heated_at)
                latencies.append(moved["started_at"] - declared["at"])
                files[hot].write_text(json.dumps({"temp": 40}))
                hub.post(f"/runs/{run_id}/cancel", {"reason": "bench round over"})
                hub.wait(lambda: hub.get(f"/nodes/{hot}")["health"] == "healthy", 20, "recovered")
                time.sleep(0.2)
        finally:
            hub.stop()
            broker.stop()
    print(f"{args.runs} rounds; telemetry every {args.telemetry:g} s; unhealthy after {args.duration:g} s over "
          f"critical; 2 agents, Mosquitto, real hub\n")
    print(f"unhealthy declared -> migrated step running on the other node: p50 {pct(latencies, 50):.0f} ms, "
          f"p99 {pct(latencies, 99):.0f} ms, max {max(latencies):.0f} ms, mean {statistics.mean(latencies):.0f} ms")
    print(f"telemetry interval (how late any report can be noticed): {args.telemetry * 1000:.0f} ms; "
          f"p50 / interval = {pct(latencies, 50) / (args.telemetry * 1000):.2f}x")


if __name__ == "__main__":
    main()
