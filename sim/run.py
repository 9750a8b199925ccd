"""`fleetflow sim`: simulated devices against an external broker and hub, a fault timeline, a live table, the
checker, and a JSON report."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import nacl.signing
from rich.console import Console
from rich.live import Live
from rich.table import Table

from protocols import Heartbeat, Signer

from .checker import check
from .faults import Fault, FaultPlan
from .orchestra import Orchestra, plan

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
REFUSAL_REASONS = ("replayed", "unknown-key", "bad-signature", "wrong-topic", "wrong-sender")


def refused_total(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("fleetflow_rejected_total{") and any(f'reason="{r}"' in line for r in REFUSAL_REASONS):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _lag_buckets(metrics_text: str) -> list[tuple[float, float]]:
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith("fleetflow_ingest_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def lag_p99(metrics_text: str, since: str | None = None) -> float:
    """The hub's ingest lag p99 (seconds, the upper bound of its histogram bucket), over the messages received
    after the `since` scrape when one is given (the histogram itself counts from the hub's start)."""
    buckets = _lag_buckets(metrics_text)
    if since is not None:
        base = dict(_lag_buckets(since))
        buckets = [(le, count - base.get(le, 0.0)) for le, count in buckets]
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= 0.99 * total:
            return le
    return float("nan")


async def rogue(broker: str, fleet: str, forged: int, replayed: int) -> int:
    """An attacker on the broker: replays captured heartbeats and forges heartbeats under real node ids."""
    from urllib.parse import urlsplit

    parts = urlsplit(broker)
    captured: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883, identifier="rogue") as client:
        await client.subscribe(f"fleetflow/v1/{fleet}/node/+/hb", qos=0)
        try:
            async with asyncio.timeout(15):
                async for message in client.messages:
                    captured.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]
                    if len(captured) >= max(1, replayed):
                        break
        except TimeoutError:
            pass
        for topic, payload in captured[:replayed]:
            await client.publish(topic, payload, qos=1)
        key = nacl.signing.SigningKey.generate()
        nodes = sorted({t.split("/")[4] for t, _ in captured}) or ["nobody"]
        for i in range(forged):
            signer = Signer(key, fleet, nodes[i % len(nodes)], boot=10**6)
            out = signer.seal(Heartbeat(), int(time.time() * 1000))
            await client.publish(out.topic, out.payload, qos=1)
    return min(replayed, len(captured)) + forged


