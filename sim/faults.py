"""Faults as values: whom a fault lands on (a target, resolved only when the fault is applied), what it does (one
frozen dataclass per kind, whose `apply` is the one place that kind is carried out), and when (a `Scheduled` entry
of a timeline, optionally gated on what the fleet has done so far).

`fleetflow sim` reads its timeline from a fault file (sim/fault_file.py); `fleetflow demo` writes its own from the
same values (sim/demo.py); sim/driver.py applies either. The commands sent here are the simulator worker's stdin
protocol (sim/worker.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt
import nacl.signing

from hub.transitions import RUN_TERMINAL
from protocols import Heartbeat, Signer, StepResult

from .evidence import Injected, claimed
from .hub_api import HubApi
from .orchestra import Orchestra


class BrokerControl(Protocol):
    """A broker this process manages (the demo's embedded one), so a fault can take it down and bring it back."""

    async def restart(self, down_s: float) -> None: ...


@dataclass
class FaultContext:
    """What faults act on and what they leave behind, for the targets resolved after them, the gates, the live
    table and the checker."""

    orchestra: Orchestra
    api: HubApi
    rng: random.Random
    broker: BrokerControl | None = None
    runs: dict[str, str] = field(default_factory=dict)      # a submission's label -> its run id
    down: set[str] = field(default_factory=set)             # taken off the network: random picks skip them
    kills_sent: set[str] = field(default_factory=set)
    resolved: dict[Target, tuple[str, ...]] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)        # what `faults applied` says, in order
    messages: list[Injected] = field(default_factory=list)  # forged or replayed messages a rogue device sent
    on_work: list[str] = field(default_factory=list)        # fleet-wide faults that found devices running steps
    at_work: dict[str, float] = field(default_factory=dict)  # device -> since when (clock) it is seen running steps
    watched_at: float = float("-inf")                         # when `at_work` was last brought up to date
    clock: Callable[[], float] = time.monotonic

    @property
    def injected(self) -> int:
        return len(self.messages)

    @property
    def devices(self) -> list[str]:
        return sorted(d["node_id"] for d in self.orchestra.devices)

    async def step_attempts(self, run: str, step: str) -> list[dict[str, Any]] | None:
        """The attempts of step `step` of the run submitted as `run`; None while the hub shows none (an archived run
        keeps no steps)."""
        if run not in self.runs:
            return None
        detail = await self.api.get(f"/runs/{self.runs[run]}")
        found = next((s for s in detail.get("steps", []) if s["id"] == step), None)
        return list(found["attempts"]) if found is not None else None

    async def land(self, target: Target, command: dict[str, Any], describe: Callable[[Sequence[str]], str],
                   takes_down: bool = False) -> tuple[str, ...] | None:
        """Resolve `target` and send `command` to each device it names; None, with nothing sent, while there is
        nothing to aim at yet."""
        nodes = await target.resolve(self)
        if nodes is None:
            return None
        self.resolved[target] = nodes
        for node in nodes:
            await self.orchestra.fault(node, command)
        if takes_down:
            self.down.update(nodes)
        self.applied.append(describe(nodes))
        return nodes


REPORT_S = 1.0  # the simulator workers report which devices run steps this often (sim/worker.py)
STEADY_S = 1.5  # a device at work this long, over two of its reports, runs a step that is still going


# -- targets: resolve to device ids when the fault is applied, or to None while there is nothing to aim at yet -------

@dataclass(frozen=True)
class Pick:
    """Named devices, or a number or share of the devices no fault has taken off the network, at random."""

    count: int | None = None
    percent: float | None = None
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.count, self.percent, self.nodes or None)) != 1:
            raise ValueError("give exactly one of count, percent or nodes")

    async def resolve(self, ctx: FaultContext) -> tuple[str, ...]:
        alive = [d for d in ctx.devices if d not in ctx.down]
        if self.nodes:
            return tuple(n for n in self.nodes if n in alive)
        count = self.count if self.count is not None else max(1, round(len(alive) * (self.percent or 0) / 100))
        return tuple(ctx.rng.sample(alive, k=min(count, len(alive))))

    def __str__(self) -> str:
        return ", ".join(self.nodes) if self.nodes else f"{self.count} devices" if self.count else f"{self.percent} %"


