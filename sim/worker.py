"""One simulator process: many virtual devices, each the real `agent.Agent` with its own MQTT connection,
identity, Last Will, outbox and boot counter; telemetry and hardware steps are simulated.

Started by `fleetflow sim` and `fleetflow demo` as `python -m sim.worker`. The first stdin line is the JSON config;
later lines are commands (`{"cmd": "kill", "nodes": [...]}`, `{"cmd": "heat", "node": ..., "temp": 95}`,
`{"cmd": "stop"}`). It writes JSON lines to stdout: `ready`, `stats` every second (with the devices running steps),
`killed` with the time and the attempts the device was running, `stopped` with the devices that did not stop within
STOP_S (they are cancelled: the worker never outlives its bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import Agent, AgentConfig, StepContext, StepFailed
from agent.runtime.clock import now_ms
from agent.runtime.timeouts import within
from agent.runtime.transport import BrokerSettings, MqttTransport

from .profiles import DeviceProfile, load_all
from .relay import Relay
from .telemetry import SimTelemetry

# A device stops within its grace period (2 s), its wait for the last acks (agent/node.py ACK_WAIT_ON_STOP, 5 s) and
# its death certificate's publish (the transport's operation timeout): past this, it is cancelled and named.
STOP_S = 12.0
CUT_TRIES = 20  # a power cut cancels a device's agent this many times, 0.5 s apart, before it says it could not

log = logging.getLogger("fleetflow.sim")


async def cancel_until_done(task: asyncio.Task[Any], tries: int = CUT_TRIES, every: float = 0.5) -> bool:
    """Cancel `task` again until it ends (True), `tries` times at most, `every` seconds apart. A library's wait
    (aiomqtt's `asyncio.wait_for`, on Python 3.11) can lose a cancellation that lands as what it waits for completes,
    and a power cut is never refused."""
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: an agent that ended on an error is not logged again as unretrieved
    return task.done()


@dataclass
class Device:
    node_id: str
    profile: DeviceProfile
    agent: Agent
    transport: MqttTransport
    telemetry: SimTelemetry
    task: asyncio.Task[None] | None = None
    killed_at: float | None = None
    relay: Relay | None = None
    skew_ms: int = 0


def hardware_steps(telemetry: SimTelemetry, profile: DeviceProfile, rng: random.Random) -> dict[str, Any]:
    """Steps that would touch hardware, simulated: reading sensors and applying a software update."""

    async def sensor(inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(0.05 * profile.sim.step_speed)
        return {"temperature": round(telemetry.temp, 1), "humidity": round(telemetry.humidity, 1),
                "battery": round(rng.uniform(60, 100), 0)}

    async def update(inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        telemetry.busy += 1
        try:
            await asyncio.sleep(float(inputs.get("seconds", 1.0)) * profile.sim.step_speed)
        finally:
            telemetry.busy -= 1
        if rng.random() < profile.sim.failure_rate:
            raise StepFailed(f"simulated update failure on {ctx.attempt}")
        return {"version": str(inputs.get("version", "1.0.0"))}

    return {"sensor": sensor, "update": update}


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def run(config: dict[str, Any]) -> None:
    profiles = load_all()
    root = Path(config["root"])
    rng = random.Random(config.get("seed", 1))
    scale = float(config.get("time_scale", 0.05))  # boot times are scaled down: a demo should not wait minutes
    devices: dict[str, Device] = {}
    broker = BrokerSettings(config["broker"])
    host, port, _ = broker.parsed()

    def make(spec: dict[str, str], telemetry: SimTelemetry | None = None, relay: Relay | None = None,
             skew_ms: int = 0) -> Device:
        profile = profiles[spec["profile"]]
        telemetry = telemetry or SimTelemetry(profile, random.Random(rng.random()))
        url = f"mqtt://127.0.0.1:{relay.port}" if relay is not None else config["broker"]
        transport = MqttTransport(BrokerSettings(url, keepalive=int(config.get("keepalive", 10))))
        settings = AgentConfig(broker=url, fleet=config["fleet"], node_id=spec["node_id"],
                               data=root / spec["node_id"], profile=profile.name,
                               hub_key=bytes.fromhex(config["hub_key"]), heartbeat=config.get("heartbeat"),
                               telemetry=config.get("telemetry"), grace_period=2.0)
        device = Device(spec["node_id"], profile, None, transport, telemetry, relay=relay, skew_ms=skew_ms)  # type: ignore[arg-type]
        device.agent = Agent(settings, transport=transport, telemetry=telemetry,
                             clock_ms=lambda: now_ms() + device.skew_ms,
                             extra_executors=hardware_steps(telemetry, profile, random.Random(rng.random())),
                             speed=profile.sim.step_speed)
        return device

    specs = {spec["node_id"]: spec for spec in config["devices"]}
    for spec in config["devices"]:
        relay = None
        if config.get("relay"):
            relay = Relay(host, port)
            await relay.start()
        devices[spec["node_id"]] = make(spec, relay=relay)

    async def boot(device: Device) -> None:
        await asyncio.sleep(device.profile.sim.boot_time_s * scale * rng.random())
        await device.agent.run()

    for device in devices.values():
        device.task = asyncio.create_task(boot(device))
    emit("ready", devices=len(devices))
    stop = asyncio.Event()

    async def commands() -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                stop.set()
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                stop.set()
                return
            asyncio.create_task(apply(cmd))

    async def power_cut(device: Device, fault: str) -> bool:
        """False (and said, as a `cut-failed` event the checker fails the run on) when the agent outlived it."""
        device.transport.abort()  # no DISCONNECT: the broker publishes the Will
        if device.task is None or await cancel_until_done(device.task):
            return True
        log.error("device %s: its agent did not end after %d cancellations", device.node_id, CUT_TRIES)
        emit("cut-failed", node=device.node_id, fault=fault)
        return False

    async def apply(cmd: dict[str, Any]) -> None:
        kind = cmd["cmd"]
        for node in cmd.get("nodes", [cmd.get("node")]):
            device = devices[node]
            # Whether the fault found the device at work, from the device itself (the hub may not know yet).
            emit("hit", node=node, fault=kind, running=sorted(device.agent.runner.running))
            if kind == "kill":
                device.killed_at = time.time()  # before the cut: detection is measured from this moment
                running = sorted(device.agent.runner.running)
                if await power_cut(device, kind):
                    emit("killed", node=node, at=int(device.killed_at * 1000), running=running)
            elif kind == "heat":
                device.telemetry.overrides["temp"] = float(cmd["temp"])
                emit("heated", node=node, temp=float(cmd["temp"]))
            elif kind == "spike":
                device.telemetry.overrides.update(cmd["metrics"])
                await asyncio.sleep(float(cmd["for"]))
                for metric in cmd["metrics"]:
                    device.telemetry.overrides.pop(metric, None)
            elif kind == "slow":
                device.agent.runner.speed *= float(cmd["factor"])
            elif kind == "skew":
                device.skew_ms = int(float(cmd["seconds"]) * 1000)
            elif kind == "partition" and device.relay is not None:
                device.relay.pause()
                emit("partitioned", node=node, at=now_ms())
                await asyncio.sleep(float(cmd["for"]))
                device.relay.resume()
                emit("healed", node=node, at=now_ms())
            elif kind == "flap":
                for _ in range(int(cmd["times"])):
                    if not await power_cut(device, kind):
                        break  # no second agent of the node beside the one still running
                    emit("flapped", node=node, at=now_ms())
                    await asyncio.sleep(float(cmd["every"]))
                    fresh = make(specs[node], device.telemetry, device.relay, device.skew_ms)
                    fresh.task = asyncio.create_task(fresh.agent.run())
                    devices[node] = device = fresh
                    await asyncio.sleep(float(cmd["every"]))

    command_task = asyncio.create_task(commands())
    while not stop.is_set():
        connected = sum(1 for d in devices.values() if d.agent.session is not None)
        outbox = sum(d.agent.outbox.unacknowledged() for d in devices.values() if d.killed_at is None
                     and d.task is not None and not d.task.done())
        busy = sorted(node for node, d in devices.items() if d.killed_at is None and d.agent.runner.running)
        emit("stats", connected=connected, devices=len(devices), outbox=outbox,
             killed=sum(1 for d in devices.values() if d.killed_at is not None), busy=busy)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(1.0, stop.wait())
    for device in devices.values():
        if device.killed_at is None:
            device.agent.stop()
    tasks = {node: d.task for node, d in devices.items() if d.task is not None and not d.task.done()}
    if tasks:
        await asyncio.wait(tasks.values(), timeout=STOP_S)
    late = sorted(node for node, task in tasks.items() if not task.done())
    for node in late:
        tasks[node].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    command_task.cancel()
    emit("stopped", late=late)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(sys.stdin.readline())
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
