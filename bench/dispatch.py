"""Dispatch through the real hub: submit -> result accepted, at several offered rates (issue 17, item 4).

    python bench/dispatch.py [--rates 100,500,1000] [--seconds 10] [--steps-per-run 10] [--profile-hub OUT.prof]

A real `fleetflow hub run` (journal fsync'd, core, scheduler, HTTP API), 4 real `fleetflow agent run` processes and
a real Mosquitto. The bench submits runs of `--steps-per-run` independent `echo` steps through the API at a steady
rate (due times are absolute, so a slow answer does not lower it), `rate / steps-per-run` runs per second.

Latency of a step = from the moment the run's POST is due (the bench sends it then, unless its own loop is behind:
that wait counts too) to the moment the hub's acknowledgement of that step's result appears on the wire. The hub
acknowledges a result only once it is in its journal (fsync'd) and applied, so the ack is "result accepted by the
hub". The ack, the assignment and the result are timestamped by a separate recorder process on the broker
(bench/wirerecorder.py), never read from the hub's own figures. Every step submitted is counted: one whose accepted
result is not on the wire once every run has ended (or after a bound) fails the bench (exit 1), as does a run that did
not succeed.

Side by side in the same run: a bare MQTT round trip (QoS 1 there and back, no signing, no agent, no hub) through
the same broker, the floor any dispatch adds to. Target (issue 17): p50 < 10 ms and p99 < 50 ms at 1,000 steps/s.
Prints a table, then one JSON line with every figure (bench/run_all.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from wirerecorder import Record, WireRecorder  # noqa: E402

from tests.brokers import HOST, Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

FLEET = "dispatch"
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
TARGET_P50_MS, TARGET_P99_MS, TARGET_RATE = 10.0, 50.0, 1000.0
SETTLE_S = 120.0  # after the last submission, how long every step gets to be accepted


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


async def bare_round_trip(broker: Broker, n: int) -> list[float]:
    """QoS 1 publish -> a subscriber that publishes it back -> received: ms each, one at a time."""
    out: list[float] = []
    async with aiomqtt.Client(HOST, broker.port, identifier="bench-echo", socket_options=NO_DELAY) as echo, \
            aiomqtt.Client(HOST, broker.port, identifier="bench-ping", socket_options=NO_DELAY) as ping:
        await echo.subscribe("bench/ping", qos=1)
        await ping.subscribe("bench/pong", qos=1)

        async def reflect() -> None:
            async for message in echo.messages:
                await echo.publish("bench/pong", message.payload, qos=1)

        replies: asyncio.Queue[object] = asyncio.Queue()

        async def collect() -> None:
            async for message in ping.messages:
                replies.put_nowait(message)

        tasks = [asyncio.create_task(reflect()), asyncio.create_task(collect())]
        for _ in range(n):
            started = time.perf_counter()
            await ping.publish("bench/ping", b"x" * 200, qos=1)
            await asyncio.wait_for(replies.get(), 10)
            out.append((time.perf_counter() - started) * 1000)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


def workflow(steps: int) -> dict[str, Any]:
    return {"name": "dispatch", "steps": [{"id": f"s{j}", "uses": "echo", "with": {"j": j}} for j in range(steps)]}


@dataclass
class Offered:
    rate: float
    steps_per_run: int
    submitted: dict[str, float] = field(default_factory=dict)  # run id -> monotonic time its POST was due
    refused: int = 0
    offered_for: float = 0.0


async def offer(hub: HubProcess, rate: float, seconds: float, steps_per_run: int) -> Offered:
    """POST runs at `rate` steps per second for `seconds`; due times are absolute."""
    got = Offered(rate, steps_per_run)
    runs = max(1, round(rate * seconds / steps_per_run))
    body = {"workflow": workflow(steps_per_run), "inputs": {}}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=hub.url, headers={"Authorization": f"Bearer {hub.token}"}, timeout=120,
                                 limits=limits) as client:
        async def post(sent: float, key: str) -> None:
            why = ""
            for _ in range(3):
                try:
                    response = await client.post("/runs", json=body, headers={"Idempotency-Key": key})
                except httpx.TransportError as exc:
                    # A kept-alive connection the server closed as the request went out: sent again under the same
                    # idempotency key, the run is made once (the hub answers with the first one if it was made).
                    why = f"{type(exc).__name__}: {exc}"
                    continue
                if response.status_code in (200, 201):
                    got.submitted[response.json()["id"]] = sent
                    return
                why = f"{response.status_code} {response.text[:300]}"
                break
            got.refused += 1  # counted: its steps are missing
            if got.refused == 1:
                print(f"a submission failed: {why}", file=sys.stderr)

        tasks = []
        started = time.monotonic()
        for i in range(runs):
            delay = started + i * steps_per_run / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Latency counts from when the run was due, not from when this loop got to it: a client that falls
            # behind does not hide the wait it caused (no coordinated omission).
            tasks.append(asyncio.create_task(post(started + i * steps_per_run / rate, f"dispatch-{rate:g}-{started}-{i}")))
        got.offered_for = time.monotonic() - started
        await asyncio.gather(*tasks)
    return got


def wait_idle(hub: HubProcess, timeout: float) -> bool:
    """True once the hub has no run active and nothing queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = hub.get("/health")
        if health["active_runs"] == 0 and health["queue"] == 0:
            return True
        time.sleep(0.2)
    return False


