"""How many simulated devices this machine sustains with Mosquitto, the hub and the simulator together, and how
fast failures are detected.

    python bench/sim.py [--sizes 250,500,1000,2000] [--seconds 30] [--procs 2] [--smoke]

For each fleet size: every device at heartbeat 5 s (telemetry 10 s) for `--seconds` after all are online; the
heartbeats the hub accepted against the number the devices were due to send, and the hub's ingest lag (receipt to
applied) p99 from its own histogram. The largest size with no heartbeat lost and lag p99 < 1 s is reported. Then,
on 50 devices: power cut -> Failed, and partition -> Failed at keepalive 5 s (side by side with 1.5 x keepalive).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.orchestra import Orchestra, plan  # noqa: E402
from sim.run import lag_p99  # noqa: E402
from tests.brokers import Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

MIX = {"rpi4": 35, "gateway": 25, "ipc": 15, "jetson": 10, "container": 15}


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def size_run(tmp: Path, devices: int, seconds: float, procs: int) -> dict[str, float]:
    broker = Broker("mosquitto", tmp / f"broker-{devices}").start()
    hub = HubProcess(broker, f"b{devices}", tmp / f"hub-{devices}", args=("--auto-accept", "--log-level", "warning"))
    hub.start()
    try:
        key = json.loads(subprocess.run([str(Path(sys.executable).parent / "fleetflow"), "hub", "identity", "--data",
                                         str(hub.data), "--json"], capture_output=True, text=True).stdout)["public_key"]
        orchestra = Orchestra(broker.url, hub.fleet, key, tmp / f"devices-{devices}",
                              plan(devices, MIX), procs=procs, heartbeat=5.0, telemetry=10.0)
        (tmp / f"devices-{devices}").mkdir()
        started = time.monotonic()
        await orchestra.start()
        try:
            while sum(1 for n in hub.get("/nodes") if n["liveness"] == "online") < devices:
                if time.monotonic() - started > 300:
                    return {"devices": devices, "online": False}
                await asyncio.sleep(1)
            boot = time.monotonic() - started
            before = hub.get("/metrics")
            procs = {"hub": psutil.Process(hub.proc.pid), "mosquitto": psutil.Process(broker.proc.pid)}  # type: ignore[union-attr]
            procs.update({f"sim worker {i}": psutil.Process(w.proc.pid) for i, w in enumerate(orchestra.workers)})
            cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            after = hub.get("/metrics")
            elapsed = time.monotonic() - t0
            cpu = {name: round((sum(p.cpu_times()[:2]) - cpu0[name]) / elapsed * 100) for name, p in procs.items()}
            hb = (metric(after, 'fleetflow_messages_total{type="hb"') - metric(before, 'fleetflow_messages_total{type="hb"'))
            due = devices * elapsed / 5.0
            return {"devices": devices, "online": True, "boot_s": round(boot, 1), "hb_accepted": hb,
                    "hb_due": round(due), "hb_ratio": hb / due, "lag_p99_s": lag_p99(after, before),
                    "failed_nodes": sum(1 for n in hub.get("/nodes") if n["liveness"] != "online"), "cpu": cpu}
        finally:
            await orchestra.stop()
    finally:
        hub.stop()
        broker.stop()


def detection(tmp: Path, devices: int = 50, seconds: int = 20) -> dict[str, float]:
    """Kills and partitions on `devices` devices through `fleetflow sim`, keepalive 5 s."""
    broker = Broker("mosquitto", tmp / "broker-detect").start()
    hub = HubProcess(broker, "detect", tmp / "hub-detect", args=("--auto-accept", "--log-level", "warning")).start()
    try:
        faults = tmp / "faults.yaml"
        faults.write_text("faults:\n  - {at: 1, kill: {count: 5}}\n  - {at: 2, partition: {count: 5, for: 15}}\n")
        report = tmp / "report.json"
        subprocess.run([str(Path(sys.executable).parent / "fleetflow"), "sim", "--broker", broker.url, "--fleet",
                        "detect", "--devices", str(devices), "--duration", str(seconds), "--faults", str(faults), "--keepalive", "5",
                        "--report", str(report), "--data", str(hub.data)], capture_output=True, timeout=600)
        return json.loads(report.read_text())["figures"]  # type: ignore[no-any-return]
    finally:
        hub.stop()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="250,500,1000,2000")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.seconds, args.procs = "10", 6.0, 1
    sizes: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"Mosquitto + hub + simulator ({args.procs} processes) on this machine; heartbeat 5 s, telemetry 10 s, "
              f"{args.seconds:g} s per size\n")
        print(f"{'devices':>8s} {'boot s':>7s} {'hb accepted/due':>16s} {'ratio':>6s} {'lag p99':>8s} {'not online':>10s}")
        best = 0
        for size in (int(s) for s in args.sizes.split(",")):
            r = asyncio.run(size_run(tmp, size, args.seconds, args.procs))
            sizes.append(r)
            if not r.get("online"):
                print(f"{size:8d} did not all come online within 300 s")
                break
            ok = r["hb_ratio"] >= 0.99 and r["lag_p99_s"] < 1 and r["failed_nodes"] == 0
            print(f"{size:8d} {r['boot_s']:7.1f} {r['hb_accepted']:7.0f}/{r['hb_due']:<8d} {r['hb_ratio']:6.2f} "
                  f"{r['lag_p99_s']:7.3f}s {r['failed_nodes']:10d}   CPU % of one core: "
                  + ", ".join(f"{k} {v}" for k, v in r["cpu"].items()))
            if not ok:
                break
            best = size
        print(f"\nlargest size sustained (every heartbeat accepted, hub lag p99 < 1 s): {best}")
        watched = 10 if args.smoke else 50
        figures = detection(tmp, watched, 12 if args.smoke else 20)
        print(f"\nfailure detection on {watched} devices (keepalive 5 s, so 1.5 x keepalive = 7.5 s):")
        print(f"  power cut -> Failed: {figures.get('detection_ms')} ms")
        print(f"  partition -> Failed: {figures.get('partition_detection_ms')} ms")
        print(json.dumps({"sizes": sizes, "largest_sustained": best, "detection_ms": figures.get("detection_ms"),
                          "partition_detection_ms": figures.get("partition_detection_ms")}))


if __name__ == "__main__":
    main()
