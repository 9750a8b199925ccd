"""Runs simulator worker processes and talks to them (spawn, stats, faults, stop). Every wait on a worker is
bounded; a worker that does not stop in time is killed, and the log says which and why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.runtime.timeouts import within

log = logging.getLogger("fleetflow.sim")
STOP_S = 15.0  # a worker's devices stop within its own bound (sim/worker.py STOP_S); then it is killed


def plan(devices: int, mix: dict[str, int]) -> list[dict[str, str]]:
    """Node ids and profiles for `devices` devices in the proportions of `mix` (largest remainder)."""
    total = sum(mix.values())
    shares = {name: devices * weight / total for name, weight in mix.items()}
    counts = {name: int(share) for name, share in shares.items()}
    for name in sorted(shares, key=lambda n: shares[n] - counts[n], reverse=True)[:devices - sum(counts.values())]:
        counts[name] += 1
    out = []
    for name, count in counts.items():
        out += [{"node_id": f"{name}-{i:04d}", "profile": name} for i in range(count)]
    return out


def parse_mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep or not weight.strip().isdigit() or int(weight) <= 0:
            raise ValueError(f"--mix {text!r}: expected name=weight,... with positive integer weights")
        mix[name.strip()] = int(weight)
    return mix


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    nodes: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    killed: dict[str, int] = field(default_factory=dict)
    killed_running: dict[str, list[str]] = field(default_factory=dict)  # node -> attempts it ran when cut
    partitioned: dict[str, int] = field(default_factory=dict)
    healed: dict[str, int] = field(default_factory=dict)  # node -> when its last partition healed
    late: list[str] = field(default_factory=list)  # devices that did not stop within the worker's bound
    hits: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (fault, node, attempts it was running)
    cut_failed: list[str] = field(default_factory=list)  # devices whose agent outlived a power cut (sim/worker.py)
    reader: asyncio.Task[None] | None = None

    def note(self, event: dict[str, Any]) -> None:
        """One event the worker printed."""
        kind = event.get("event")
        if kind == "stats":
            self.stats = event
        elif kind == "killed":
            self.killed[event["node"]] = event["at"]
            self.killed_running[event["node"]] = list(event.get("running", []))
        elif kind == "cut-failed":
            self.cut_failed.append(event["node"])
        elif kind == "hit":
            self.hits.append((event["fault"], event["node"], list(event.get("running", []))))
        elif kind == "stopped":
            self.late = list(event.get("late", []))
        elif kind == "partitioned":
            self.partitioned[event["node"]] = event["at"]
            self.healed.pop(event["node"], None)
        elif kind == "healed":
            self.healed[event["node"]] = event["at"]

    async def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()


class Orchestra:
    def __init__(self, broker: str, fleet: str, hub_key: str, root: Path, devices: list[dict[str, str]],
                 procs: int = 2, seed: int = 7, heartbeat: float | None = None, telemetry: float | None = None,
                 relay: bool = False, keepalive: int = 10) -> None:
        self.broker, self.fleet, self.hub_key, self.root = broker, fleet, hub_key, root
        self.devices, self.procs, self.seed = devices, max(1, procs), seed
        self.heartbeat, self.telemetry = heartbeat, telemetry
        self.relay, self.keepalive = relay, keepalive
        self.workers: list[Worker] = []
        self.rng = random.Random(seed)

    async def start(self) -> None:
        for index in range(self.procs):
            chunk = self.devices[index::self.procs]
            if not chunk:
                continue
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sim.worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=open(self.root / f"worker-{index}.log", "ab"))
            worker = Worker(proc, [d["node_id"] for d in chunk])
            config = {"broker": self.broker, "fleet": self.fleet, "hub_key": self.hub_key, "root": str(self.root),
                      "devices": chunk, "seed": self.seed + index, "heartbeat": self.heartbeat,
                      "telemetry": self.telemetry, "relay": self.relay, "keepalive": self.keepalive}
            await worker.send(config)
            worker.reader = asyncio.create_task(self._read(worker))
            self.workers.append(worker)

    async def _read(self, worker: Worker) -> None:
        assert worker.proc.stdout is not None
        while line := await worker.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            worker.note(event)

    def owner(self, node: str) -> Worker:
        return next(w for w in self.workers if node in w.nodes)

    async def kill(self, nodes: list[str]) -> None:
        for node in nodes:
            await self.owner(node).send({"cmd": "kill", "nodes": [node]})

    async def heat(self, node: str, temp: float) -> None:
        await self.owner(node).send({"cmd": "heat", "node": node, "temp": temp})

    async def fault(self, node: str, command: dict[str, Any]) -> None:
        await self.owner(node).send({**command, "nodes": [node]})

    @property
    def partitioned(self) -> dict[str, int]:
        return {node: at for w in self.workers for node, at in w.partitioned.items()}

    @property
    def cut_off(self) -> set[str]:
        """Devices whose partition has not healed yet."""
        return {node for w in self.workers for node in w.partitioned if node not in w.healed}

    @property
    def connected(self) -> int:
        return sum(int(w.stats.get("connected", 0)) for w in self.workers)

    @property
    def outbox(self) -> int:
        return sum(int(w.stats.get("outbox", 0)) for w in self.workers)

    @property
    def killed(self) -> dict[str, int]:
        return {node: at for w in self.workers for node, at in w.killed.items()}

    @property
    def cut_failed(self) -> list[str]:
        """Devices a power cut was sent to whose agent did not end: the fault did not happen."""
        return [node for w in self.workers for node in w.cut_failed]

    @property
    def killed_running(self) -> dict[str, list[str]]:
        """Node -> the attempts it was running when its power was cut."""
        return {node: running for w in self.workers for node, running in w.killed_running.items()}

    @property
    def on_running_work(self) -> list[str]:
        """The faults that landed on a device while it was running steps, as the devices saw it."""
        return [f"{fault} {node} while it ran {', '.join(running)}" for w in self.workers
                for fault, node, running in w.hits if running]

    @property
    def busy(self) -> set[str]:
        """Devices running steps at the last stats line (once a second), as the devices see it."""
        return {node for w in self.workers for node in w.stats.get("busy", [])}

    async def stop(self) -> float:
        """Stops every worker at once, within STOP_S; returns how long it took."""
        started = time.monotonic()
        for worker in self.workers:
            with contextlib.suppress(ConnectionError, ProcessLookupError):
                await worker.send({"cmd": "stop"})

        async def reap(index: int, worker: Worker) -> None:
            try:
                await within(STOP_S, worker.proc.wait())
            except asyncio.TimeoutError:
                log.warning("simulator worker %d did not stop within %g s: killed", index, STOP_S)
                worker.proc.kill()
                await worker.proc.wait()
            if worker.reader is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(1.0, worker.reader)  # its last lines (`stopped`) are read
            if worker.late:
                log.warning("simulator worker %d: devices %s did not stop within its bound", index,
                            ", ".join(worker.late))

        await asyncio.gather(*(reap(i, w) for i, w in enumerate(self.workers)))
        took = time.monotonic() - started
        log.info("simulated devices stopped in %.1f s", took)
        return took