class Simulation:
    def __init__(self, api: Any, broker: str, fleet: str, devices: int, mix: dict[str, int], procs: int,
                 duration: float, faults: FaultPlan | None, keepalive: int, seed: int, console: Console) -> None:
        self.api, self.broker, self.fleet = api, broker, fleet
        self.devices, self.mix, self.procs, self.duration = devices, mix, procs, duration
        self.faults, self.keepalive, self.seed, self.console = faults or FaultPlan(), keepalive, seed, console
        self.applied: list[str] = []
        self.rng = random.Random(seed)
        self.injected = 0

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.api.call, method, path, **kwargs)

    async def metrics(self) -> str:
        response = await asyncio.to_thread(self.api.http.get, "/metrics")
        return str(response.text)

    def pick(self, spec: Any, alive: list[str]) -> list[str]:
        if spec.nodes:
            return [n for n in spec.nodes if n in alive]
        count = spec.count if spec.count is not None else max(1, round(len(alive) * spec.percent / 100))
        return self.rng.sample(alive, k=min(count, len(alive)))

    async def apply(self, fault: Fault, orchestra: Orchestra, alive: list[str]) -> None:
        kind = fault.kind
        spec = getattr(fault, kind)
        if kind == "rogue":
            self.injected += await rogue(self.broker, self.fleet, spec.forged, spec.replayed)
            self.applied.append(f"rogue: {spec.forged} forged, {spec.replayed} replayed")
            return
        nodes = self.pick(spec, alive)
        command: dict[str, Any] = {"cmd": kind}
        if kind == "partition":
            command["for"] = spec.for_
        elif kind == "spike":
            command.update(metrics=spec.metrics, **{"for": spec.for_})
        elif kind == "slow":
            command["factor"] = spec.factor
        elif kind == "skew":
            command["seconds"] = spec.seconds
        elif kind == "flap":
            command.update(times=spec.times, every=spec.every)
        for node in nodes:
            await orchestra.fault(node, command)
            if kind in ("kill", "partition", "flap"):
                alive.remove(node)  # later faults pick among devices that are still up
        self.applied.append(f"{kind}: {', '.join(nodes)}")

    def table(self, orchestra: Orchestra, rate: float, elapsed: float, runs: dict[str, int], lag: float = 0.0
              ) -> Table:
        table = Table(title=f"fleetflow sim - {elapsed:.0f}/{self.duration:.0f} s")
        table.add_column("what")
        table.add_column("now")
        table.add_row("devices connected", f"{orchestra.connected}/{self.devices}")
        table.add_row("messages/s at the hub", f"{rate:.0f}")
        table.add_row("hub ingest lag p99", f"<= {lag:g} s")
        table.add_row("results waiting for acks", str(orchestra.outbox))
        table.add_row("runs", ", ".join(f"{k} {v}" for k, v in sorted(runs.items())) or "-")
        table.add_row("faults applied", "; ".join(self.applied[-4:]) or "-")
        return table

    async def run(self, report: Path | None) -> int:
        health = await self.call("GET", "/health")
        if health.get("fleet") != self.fleet:
            self.console.print(f"[red]error: the hub serves fleet {health.get('fleet')!r}, not {self.fleet!r}[/red]")
            return 2
        work = Path(tempfile.mkdtemp(prefix="fleetflow-sim-"))
        relay = any(f.kind == "partition" for f in self.faults.faults)
        orchestra = Orchestra(self.broker, self.fleet, health["public_key"], work,
                              [{**d, "node_id": f"{self.fleet}-{d['node_id']}"[:64]}
                               for d in plan(self.devices, self.mix)],
                              procs=self.procs, seed=self.seed, relay=relay, keepalive=self.keepalive)
        await orchestra.start()
        try:
            return await self._drive(orchestra, report, work)
        finally:
            await orchestra.stop()

    async def _drive(self, orchestra: Orchestra, report: Path | None, work: Path) -> int:
        refused_before = refused_total(await self.metrics())
        started = time.monotonic()
        ids = {d["node_id"] for d in orchestra.devices}
        while True:
            nodes = await self.call("GET", "/nodes")
            online = [n["id"] for n in nodes if n["id"] in ids and n["liveness"] == "online"]
            if len(online) == self.devices:
                break
            if time.monotonic() - started > 120:
                self.console.print(f"[red]only {len(online)}/{self.devices} devices came online in 120 s[/red]")
                return 1
            await asyncio.sleep(0.5)
        boot_s = time.monotonic() - started
        workflow = (SCENARIOS / "temperature_monitoring.yaml").read_text()
        run_ids = [(await self.call("POST", "/runs", json={"workflow": workflow}))["id"] for _ in range(3)]
        pending = sorted(self.faults.faults, key=lambda f: f.at)
        alive = sorted(ids)
        t0 = time.monotonic()
        last_msgs, last_t, rate = None, t0, 0.0
        runs: dict[str, int] = {}
        with Live(self.table(orchestra, rate, 0, runs), console=self.console, refresh_per_second=2) as live:
            while time.monotonic() - t0 < self.duration:
                elapsed = time.monotonic() - t0
                while pending and pending[0].at <= elapsed:
                    await self.apply(pending.pop(0), orchestra, alive)
                text = await self.metrics()
                msgs = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("fleetflow_messages_total{"))
                now = time.monotonic()
                if last_msgs is not None:
                    rate = (msgs - last_msgs) / max(1e-6, now - last_t)
                last_msgs, last_t = msgs, now
                listed = await self.call("GET", "/runs")
                runs = {}
                for r in listed:
                    runs[r["state"]] = runs.get(r["state"], 0) + 1
                live.update(self.table(orchestra, rate, elapsed, runs, lag_p99(text)))
                await asyncio.sleep(1.0)
            for fault in pending:  # anything scheduled past the duration still happens before the check
                await self.apply(fault, orchestra, alive)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [(await self.call("GET", f"/runs/{r}"))["state"] for r in run_ids]
            if all(s in ("succeeded", "failed", "cancelled", "timed_out") for s in states):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # let the last acknowledgements empty the outboxes
        refused = refused_total(await self.metrics()) - refused_before
        verdict = await asyncio.to_thread(
            check, lambda path: self.api.call("GET", path), orchestra.killed, orchestra.outbox, self.injected,
            int(refused), orchestra.partitioned)
        self.console.print(verdict.render())
        if report is not None:
            report.write_text(json.dumps({
                "devices": self.devices, "mix": self.mix, "procs": self.procs, "duration_s": self.duration,
                "boot_s": round(boot_s, 2), "faults": self.applied, "killed": orchestra.killed,
                "partitioned": orchestra.partitioned, "injected_bad_messages": self.injected,
                "refused_bad_messages": int(refused), "figures": verdict.figures,
                "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in verdict.checks],
                "passed": verdict.passed, "work_dir": str(work)}, indent=2))
        return 0 if verdict.passed else 1
