"""`fleetflow demo`: an embedded amqtt broker, a hub with auto-accept, simulated devices, the scenarios, faults
(a few devices lose power, one board overheats), a live table, and the checker's verdict. Exit 0 when it passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from hub.commands import start_embedded_broker
from hub.health import Policy
from hub.service import Hub, HubConfig
from hub.workflow import load_workflow

from .checker import Verdict, check
from .orchestra import Orchestra, plan

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
DEMO_MIX = {"rpi4": 35, "gateway": 25, "ipc": 15, "jetson": 10, "container": 15}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, devices: int, broker: str | None, keep_running: bool, seed: int, console: Console,
                 timeout: float = 150.0, restart_broker: bool = False) -> None:
        self.restart_broker = restart_broker
        self.devices, self.broker, self.keep_running, self.seed = devices, broker, keep_running, seed
        self.console, self.timeout = console, timeout
        self.started = time.monotonic()
        self.phase = "starting"
        self.faults: list[str] = []
        self.hub: Hub | None = None
        self.orchestra: Orchestra | None = None
        self.embedded: Any = None

    def _messages(self) -> float:
        assert self.hub is not None
        return sum(s.value for m in self.hub.metrics.messages.collect() for s in m.samples
                   if s.name.endswith("_total"))

    def table(self, rate: float) -> Table:
        assert self.hub is not None and self.orchestra is not None
        core = self.hub.core
        table = Table(title=f"fleetflow demo - {self.phase} - {time.monotonic() - self.started:.0f} s")
        table.add_column("what")
        table.add_column("now")

        def count(values: Any) -> str:
            counts: dict[str, int] = {}
            for value in values:
                counts[value] = counts.get(value, 0) + 1
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"

        table.add_row("devices connected", f"{self.orchestra.connected}/{self.devices}")
        table.add_row("nodes by liveness", count(n.state for n in core.nodes.values()))
        table.add_row("nodes by health", count(n.health for n in core.nodes.values()))
        table.add_row("runs by state", count([r.state for r in core.runs.values()] +
                                             [a[2] for a in core.archived.values()]))
        migrations = sum(1 for a in core.attempts.values() if (a.reason or "").startswith("migrated"))
        table.add_row("migrations", str(migrations))
        table.add_row("messages/s at the hub", f"{rate:.0f}")
        table.add_row("faults applied", "; ".join(self.faults) or "-")
        return table

    async def run(self) -> int:
        work = Path(tempfile.mkdtemp(prefix="fleetflow-demo-"))
        # Hub and broker logs go to a file: the console belongs to the live table.
        handler = logging.FileHandler(work / "hub.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        self.console.print(f"work directory: {work}")
        self.embedded = None
        if self.broker is None:
            self.broker = f"mqtt://127.0.0.1:{free_port()}"
            self.embedded = await start_embedded_broker(self.broker)
        policy = Policy(duration=2, recovery=10, cooldown=2)
        self.hub = hub = Hub(HubConfig(self.broker, "demo", work / "hub", api_port=0, auto_accept=True, policy=policy))
        hub_task = asyncio.create_task(hub.run())
        try:
            await self._until(lambda: hub.session is not None and hub.api_url is not None, 20, "the hub")
            self.orchestra = Orchestra(self.broker, "demo", hub.public_key.hex(), work,
                                       plan(self.devices, DEMO_MIX), procs=2, seed=self.seed,
                                       heartbeat=2.0, telemetry=1.0)
            await self.orchestra.start()
            verdict = await self._live(work)
            # Plain lines after the table: they must not wrap, scripts read them.
            self.console.print("faults applied: " + "; ".join(self.faults), soft_wrap=True)
            self.console.print(verdict.render(), soft_wrap=True)
            if self.keep_running:
                self.console.print(f"\nThe hub keeps running. Try: fleetflow nodes list --data {work / 'hub'}\n"
                                   f"                          fleetflow run list --data {work / 'hub'}\n"
                                   "Stop with Ctrl-C.")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
            return 0 if verdict.passed else 1
        finally:
            if self.orchestra is not None:
                await self.orchestra.stop()
            hub.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hub_task, 15)
            if self.embedded is not None:
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(self.embedded.shutdown(), 10)

    async def _until(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo waited {timeout:g} s for {what}")
            await asyncio.sleep(0.1)

    async def _live(self, work: Path) -> Verdict:
        hub, orchestra = self.hub, self.orchestra
        assert hub is not None and orchestra is not None
        last = (time.monotonic(), self._messages())
        rate = 0.0
        rng = random.Random(self.seed)
        with Live(self.table(rate), console=self.console, refresh_per_second=4, transient=False) as live:

            async def tick() -> None:
                nonlocal last, rate
                await asyncio.sleep(0.5)
                now, total = time.monotonic(), self._messages()
                rate = (total - last[1]) / max(1e-6, now - last[0])
                last = (now, total)
                live.update(self.table(rate))

            self.phase = "devices booting"
            deadline = time.monotonic() + 90
            while sum(1 for n in hub.core.nodes.values() if n.state == "online") < self.devices:
                if time.monotonic() > deadline:
                    raise TimeoutError("devices did not all come online within 90 s")
                await tick()
            self.phase = "running scenarios"
            runs = [await self._submit("temperature_monitoring.yaml") for _ in range(5)]
            runs.append(await self._submit("rolling_update.yaml"))
            thermal = await self._submit("thermal_runaway.yaml")
            runs.append(thermal)
            hot = None
            while hot is None:
                run = hub.core.runs[thermal]
                step = run.steps["inference"]
                attempt = hub.core.attempts[step.attempts[-1]] if step.attempts else None
                if attempt is not None and attempt.state == "running":
                    hot = attempt.node
                await tick()
            self.phase = "faults"
            await orchestra.heat(hot, 95.0)
            self.faults.append(f"{hot} overheats (95 C)")
            # One fault at a time: the migration is watched for before power cuts and the broker restart shake
            # the fleet, so each outcome has a single cause.
            watch_until = time.monotonic() + 30
            while time.monotonic() < watch_until and not any(
                    (hub.core.attempts[a].reason or "").startswith("migrated")
                    for a in hub.core.runs[thermal].steps["inference"].attempts):
                await tick()
            busy = {a.node for a in hub.core.live_attempts()} | {hot}
            candidates = sorted(n for n, x in hub.core.nodes.items()
                                if x.profile in ("rpi4", "container", "jetson") and n not in busy)
            victims = rng.sample(candidates, k=min(3, len(candidates)))
            await orchestra.kill(victims)
            self.faults.append(f"power cut: {', '.join(victims)}")
            if self.restart_broker and self.embedded is not None:  # the demo manages the broker, so it can restart it
                await tick()
                await self.embedded.shutdown()
                self.faults.append("broker down")
                for _ in range(4):
                    await tick()
                self.embedded = await start_embedded_broker(self.broker)
                self.faults[-1] = "broker restarted after 2 s"
            self.phase = "waiting for every run to end"
            deadline = time.monotonic() + self.timeout
            while (any(hub.core.runs[r].state not in ("succeeded", "failed", "cancelled", "timed_out")
                       for r in runs if r in hub.core.runs)
                   or any(hub.core.nodes[v].state not in ("failed", "offline") for v in victims)):
                if time.monotonic() > deadline:
                    break
                await tick()
            await asyncio.sleep(1.5)  # the last acknowledgements reach the devices' outboxes
            self.phase = "checking"
            await tick()
        # The checker reads the API like any client; it runs in a thread so this loop (hub, API, embedded broker)
        # keeps serving while it reads.
        verdict = await asyncio.to_thread(check_api, hub.api_url or "", hub.token, orchestra.killed, orchestra.outbox)
        attempts = [hub.core.attempts[a] for a in hub.core.runs[thermal].steps["inference"].attempts]
        moved = [a for a in attempts if (a.reason or "").startswith("migrated")]
        finished_elsewhere = attempts[-1].state == "succeeded" and attempts[-1].node != hot
        verdict.add("thermal runaway ended in migration", bool(moved) and finished_elsewhere,
                    f"{hot} overheated; its step moved to {attempts[-1].node}" if moved else
                    f"{hot} overheated but its step was not migrated")
        return verdict

    async def _submit(self, name: str) -> str:
        assert self.hub is not None
        run_id, _ = await self.hub.submit(load_workflow(SCENARIOS / name), {}, None)
        return run_id


def check_api(url: str, token: str, killed: dict[str, int], outbox: int) -> Verdict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        return check(lambda path: client.get(path).raise_for_status().json(), killed, outbox)


def run_demo(devices: int = 100, broker: str | None = None, keep_running: bool = False, seed: int = 7,
             restart_broker: bool = False) -> int:
    console = Console()
    try:
        return asyncio.run(Demo(devices, broker, keep_running, seed, console, restart_broker=restart_broker).run())
    except TimeoutError as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        return 1