@dataclass(frozen=True)
class RunningStep:
    """The device running step `step` of the run submitted as `run`, once its latest attempt is running there."""

    run: str
    step: str

    async def resolve(self, ctx: FaultContext) -> tuple[str, ...] | None:
        attempts = await ctx.step_attempts(self.run, self.step)
        if attempts and attempts[-1]["state"] == "running":
            return (str(attempts[-1]["node"]),)
        return None

    def __str__(self) -> str:
        return f"the device running {self.run}/{self.step}"


@dataclass(frozen=True)
class Busy:
    """`count` devices running steps, as the devices themselves report it (not the hub), none a fault took off the
    network; resolves once that many are at work, so the fault lands on work in progress. Only devices seen at work
    for STEADY_S are picked: the devices report once a second, and one seen busy once may have run a step of a few
    milliseconds that ended before the fault lands; one busy over two reports runs long work."""

    count: int = 1

    async def resolve(self, ctx: FaultContext) -> tuple[str, ...] | None:
        now = ctx.clock()
        # Watched without a pause longer than a report, so a device kept is one never seen idle in between.
        watched = ctx.at_work if now - ctx.watched_at <= REPORT_S else {}
        busy = set(ctx.orchestra.busy) - ctx.down
        ctx.at_work = {node: watched.get(node, now) for node in sorted(busy)}  # those that stopped start over
        ctx.watched_at = now
        steady = [node for node, since in ctx.at_work.items() if now - since >= STEADY_S]
        if len(steady) < self.count:
            return None
        return tuple(ctx.rng.sample(steady, k=self.count))

    def __str__(self) -> str:
        return f"{self.count} device{'s' if self.count != 1 else ''} running steps"


Target = Pick | RunningStep | Busy


def migrated(attempt: dict[str, Any]) -> bool:
    """An attempt the hub moved off its device (a migration), as the API shows it."""
    return str(attempt.get("reason") or "").startswith("migrated")


def _listed(label: str) -> Callable[[Sequence[str]], str]:
    return lambda nodes: f"{label}: {', '.join(nodes)}"


# -- fault kinds: `apply` returns False when its target is not there yet (the driver tries again) ---------------------

@dataclass(frozen=True)
class Kill:
    """Power cut: the socket drops with no DISCONNECT, so the broker publishes the device's Will."""

    target: Target
    label: str = "kill"  # how `faults applied` names it; the demo says "power cut"

    async def apply(self, ctx: FaultContext) -> bool:
        nodes = await ctx.land(self.target, {"cmd": "kill"}, _listed(self.label), takes_down=True)
        if nodes is not None:
            ctx.kills_sent.update(nodes)
        return nodes is not None


@dataclass(frozen=True)
class Partition:
    """All traffic stops with the sockets left open (the device's relay holds the bytes); healed after
    `duration_s`. Needs devices started behind relays (`needs_relay`)."""

    target: Target
    duration_s: float = 10.0

    async def apply(self, ctx: FaultContext) -> bool:
        command = {"cmd": "partition", "for": self.duration_s}
        return await ctx.land(self.target, command, _listed("partition"), takes_down=True) is not None


@dataclass(frozen=True)
class Spike:
    """Telemetry pinned at `metrics` for `duration_s`, then back to the simulated values."""

    target: Target
    metrics: dict[str, float]
    duration_s: float = 10.0

    async def apply(self, ctx: FaultContext) -> bool:
        command = {"cmd": "spike", "metrics": dict(self.metrics), "for": self.duration_s}
        return await ctx.land(self.target, command, _listed("spike")) is not None


