"""`fleetflow demo`: an embedded amqtt broker (a child process: sim/broker.py), a hub with auto-accept in this process,
simulated devices, the sample workflows, batch jobs that keep devices at work, and a fault timeline (a board overheats
while it runs a long migratable step; once the step has moved, three devices lose power while they run steps; then,
while devices run steps, the broker restarts, unless --no-broker-restart), driven like `fleetflow sim` by
sim/driver.py and judged by the history checker. Exit 0 when it passes. Every wait is bounded: the demo ends, and says
what it waited for, whatever the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from agent.runtime.timeouts import within
from hub.client import Client
from hub.health import Policy
from hub.journal_commands import JOURNAL_FILE
from hub.keys import TOKEN_FILE
from hub.service import Hub, HubConfig

from .broker import EmbeddedBroker
from .driver import Driver
from .faults import (
    AllOf,
    BrokerRestart,
    Busy,
    Heat,
    Kill,
    KillsLanded,
    RunEnded,
    RunningStep,
    Scheduled,
    StepMigrated,
    Working,
)
from .hub_api import HubApi, WaitTimeout
from .orchestra import Orchestra, plan
from .scenario import Scenario, StepMigratedOff, Submission, Workload

DEMO_MIX = {"rpi4": 35, "gateway": 25, "ipc": 15, "jetson": 10, "container": 15}
FLEET = "demo"
HUB_STOP_S = 15.0
POWER_CUTS = 3
# Batch jobs (a 5 s crunch each) submitted per second, whatever the fleet's size, for WORK_S seconds after the
# scenario's runs: several devices are at work whenever a power cut or the broker restart comes.
WORK_RUNS_PER_S = 1.0
WORK_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_scenario(restart_broker: bool, timeout: float, devices: int) -> Scenario:
    inference = RunningStep("thermal", "inference")
    timeline = [
        Scheduled(Heat(inference, temp=95.0), wait_s=60),
        # One fault at a time: the migration is watched for before power cuts and the broker restart shake the
        # fleet, so each outcome has a single cause. The power cuts wait for the rolling update to end too: its
        # for_each pins a step to every gateway, and a step pinned to a device without power can only fail.
        Scheduled(Kill(Busy(POWER_CUTS), label="power cut"),
                  after=AllOf((StepMigrated("thermal", "inference"), RunEnded("update"))), wait_s=30),
    ]
    if restart_broker:  # while devices are at work: their sessions break mid-step
        timeline.append(Scheduled(BrokerRestart(down_s=2.0), after=AllOf((KillsLanded(), Working(1))), wait_s=20))
    monitoring = tuple(Submission(f"monitoring-{i}", "temperature_monitoring.yaml") for i in range(5))
    return Scenario("demo", (*monitoring, Submission("update", "rolling_update.yaml"),
                             Submission("thermal", "thermal_runaway.yaml")),
                    tuple(timeline), duration_s=WORK_S, boot_deadline_s=90, end_deadline_s=timeout, settle_s=1.5,
                    refresh_s=0.5, expectations=(StepMigratedOff("thermal runaway ended in migration", inference),),
                    workload=Workload(60 * WORK_RUNS_PER_S / devices, (Submission("batch", "batch_job.yaml"),)))


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo waited {timeout:g} s for {what}")
        await asyncio.sleep(0.1)


async def demo(devices: int, broker: str | None, keep_running: bool, seed: int, console: Console,
               timeout: float = 150.0, restart_broker: bool = True) -> int:
    work = Path(tempfile.mkdtemp(prefix="fleetflow-demo-"))
    # Hub and broker logs go to a file: the console belongs to the live table.
    handler = logging.FileHandler(work / "hub.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    console.print(f"work directory: {work}")
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker(f"mqtt://127.0.0.1:{free_port()}", work / "broker.log")
        await embedded.start()
        broker = embedded.url
    policy = Policy(duration=2, recovery=10, cooldown=2)
    hub = Hub(HubConfig(broker, FLEET, work / "hub", api_port=0, auto_accept=True, policy=policy))
    hub_task = asyncio.create_task(hub.run())
    try:
        await until(lambda: hub.session is not None and hub.api_url is not None, 20, "the hub")
        # The hub runs in this process, but the driver reads it like any client: its API URL and token file.
        api = HubApi(Client(hub.api_url, work / "hub" / TOKEN_FILE, None))
        orchestra = Orchestra(broker, FLEET, hub.public_key.hex(), work, plan(devices, DEMO_MIX), procs=2, seed=seed,
                              heartbeat=2.0, telemetry=1.0)
        async with Driver(api, orchestra, console, seed, work / "hub" / JOURNAL_FILE, broker=embedded) as driver:
            outcome = await driver.run(demo_scenario(restart_broker and embedded is not None, timeout, devices))
            # Plain lines after the table: they must not wrap, scripts read them.
            console.print("faults applied: " + "; ".join(outcome.faults), soft_wrap=True)
            if outcome.on_running_work:
                console.print("faults on running work: " + "; ".join(outcome.on_running_work), soft_wrap=True)
            console.print(outcome.verdict.render(), soft_wrap=True)
            if keep_running:
                console.print(f"\nThe hub keeps running. Try: fleetflow nodes list --data {work / 'hub'}\n"
                              f"                          fleetflow run list --data {work / 'hub'}\n"
                              "Stop with Ctrl-C.")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        return 0 if outcome.verdict.passed else 1
    finally:
        hub.stop()
        try:
            await within(HUB_STOP_S, hub_task)
        except TimeoutError:
            console.print(f"the hub did not stop within {HUB_STOP_S:g} s")
        if embedded is not None:
            await embedded.stop()


def run_demo(devices: int = 100, broker: str | None = None, keep_running: bool = False, seed: int = 7,
             restart_broker: bool = True) -> int:
    console = Console()
    try:
        return asyncio.run(demo(devices, broker, keep_running, seed, console, restart_broker=restart_broker))
    except (TimeoutError, WaitTimeout) as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        return 1