class CpuShare:
    """CPU seconds each process (and this bench) used while the block ran; agents summed."""

    def __init__(self, processes: dict[str, Any]) -> None:
        self.processes = {name: psutil.Process(p.pid) for name, p in processes.items() if p is not None}
        self.processes["bench"] = psutil.Process()
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def __enter__(self) -> Self:
        self._started, self._before = time.monotonic(), {n: self._used(p) for n, p in self.processes.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = {n: self._used(p) - self._before[n] for n, p in self.processes.items()}
        agents = [n for n in self.seconds if n.startswith("agent ")]
        self.seconds["agents"] = sum(self.seconds.pop(n) for n in agents)


@dataclass
class StepTimes:
    submitted: float
    assigned: float | None = None
    result: float | None = None
    accepted: float | None = None


def step_times(records: Iterable[Record], submitted: dict[str, float]) -> dict[tuple[str, str], StepTimes]:
    """(run, step) -> the wire times of its first assignment, and of its first result whose ack the hub sent."""
    steps: dict[tuple[str, str], StepTimes] = {}
    results: dict[tuple[str, int], tuple[tuple[str, str], float]] = {}  # (node, eid) -> (run, step), seen at
    for record in records:
        f = record.fields
        kind = f.get("type")
        if kind == "assign" and f.get("run") in submitted:
            times = steps.setdefault((f["run"], f["step"]), StepTimes(submitted[f["run"]]))
            times.assigned = times.assigned or record.at
        elif kind == "result" and f.get("run") in submitted:
            results.setdefault((f["src"], f["eid"]), ((f["run"], f["step"]), record.at))
        elif kind == "ack":
            for eid in f.get("eids", ()):
                found = results.get((f["dst"], eid))
                if found is None:
                    continue
                key, result_at = found
                times = steps.setdefault(key, StepTimes(submitted[key[0]]))
                if times.accepted is None:
                    times.result, times.accepted = result_at, record.at
    return steps


def summarise(offered: Offered, steps: dict[tuple[str, str], StepTimes]) -> dict[str, Any]:
    expected = (len(offered.submitted) + offered.refused) * offered.steps_per_run  # a refused run's steps count too
    done = [t for key, t in steps.items() if key[0] in offered.submitted and t.accepted is not None]
    total = [(t.accepted - t.submitted) * 1000 for t in done if t.accepted is not None]
    placed = [(t.assigned - t.submitted) * 1000 for t in done if t.assigned is not None]
    ran = [(t.result - t.assigned) * 1000 for t in done if t.result is not None and t.assigned is not None]
    acked = [(t.accepted - t.result) * 1000 for t in done if t.accepted is not None and t.result is not None]
    return {"offered_per_s": offered.rate, "submitted_steps": expected, "accepted_steps": len(done),
            "missing_steps": expected - len(done), "refused_runs": offered.refused,
            # steps accepted per second, from the first run due to the last result accepted
            "achieved_per_s": round(len(done) / max(max((t.accepted for t in done if t.accepted is not None),
                                                        default=0.0) - min((t.submitted for t in done), default=0.0),
                                                    1e-9), 1),
            "p50_ms": round(pct(total, 50), 2), "p99_ms": round(pct(total, 99), 2), "max_ms": round(max(total, default=0), 2),
            "submit_to_assign_p50_ms": round(pct(placed, 50), 2), "submit_to_assign_p99_ms": round(pct(placed, 99), 2),
            "assign_to_result_p50_ms": round(pct(ran, 50), 2), "assign_to_result_p99_ms": round(pct(ran, 99), 2),
            "result_to_ack_p50_ms": round(pct(acked, 50), 2), "result_to_ack_p99_ms": round(pct(acked, 99), 2)}


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = Broker("mosquitto", tmp / "broker").start()
    command = ((sys.executable, "-m", "cProfile", "-o", str(args.profile_hub), str(Path(sys.executable).parent / "fleetflow"))
               if args.profile_hub else HubProcess.command)

    hub = HubProcess(broker, FLEET, tmp / "hub", args=("--auto-accept", "--log-level", "warning"), command=command)
    recorder: WireRecorder | None = None
    try:
        bare = await bare_round_trip(broker, args.bare)
        hub.start()
        for i in range(args.agents):
            hub.agent(f"a{i}", "--heartbeat", "5", "--telemetry", "30", "--max-concurrent", "256",
                      "--log-level", "warning")
        hub.wait_nodes(args.agents, 120)
        await offer(hub, 20, 1, args.steps_per_run)  # warm-up: connections, caches, first placements
        if not wait_idle(hub, SETTLE_S):
            raise SystemExit("warm-up runs did not end")
        recorder = WireRecorder(broker, f"fleetflow/v1/{FLEET}/node/+/cmd", f"fleetflow/v1/{FLEET}/node/+/evt",
                                workdir=tmp).start()
        offers = []
        processes = {"hub": hub.proc, "mosquitto": broker.proc, "recorder": recorder.proc,
                     **{f"agent {a.node_id}": a.proc for a in hub.agents}}
        cpu: list[dict[str, float]] = []
        for rate in args.rates:
            with CpuShare(processes) as share:
                offers.append(await offer(hub, rate, args.seconds, args.steps_per_run))
                settled = wait_idle(hub, SETTLE_S)
            cpu.append(share.seconds)
            print(f"offered {rate:g} steps/s: {'all ended' if settled else f'not ended after {SETTLE_S:g} s'}",
                  file=sys.stderr)
        records = recorder.stop(f"fleetflow/v1/{FLEET}/node/wire-recorder-end/evt")
        recorder = None
        submitted = {run: at for o in offers for run, at in o.submitted.items()}
        steps = step_times(records, submitted)
        runs = hub.get(f"/runs?limit={len(submitted) + 1000}")
        not_succeeded = sum(1 for r in runs if r["id"] in submitted and r["state"] != "succeeded")
        return {"agents": args.agents, "steps_per_run": args.steps_per_run, "seconds": args.seconds,
                "bare_p50_ms": round(statistics.median(bare), 3), "bare_p99_ms": round(pct(bare, 99), 3),
                "runs_not_succeeded": not_succeeded,
                "rates": [{**summarise(o, steps),
                           "cpu_ms_per_step": {k: round(v * 1000 / max(1, len(o.submitted) * o.steps_per_run), 3)
                                               for k, v in c.items()}} for o, c in zip(offers, cpu)]}
    finally:
        if recorder is not None and recorder.proc is not None:
            recorder.proc.kill()
        hub.stop()
        broker.stop()


def report(figures: dict[str, Any]) -> bool:
    print(f"{figures['agents']} agent processes, real hub (journal fsync'd), Mosquitto on loopback; runs of "
          f"{figures['steps_per_run']} echo steps; latency = POST due -> the hub's ack of the result on the wire\n")
    print(f"bare MQTT round trip (QoS 1 there and back): p50 {figures['bare_p50_ms']:.2f} ms, "
          f"p99 {figures['bare_p99_ms']:.2f} ms\n")
    print(f"{'offered/s':>9s} {'done/s':>7s} {'steps':>6s} {'missing':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'max ms':>7s}   p50/p99 ms of: submit->assign, assign->result, result->ack")
    ok = figures["runs_not_succeeded"] == 0
    for r in figures["rates"]:
        print(f"{r['offered_per_s']:9.0f} {r['achieved_per_s']:7.0f} {r['submitted_steps']:6d} {r['missing_steps']:7d} "
              f"{r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['max_ms']:7.1f}   "
              f"{r['submit_to_assign_p50_ms']:.1f}/{r['submit_to_assign_p99_ms']:.1f}, "
              f"{r['assign_to_result_p50_ms']:.1f}/{r['assign_to_result_p99_ms']:.1f}, "
              f"{r['result_to_ack_p50_ms']:.1f}/{r['result_to_ack_p99_ms']:.1f}")
        ok = ok and r["missing_steps"] == 0 and r["refused_runs"] == 0
    print(f"\nCPU ms per step (all a rate's CPU, submitting and settling, over its steps; {psutil.cpu_count()} cores "
          "give 1000 steps/s 2 ms of CPU per step in all):")
    for r in figures["rates"]:
        shares = r["cpu_ms_per_step"]
        print(f"{r['offered_per_s']:9.0f} total {sum(shares.values()):.2f}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    top = max(figures["rates"], key=lambda r: r["offered_per_s"])
    if top["offered_per_s"] >= TARGET_RATE:
        met = top["p50_ms"] < TARGET_P50_MS and top["p99_ms"] < TARGET_P99_MS
        print(f"\ntarget at {TARGET_RATE:g} steps/s: p50 < {TARGET_P50_MS:g} ms and p99 < {TARGET_P99_MS:g} ms: "
              f"{'MET' if met else 'NOT MET'}")
    if not ok:
        print(f"FAILED: {figures['runs_not_succeeded']} run(s) did not succeed; "
              f"{sum(r['missing_steps'] for r in figures['rates'])} step(s) with no accepted result on the wire; "
              f"{sum(r['refused_runs'] for r in figures['rates'])} submission(s) refused")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="submitting, per offered rate")
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[100.0, 500.0, 1000.0],
                        help="offered steps per second, comma-separated")
    parser.add_argument("--steps-per-run", type=int, default=10)
    parser.add_argument("--bare", type=int, default=500, help="bare MQTT round trips for the reference")
    parser.add_argument("--profile-hub", type=Path, help="run the hub under cProfile, writing this file at its stop")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.seconds, args.rates, args.steps_per_run, args.bare = 2, 1.0, [20.0], 2, 50
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(measure(args, Path(tmp)))
    ok = report(figures)
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