@dataclass(frozen=True)
class Heat:
    """The board overheats: its temperature stays at `temp` until the simulation ends."""

    target: Target
    temp: float = 95.0

    async def apply(self, ctx: FaultContext) -> bool:
        command = {"cmd": "heat", "temp": self.temp}
        describe: Callable[[Sequence[str]], str] = lambda nodes: f"{', '.join(nodes)} overheats ({self.temp:g} C)"
        return await ctx.land(self.target, command, describe) is not None


@dataclass(frozen=True)
class Slow:
    """Steps take `factor` times as long."""

    target: Target
    factor: float

    async def apply(self, ctx: FaultContext) -> bool:
        return await ctx.land(self.target, {"cmd": "slow", "factor": self.factor}, _listed("slow")) is not None


@dataclass(frozen=True)
class Skew:
    """The device's clock runs `seconds` ahead (behind when negative)."""

    target: Target
    seconds: float

    async def apply(self, ctx: FaultContext) -> bool:
        return await ctx.land(self.target, {"cmd": "skew", "seconds": self.seconds}, _listed("skew")) is not None


@dataclass(frozen=True)
class Flap:
    """Power cut and reboot, `times` times, `every_s` apart."""

    target: Target
    times: int = 3
    every_s: float = 2.0

    async def apply(self, ctx: FaultContext) -> bool:
        command = {"cmd": "flap", "times": self.times, "every": self.every_s}
        return await ctx.land(self.target, command, _listed("flap"), takes_down=True) is not None


@dataclass(frozen=True)
class Rogue:
    """An attacker on the broker replays captured step events, results and heartbeats, and forges heartbeats and
    results under real node ids. Each message it sends is logged, so the checker judges each one's refusal."""

    forged: int = 5
    replayed: int = 5

    async def apply(self, ctx: FaultContext) -> bool:
        ctx.messages += await rogue(ctx.orchestra.broker, ctx.orchestra.fleet, self.forged, self.replayed)
        ctx.applied.append(f"rogue: {self.forged} forged, {self.replayed} replayed")
        return True


@dataclass(frozen=True)
class BrokerRestart:
    """The broker goes away for `down_s` and comes back: every session breaks at once."""

    down_s: float = 2.0

    async def apply(self, ctx: FaultContext) -> bool:
        if ctx.broker is None:
            raise ValueError("a broker restart needs a broker this process manages (the demo's embedded one)")
        ctx.applied.append("broker down")
        entry = len(ctx.applied) - 1
        busy = sorted(ctx.orchestra.busy - ctx.down)
        if busy:
            ctx.on_work.append(f"broker restart while {len(busy)} device(s) ran steps ({', '.join(busy[:5])})")
        await ctx.broker.restart(self.down_s)
        ctx.applied[entry] = f"broker restarted after {self.down_s:g} s"
        return True


Fault = Kill | Partition | Spike | Heat | Slow | Skew | Flap | Rogue | BrokerRestart


# -- gates: what the fleet must have done before the next fault, so each outcome has a single cause ------------------

@dataclass(frozen=True)
class StepMigrated:
    """Step `step` of the run submitted as `run` has an attempt the hub migrated away."""

    run: str
    step: str

    async def holds(self, ctx: FaultContext) -> bool:
        attempts = await ctx.step_attempts(self.run, self.step) or []
        return any(migrated(a) for a in attempts)

    def __str__(self) -> str:
        return f"{self.run}/{self.step} to migrate"


@dataclass(frozen=True)
class KillsLanded:
    """Every power cut sent so far has been carried out by the workers, or said not to have taken (the checker
    fails the run on that: nothing is gained by waiting)."""

    async def holds(self, ctx: FaultContext) -> bool:
        return ctx.kills_sent <= set(ctx.orchestra.killed) | set(ctx.orchestra.cut_failed)

    def __str__(self) -> str:
        return "the power cuts to land"


