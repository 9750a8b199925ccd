"""Idle agent footprint: RSS, USS and CPU over a window at H=5 s, T=10 s against a real Mosquitto, side by side with
an interpreter that only imports the agent's dependencies (the floor no agent code can go under) and bare Python.

    python bench/agent.py [--seconds 60]

Target (issue 4): RSS <= 25 MB, CPU <= 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hubdouble import HubDouble  # noqa: E402

from tests.agentprocess import AgentProcess  # noqa: E402
from tests.brokers import Broker  # noqa: E402

FLOOR = ("import asyncio, ssl, sqlite3, aiomqtt, paho.mqtt.client, cbor2, nacl.signing, psutil, tinydb; "
         "import time; time.sleep(3600)")


def footprint(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker("mosquitto", work / "broker").start()
        floor = subprocess.Popen([sys.executable, "-c", FLOOR])
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        try:
            result = asyncio.run(measure(broker, work, args.seconds))
            floor_rss, floor_uss = footprint(floor.pid)
            bare_rss, bare_uss = footprint(bare.pid)
        finally:
            floor.kill()
            bare.kill()
            broker.stop()
    rss, uss, peak, cpu, hb = result
    print(f"idle agent over {args.seconds:.0f} s (heartbeat 5 s, telemetry 10 s, Mosquitto on loopback)\n")
    print(f"{'process':34s} {'RSS MB':>8s} {'USS MB':>8s}")
    print(f"{'agent (fleetflow agent run)':34s} {rss:8.1f} {uss:8.1f}   peak RSS {peak:.1f}")
    print(f"{'dependencies only (the floor)':34s} {floor_rss:8.1f} {floor_uss:8.1f}")
    print(f"{'bare python':34s} {bare_rss:8.1f} {bare_uss:8.1f}")
    print(f"\nagent / floor RSS = {rss / floor_rss:.2f}x; agent CPU = {cpu:.2f}% of one core; heartbeats seen: {hb}")
    print(f"targets: RSS <= 25 MB {'met' if rss <= 25 else 'NOT met'}, CPU <= 1% {'met' if cpu <= 1 else 'NOT met'}")


async def measure(broker: Broker, work: Path, seconds: float) -> tuple[float, float, float, float, int]:
    async with HubDouble(broker, "bench") as hub:
        agent = AgentProcess(broker, "bench", "idle", work / "idle" / "data", hub.public_key_hex,
                             ("--heartbeat", "5", "--telemetry", "10", "--log-level", "warning")).start()
        try:
            await hub.wait_for(lambda: hub.of("birth", "idle"), 30, "birth")
            await asyncio.sleep(2.0)  # let start-up settle before the window opens
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            start_cpu = sum(proc.cpu_times()[:2])
            start = time.monotonic()
            peak = 0.0
            while time.monotonic() - start < seconds:
                peak = max(peak, proc.memory_info().rss / 2**20)
                await asyncio.sleep(1.0)
            cpu = (sum(proc.cpu_times()[:2]) - start_cpu) / (time.monotonic() - start) * 100
            rss, uss = footprint(agent.proc.pid)
            return rss, uss, max(peak, rss), cpu, len(hub.of("hb", "idle"))
        finally:
            agent.stop()


if __name__ == "__main__":
    main()
