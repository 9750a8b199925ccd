"""Idle agent footprint (issue 17, item 7): RSS, USS and CPU of `fleetflow agent run` at heartbeat 5 s, telemetry
10 s, against a real hub and Mosquitto, side by side with an interpreter that only imports the agent's dependencies
(the floor no agent code can go under) and a bare interpreter; and the time from start to online.

    python bench/agent.py [--seconds 60] [--smoke]

Start to online: from spawning `fleetflow agent run` to its birth on the wire (timestamped by a separate recorder
process, bench/wirerecorder.py); the hub holds a node online from its birth on. Side by side: the time the floor
interpreter takes to start and import the dependencies. CPU: user + system time over the window, in % of one core.
Targets (issue 17): RSS <= 1.05x the floor, CPU <= 0.1% of one core. Prints a table, then one JSON line.

Our packages are compiled to bytecode first, as `pip install` leaves them on a device: a checkout run with
PYTHONDONTWRITEBYTECODE (this machine sets it) would otherwise compile every module of the agent at each start, which
costs the process about 1.4 MB of RSS that no installed agent carries (the dependencies come with bytecode already).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wirerecorder import WireRecorder  # noqa: E402

from tests.brokers import Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

FLEET = "footprint"
DEPENDENCIES = "import asyncio, ssl, sqlite3, aiomqtt, paho.mqtt.client, cbor2, nacl.signing, psutil, tinydb"
TARGET_RSS_RATIO, TARGET_CPU_PERCENT = 1.05, 0.1
SETTLE_S = 5.0  # after the birth, before the window opens: the first telemetry sample and its allocations


def footprint(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def start_seconds(code: str) -> float:
    """Wall time for an interpreter to start, run `code` and exit: the median of 5."""
    times = []
    for _ in range(5):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.monotonic() - started)
    return sorted(times)[2]


def compile_packages() -> None:
    """Bytecode for the packages the agent imports, next to their sources (`__pycache__`, ignored by git)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(ROOT / name) for name in ("agent", "protocols"))],
                   check=True, stdout=subprocess.DEVNULL)


def measure(tmp: Path, seconds: float, settle: float = SETTLE_S) -> dict[str, float]:
    broker = Broker("mosquitto", tmp / "broker").start()
    hub = HubProcess(broker, FLEET, tmp / "hub", args=("--auto-accept", "--log-level", "warning"))
    floor = subprocess.Popen([sys.executable, "-c", DEPENDENCIES + "; import time; time.sleep(3600)"])
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    recorder = None
    try:
        hub.start()
        recorder = WireRecorder(broker, f"fleetflow/v1/{FLEET}/node/+/birth", f"fleetflow/v1/{FLEET}/node/+/hb",
                                workdir=tmp).start()
        spawned = time.monotonic()
        agent = hub.agent("idle", "--heartbeat", "5", "--telemetry", "10", "--log-level", "warning")
        hub.wait_nodes(1, 120)
        time.sleep(settle)
        assert agent.proc is not None
        process = psutil.Process(agent.proc.pid)
        cpu_before, window_started = sum(process.cpu_times()[:2]), time.monotonic()
        peak = 0.0
        while time.monotonic() - window_started < seconds:
            peak = max(peak, process.memory_info().rss / 2**20)
            time.sleep(min(1.0, seconds / 4))
        cpu = (sum(process.cpu_times()[:2]) - cpu_before) / (time.monotonic() - window_started) * 100
        rss, uss = footprint(agent.proc.pid)
        floor_rss, floor_uss = footprint(floor.pid)
        bare_rss, bare_uss = footprint(bare.pid)
        records = recorder.stop(f"fleetflow/v1/{FLEET}/node/wire-recorder-end/hb")
        recorder = None
        births = [r.at for r in records if r.topic.endswith("/idle/birth")]
        heartbeats = sum(1 for r in records if r.topic.endswith("/idle/hb") and r.at >= window_started)
    finally:
        if recorder is not None and recorder.proc is not None:
            recorder.proc.kill()
        floor.kill()
        bare.kill()
        hub.stop()
        broker.stop()
    return {"seconds": seconds, "rss_mb": round(rss, 2), "uss_mb": round(uss, 2), "peak_rss_mb": round(max(peak, rss), 2),
            "floor_rss_mb": round(floor_rss, 2), "floor_uss_mb": round(floor_uss, 2),
            "bare_rss_mb": round(bare_rss, 2), "bare_uss_mb": round(bare_uss, 2),
            "rss_ratio": round(rss / floor_rss, 3), "cpu_percent": round(cpu, 3), "heartbeats": heartbeats,
            "start_to_online_ms": round((births[0] - spawned) * 1000, 1) if births else float("nan"),
            "floor_start_ms": round(start_seconds(DEPENDENCIES) * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle window")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.seconds = 2.0
    compile_packages()
    with tempfile.TemporaryDirectory() as tmp:
        f = measure(Path(tmp), args.seconds, 1.0 if args.smoke else SETTLE_S)  # a smoke run's figures are not judged
    print(f"idle agent over {f['seconds']:.0f} s (heartbeat 5 s, telemetry 10 s), real hub, Mosquitto on loopback; "
          "its modules imported from bytecode, as installed\n")
    print(f"{'process':34s} {'RSS MB':>8s} {'USS MB':>8s}")
    print(f"{'agent (fleetflow agent run)':34s} {f['rss_mb']:8.1f} {f['uss_mb']:8.1f}   peak RSS {f['peak_rss_mb']:.1f}")
    print(f"{'dependencies only (the floor)':34s} {f['floor_rss_mb']:8.1f} {f['floor_uss_mb']:8.1f}")
    print(f"{'bare python':34s} {f['bare_rss_mb']:8.1f} {f['bare_uss_mb']:8.1f}")
    print(f"\nagent / floor RSS = {f['rss_ratio']:.2f}x (target <= {TARGET_RSS_RATIO}x: "
          f"{'MET' if f['rss_ratio'] <= TARGET_RSS_RATIO else 'NOT MET'}); CPU {f['cpu_percent']:.3f}% of one core "
          f"(target <= {TARGET_CPU_PERCENT}%: {'MET' if f['cpu_percent'] <= TARGET_CPU_PERCENT else 'NOT MET'}); "
          f"{f['heartbeats']} heartbeats on the wire in the window")
    print(f"start to online (birth on the wire): {f['start_to_online_ms']:.0f} ms; the floor interpreter starts and "
          f"imports the dependencies in {f['floor_start_ms']:.0f} ms")
    print(json.dumps(f))
    due = int(args.seconds // 5) - 1  # heartbeats every 5 s: at least this many fall inside any window
    if f["heartbeats"] < due:
        print(f"FAILED: {f['heartbeats']} heartbeats on the wire, at least {due} due")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