@dataclass(frozen=True)
class Working:
    """At least `count` devices are running steps (as they report it)."""

    count: int = 1

    async def holds(self, ctx: FaultContext) -> bool:
        return len(set(ctx.orchestra.busy) - ctx.down) >= self.count

    def __str__(self) -> str:
        return f"{self.count} device{'s' if self.count != 1 else ''} to be running steps"


@dataclass(frozen=True)
class RunEnded:
    """The run submitted as `run` is over, however it ended."""

    run: str

    async def holds(self, ctx: FaultContext) -> bool:
        if self.run not in ctx.runs:
            return False
        return (await ctx.api.get(f"/runs/{ctx.runs[self.run]}")).get("state") in RUN_TERMINAL

    def __str__(self) -> str:
        return f"{self.run} to end"


@dataclass(frozen=True)
class AllOf:
    gates: tuple[StepMigrated | KillsLanded | Working | RunEnded, ...]

    async def holds(self, ctx: FaultContext) -> bool:
        return all([await gate.holds(ctx) for gate in self.gates])

    def __str__(self) -> str:
        return " and ".join(str(gate) for gate in self.gates)


Gate = StepMigrated | KillsLanded | Working | RunEnded | AllOf


@dataclass(frozen=True)
class Scheduled:
    """One entry of a timeline: `fault`, `at` seconds after the workflows are submitted (which is once every device
    is up), and after `after` holds or `wait_s` has passed, whichever is first. A target that resolves to nothing
    within `wait_s` fails the scenario."""

    fault: Fault
    at: float = 0.0
    after: Gate | None = None
    wait_s: float = 30.0


def needs_relay(timeline: Sequence[Scheduled]) -> bool:
    """A partition holds a device's bytes in its relay: the devices must start behind relays."""
    return any(isinstance(entry.fault, Partition) for entry in timeline)


CAPTURE_S = 15.0  # the rogue listens this long at most for messages to replay


async def rogue(broker: str, fleet: str, forged: int, replayed: int) -> list[Injected]:
    """Replays captured messages (step events and results first: a replay the hub took would show in its journal,
    then heartbeats) and forges heartbeats and results under real node ids; the messages sent, in order."""
    parts = urlsplit(broker)
    events: list[tuple[str, bytes]] = []
    beats: list[tuple[str, bytes]] = []
    sent: list[Injected] = []
    async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883, identifier="rogue") as client:
        await client.subscribe(f"fleetflow/v1/{fleet}/node/+/hb", qos=0)
        await client.subscribe(f"fleetflow/v1/{fleet}/node/+/evt", qos=1)
        try:
            async with asyncio.timeout(CAPTURE_S):
                async for message in client.messages:
                    captured = (str(message.topic), bytes(message.payload))
                    (events if captured[0].endswith("/evt") else beats).append(captured)
                    if len(events) >= replayed and len(beats) >= 1:
                        break
        except TimeoutError:
            pass
        for topic, payload in (events + beats)[:replayed]:
            await client.publish(topic, payload, qos=1)
            sent.append(Injected("replayed", topic, payload))
        key = nacl.signing.SigningKey.generate()
        results = [(said.header.src, said.body) for _, payload in events
                   if (said := claimed(payload)) is not None and isinstance(said.body, StepResult)]
        nodes = sorted({t.split("/")[4] for t, _ in events + beats}) or ["nobody"]
        for i in range(forged):
            signer = Signer(key, fleet, nodes[i % len(nodes)], boot=10**6)
            now = int(time.time() * 1000)
            if i % 2 and results:  # a result its node never produced: success, for an attempt it did run
                node, real = results[i % len(results)]
                signer = Signer(key, fleet, node, boot=10**6)
                out = signer.seal(dataclasses.replace(real, ok=True, eid=10**6 + i, error=None), now)
            else:
                out = signer.seal(Heartbeat(), now)
            await client.publish(out.topic, out.payload, qos=1)
            sent.append(Injected("forged", out.topic, out.payload))
    return sent

