"""Deterministic simulation of the whole fleet, FoundationDB / TigerBeetle style.

For one seed: the real hub (`hub.service.Hub`) and a few real agents (`agent.Agent`) run in one process over
an in-memory MQTT broker (agent/runtime/memory.py), on an event loop whose clock is virtual (sim/virtual_time.py),
with real journals and outboxes (SQLite) in a temporary directory. The seed decides everything: the fleet, the
workflows and when they are submitted, and the faults and when they land (message loss within the QoS rules,
duplicates, delays, reordering across publishers, agent and hub crashes with restarts from disk, partitions, clock
skew, a full disk under an outbox). The run goes on until every run is terminal and every fault is over for a quiet
spell, or a simulated deadline; sim/history.py then judges what happened from the wire, the journal and the outboxes.

The same seed gives the same history, byte for byte, in any process started with the same PYTHONHASHSEED (the
core iterates sets of strings; bench/dst.py sets it). Nothing in a history depends on key bytes, client ids or wall
time: keys are derived from the seed and never printed, client ids never appear, time is virtual.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from agent import Agent, AgentConfig, FixedSource
from agent.runtime.backoff import Backoff
from agent.runtime.keys import public_path
from agent.runtime.memory import Faults, MemoryBroker, MemoryTransport, Network
from agent.runtime.timeouts import within
from hub.events import RunSubmitted
from hub.journal import Journal
from hub.service import Hub, HubConfig
from hub.state import RUN_TERMINAL, Core
from hub.workflow import workflow_from_data

from . import virtual_time
from .evidence import Evidence, FaultLog, read_outboxes
from .history import Violation, check, render
from .inprocess import EPOCH_MS, STEADY, memory_hub, unmeasured_policy, virtual_clock_ms
from .virtual_time import Owner, kill, spawn

log = logging.getLogger("fleetflow.dst")

FLEET = "dst"
HUB = "hub"                     # the hub's transport name (agents use their node ids)
PROFILES = ("container", "gateway", "ipc", "rpi4")
NOTICE_S = (5.0, 20.0)          # a cut link is noticed after 1.5 keepalives: somewhere in this range
RESTART_S = 5.0                 # a process that exits is restarted after this (RestartSec in the systemd units)
SUBMIT_BY_S = 100.0             # runs keep coming while the faults land: faults must hit devices at work
FAULTS_FROM_S, FAULTS_UNTIL_S, FAULT_MAX_S = 5.0, 120.0, 40.0
QUIET_S = 45.0                  # every run terminal and every fault over this long: outboxes drain (resent
                                # after 15 s without an ack, or at once in a new session)
DEADLINE_S = 900.0
RUN_TIMEOUT_S = 240.0
FAULT_KINDS = {"network": 2, "crash": 2, "partition": 3, "skew": 1, "disk-full": 2}  # kind -> weight
BASELINE = {"delay": 0.005}     # a network is never instant: up to 5 ms per delivery interleaves the processes
SUCCEEDS = frozenset({"succeeded"})
EXPECTED = {"saga": frozenset({"failed"})}  # workflow -> how its runs end (the rest succeed: retries and migration
                                            # outlast the faults, which end by FAULTS_UNTIL_S + FAULT_MAX_S)


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str       # one of FAULT_KINDS
    target: str     # a node id, "hub", or "" (the whole network)
    duration: float
    params: tuple[tuple[str, float], ...] = ()
    pick: float = 0.0  # a fault on a node lands on a node at work when there is one: this picks which, in [0, 1)

    def describe(self, target: str) -> str:
        params = " ".join(f"{name}={value:g}" for name, value in self.params)
        return f"{self.kind} {target} {params} for {self.duration:g} s".replace("  ", " ")


@dataclass(frozen=True)
class Plan:
    seed: int
    nodes: tuple[tuple[str, str], ...]                       # (node id, firmware profile)
    runs: tuple[tuple[float, str, Mapping[str, Any]], ...]   # (submitted at, run id, workflow as data)
    faults: tuple[Fault, ...]
    snapshot_every: int


def _workflow(rng: random.Random, kind: str) -> dict[str, Any]:
    def sleep() -> dict[str, float]:  # long enough for a fault to find the step running
        return {"seconds": round(rng.uniform(1.0, 15.0), 2)}

    retry = {"max_attempts": rng.randint(2, 4), "initial": 0.5}
    if kind == "chain":
        steps: list[dict[str, Any]] = [
            {"id": "fetch", "uses": "sleep", "with": sleep(), "timeout": 60, "retry": retry},
            {"id": "transform", "uses": "echo", "needs": ["fetch"], "with": {"k": rng.randint(1, 99)}, "retry": retry},
            {"id": "store", "uses": "noop", "needs": ["transform"], "migratable": True}]
    elif kind == "fan-out":
        steps = [{"id": "prepare", "uses": "echo", "with": {"release": "2.4.0"}},
                 {"id": "update", "uses": "sleep", "needs": ["prepare"], "for_each": {"labels": {"pool": "dst"}},
                  "with": sleep(), "timeout": 60, "retry": retry},
                 {"id": "report", "uses": "echo", "needs": ["update"]}]
    elif kind == "saga":
        steps = [{"id": "reserve", "uses": "echo", "compensate": {"uses": "echo", "with": {"undo": "reserve"}}},
                 {"id": "charge", "uses": "fail", "needs": ["reserve"], "with": {"message": "declined"},
                  "retry": retry}]
    else:  # diamond
        steps = [{"id": "a", "uses": "noop"},
                 {"id": "b", "uses": "sleep", "needs": ["a"], "with": sleep(), "timeout": 60, "migratable": True,
                  "retry": retry},
                 {"id": "c", "uses": "echo", "needs": ["a"], "with": {"x": 1}},
                 {"id": "d", "uses": "noop", "needs": ["b", "c"]}]
    return {"name": kind, "version": "1.0.0", "timeout": RUN_TIMEOUT_S, "steps": steps}


def _fault(rng: random.Random, nodes: list[str]) -> Fault:
    kind = rng.choices(list(FAULT_KINDS), list(FAULT_KINDS.values()))[0]
    at, duration = round(rng.uniform(FAULTS_FROM_S, FAULTS_UNTIL_S), 3), round(rng.uniform(2.0, FAULT_MAX_S), 3)
    node = rng.choice(nodes)
    params: tuple[tuple[str, float], ...] = ()
    if kind == "network":
        params = (("loss", round(rng.uniform(0, 0.5), 2)), ("duplicate", round(rng.uniform(0, 0.5), 2)),
                  ("delay", round(rng.uniform(0, 1.0), 2)), ("reorder", round(rng.uniform(0, 0.3), 2)),
                  ("hold", round(rng.uniform(0.5, 3.0), 2)))
        return Fault(at, kind, "", duration, params)
    if kind == "skew":  # within the commands' 60 s expiry, or far beyond it
        skew_ms = rng.choice((rng.randint(1, 5_000), rng.randint(30_000, 120_000))) * rng.choice((-1, 1))
        return Fault(at, kind, node, duration, (("ms", skew_ms),), rng.random())
    if kind == "partition":  # long enough, mostly, for the hub to declare the other side failed
        duration = round(rng.uniform(5.0, FAULT_MAX_S), 3)
        params = (("notice", round(rng.uniform(*NOTICE_S), 3)),)
    if kind in ("crash", "partition") and rng.random() < 0.3:
        node = HUB
    return Fault(at, kind, node, duration, params, rng.random())


def make_plan(seed: int, faults: bool = True) -> Plan:
    rng = random.Random(seed)
    nodes = tuple((f"n{i}", rng.choice(PROFILES)) for i in range(1, rng.randint(3, 5) + 1))
    runs = sorted(((round(rng.uniform(2.0, SUBMIT_BY_S), 3), f"run-{k}",
                    _workflow(rng, rng.choice(("chain", "fan-out", "saga", "diamond"))))
                   for k in range(1, rng.randint(3, 8) + 1)), key=lambda run: run[:2])
    ids = [node for node, _ in nodes]
    planned = sorted((_fault(rng, ids) for _ in range(rng.randint(3, 10) if faults else 0)), key=lambda f: f.at)
    return Plan(seed, nodes, tuple(runs), tuple(planned), rng.choice((25, 200, 10_000)))


@dataclass
class Options:
    """Test seams: a bug planted in an agent or in the core must be found by some seed. `core_class`: a subclass of
    Core, whose overrides (`apply`, event handlers) the hub then runs (sim/inprocess.py `recast`)."""

    make_agent: Callable[..., Agent] = Agent
    core_class: type[Core] = Core
    faults: bool = True
    deadline_s: float = DEADLINE_S


@dataclass(eq=False)
class _Process:
    name: str
    owner: Owner
    transport: MemoryTransport
    task: asyncio.Task[None] | None = None
    killed: bool = False


@dataclass(eq=False)
class _HubProcess(_Process):
    hub: Hub | None = None


@dataclass(eq=False)
class _AgentProcess(_Process):
    agent: Agent | None = None


@dataclass
class Outcome:
    seed: int
    plan: Plan
    violations: list[Violation]
    evidence: Evidence
    sim_events: list[tuple[float, int, str]]
    simulated_s: float

    def history(self) -> list[str]:
        return render(self.evidence, self.sim_events)


class _WatchedBroker(MemoryBroker):
    """The in-memory broker, noting for every message the hub publishes how many events the hub's journal had
    committed at that instant: the order "journaled before it was sent" is judged by (sim/history.py)."""

    def __init__(self, network: Network, committed: Callable[[str], int | None]) -> None:
        super().__init__(network)
        self.committed: dict[int, int] = {}  # wire index -> journal events committed when it was published
        self._committed_by = committed

    def publish(self, conn: Any, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        index, committed = len(self.wire), self._committed_by(conn.name)
        super().publish(conn, topic, payload, qos, retain)
        if committed is not None and len(self.wire) > index:
            self.committed[index] = committed


def _write_key(path: Path, key: SigningKey) -> None:
    """A key file as agent/runtime/keys.py writes them, with a key derived from the seed (not a random one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(key).hex().encode() + b"\n")
    finally:
        os.close(fd)
    public_path(path).write_text(bytes(key.verify_key).hex() + "\n")


class World:
    def __init__(self, plan: Plan, options: Options, root: Path) -> None:
        self.plan, self.options, self.root = plan, options, root
        rng = random.Random(f"keys-{plan.seed}")
        self.keys = {name: SigningKey(rng.randbytes(32)) for name in (HUB, *(n for n, _ in plan.nodes))}
        self.backoff_rng = random.Random(f"backoff-{plan.seed}")
        self.network = Network(random.Random(f"network-{plan.seed}"), Faults(**BASELINE))
        self.broker = _WatchedBroker(self.network, self._journal_committed)
        self.events: list[tuple[float, int, str]] = []  # (loop time, the broker's log count then, what)
        self.skew: dict[str, int] = {}
        self.disk_full: dict[str, None] = {}
        self.hub: _HubProcess | None = None
        self.agents: dict[str, _AgentProcess | None] = {node: None for node, _ in plan.nodes}
        self.profiles = dict(plan.nodes)
        self.generation = 0
        self.ending = False
        self.final_core: Core | None = None
        self.quiet_end = False
        self.finished_at = 0.0
        self.hub_config = HubConfig(broker="mqtt://memory.invalid", fleet=FLEET, data=root / HUB, auto_accept=True,
                                    snapshot_every=plan.snapshot_every, policy=unmeasured_policy())
        for name, key in self.keys.items():
            _write_key(root / name / ("hub.key" if name == HUB else "node.key"), key)

    # -- time and the record ---------------------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def clock_ms(self) -> int:
        return virtual_clock_ms()

    def node_clock_ms(self, node: str) -> int:
        return self.clock_ms() + self.skew.get(node, 0)

    def _journal_committed(self, sender: str) -> int | None:
        """How many events the running hub's journal has committed, when `sender` is the hub."""
        proc = self.hub
        return proc.hub.journal.last_seq if sender == HUB and proc is not None and proc.hub is not None else None

    def note(self, text: str) -> None:
        self.events.append((self.now(), self.broker.logged, text))

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
            return  # a crashed agent's tasks writing to the outbox the crash closed: the write never happened
        what = _reason(exc, self.root) if exc is not None else ""
        said = _repeatable(f"loop error: {context.get('message')} {what}".rstrip(), self.root)
        self.events.append((loop.time(), self.broker.logged, said))

    # -- processes -------------------------------------------------------------------------------------------------

    def _start_hub(self) -> None:
        self.generation += 1
        name = f"hub#{self.generation}"
        transport = MemoryTransport(self.broker, HUB)
        try:
            hub = memory_hub(self.hub_config, transport, self.clock_ms, self.options.core_class)
        except Exception as exc:  # e.g. the data lock still held: the service manager tries again
            self.note(f"{name} failed to start: {_reason(exc, self.root)}")
            asyncio.get_running_loop().call_later(RESTART_S, self._start, HUB)
            return
        proc = _HubProcess(name, Owner(name), transport, hub=hub)
        proc.task = spawn(proc.owner, hub.run(api=False, first_connection_required=False), name=name)
        proc.task.add_done_callback(functools.partial(self._exited, proc))
        self.hub = proc
        self.note(f"{name} started")

    def _start_agent(self, node: str) -> None:
        self.generation += 1
        name = f"{node}#{self.generation}"
        transport = MemoryTransport(self.broker, node)
        config = AgentConfig(broker="mqtt://memory.invalid", fleet=FLEET, node_id=node, data=self.root / node,
                             profile=self.profiles[node], labels={"pool": "dst"},
                             hub_key=bytes(self.keys[HUB].verify_key), grace_period=5.0)
        try:
            agent = self.options.make_agent(config, transport=transport, telemetry=FixedSource(**STEADY),
                                            clock_ms=functools.partial(self.node_clock_ms, node))
        except Exception as exc:  # the service manager tries again
            self.note(f"{name} failed to start: {_reason(exc, self.root)}")
            asyncio.get_running_loop().call_later(RESTART_S, self._start, node)
            return
        proc = _AgentProcess(name, Owner(name), transport, agent=agent)
        self.agents[node] = proc
        if node in self.disk_full:
            self._fill_disk(node)
        proc.task = spawn(proc.owner, agent.run(), name=name)
        proc.task.add_done_callback(functools.partial(self._exited, proc))
        self.note(f"{name} started")

    def _exited(self, proc: _Process, task: asyncio.Task[None]) -> None:
        """A process ended on its own (not killed by a fault): note why, and restart it as systemd would."""
        if proc.killed:
            return
        exc = None if task.cancelled() else task.exception()
        self.note(f"{proc.name} exited: {_reason(exc, self.root)}" if exc is not None else f"{proc.name} exited")
        asyncio.get_running_loop().create_task(self._restart(proc))

    async def _restart(self, proc: _Process) -> None:
        await kill(proc.owner)  # what the process left running dies with it
        if isinstance(proc, _HubProcess) and self.hub is proc:
            self.hub = None
        node = proc.transport.name
        if isinstance(proc, _AgentProcess) and self.agents.get(node) is proc:
            self.agents[node] = None
        await asyncio.sleep(RESTART_S)
        if not self.ending:
            self._start(node)

    def _start(self, name: str) -> None:
        if self.ending:
            return
        if name == HUB:
            if self.hub is None:
                self._start_hub()
        elif self.agents[name] is None:
            self._start_agent(name)

    async def _crash(self, name: str) -> bool:
        """Power off the hub or an agent: no DISCONNECT (the Will fires), nothing written after this instant."""
        proc: _Process | None = self.hub if name == HUB else self.agents[name]
        if proc is None:
            return False
        if isinstance(proc, _HubProcess):
            self.hub = None
        else:
            self.agents[name] = None
        proc.killed = True
        proc.transport.abort()
        # What its cancelled tasks would still write never reaches the disk.
        if isinstance(proc, _AgentProcess) and proc.agent is not None:
            proc.agent.outbox.close()
        if isinstance(proc, _HubProcess) and proc.hub is not None:
            proc.hub.journal.close()
        await kill(proc.owner)
        if isinstance(proc, _HubProcess) and proc.hub is not None:
            proc.hub.lock.release()  # as the end of a process does (its own cleanup may have done it already)
        self.note(f"{proc.name} crashed")
        return True

    @staticmethod
    def _outbox_db(proc: _AgentProcess | None) -> sqlite3.Connection | None:
        # The smallest seam there is: the outbox's own connection, whose authorizer SQLite consults on every write.
        return proc.agent.outbox._db if proc is not None and proc.agent is not None else None  # noqa: SLF001

    def _fill_disk(self, node: str) -> None:
        """The disk under the outbox is full: every write the outbox tries fails (a full disk refuses every WAL
        append; SQLite's authorizer refuses them here, as `not authorized` rather than SQLITE_FULL, which no code
        in the agent tells apart). A restart while it lasts gets its first write through (the constructor's)."""
        self.disk_full[node] = None
        db = self._outbox_db(self.agents.get(node))
        if db is not None:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed: the agent is down, its next start refills
                db.set_authorizer(_refuse_writes)

    def _free_disk(self, node: str) -> None:
        self.disk_full.pop(node, None)
        db = self._outbox_db(self.agents.get(node))
        if db is not None:
            with contextlib.suppress(sqlite3.ProgrammingError):
                db.set_authorizer(None)

    # -- the scenario ----------------------------------------------------------------------------------------------

    async def _at(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))

    async def _submit(self, at: float, run_id: str, spec: Mapping[str, Any]) -> None:
        await self._at(at)
        workflow = workflow_from_data(dict(spec))
        data, inputs = workflow.model_dump(by_alias=True, mode="json"), workflow.resolve_inputs({})
        while not self.ending:
            proc = self.hub
            if proc is not None and proc.hub is not None:
                core = proc.hub.core
                if run_id in core.runs or run_id in core.archived:
                    self.note(f"submitted {run_id} ({workflow.name})")
                    return
                now = self.clock_ms()
                event = RunSubmitted(now, run_id, data, inputs, None, now + int(1000 * (workflow.timeout or 0)))
                # A hub that crashes meanwhile never answers; the next one is asked again (same id: idempotent).
                with contextlib.suppress(Exception):
                    await within(5.0, proc.hub.request([event]))
                    continue
            await asyncio.sleep(1.0)

    def _aim(self, fault: Fault) -> str:
        """The node a fault lands on: one running a step when there is one (faults must hit devices at work)."""
        if fault.target in ("", HUB):
            return fault.target
        busy = [node for node, proc in self.agents.items() if proc is not None and proc.agent is not None
                and proc.agent.runner.running]
        return busy[int(fault.pick * len(busy))] if busy else fault.target

    async def _inject(self, planned: Fault) -> None:
        await self._at(planned.at)
        fault = dataclasses.replace(planned, target=self._aim(planned))
        self.note(f"fault {fault.describe(fault.target)}")
        params = dict(fault.params)
        if fault.kind == "network":
            faults = Faults(**params)
            self.network.faults = faults
            await asyncio.sleep(fault.duration)
            if self.network.faults is faults:
                self.network.faults = Faults(**BASELINE)
        elif fault.kind == "crash":
            if not await self._crash(fault.target):
                self.note(f"{fault.target} is already down")
                return
            await asyncio.sleep(fault.duration)
            self._start(fault.target)
            return
        elif fault.kind == "partition":
            self.broker.partition(fault.target, params["notice"])
            await asyncio.sleep(fault.duration)
            self.broker.heal(fault.target)
        elif fault.kind == "skew":
            skew = int(params["ms"])
            self.skew[fault.target] = skew
            await asyncio.sleep(fault.duration)
            if self.skew.get(fault.target) == skew:
                del self.skew[fault.target]
        elif fault.kind == "disk-full":
            self._fill_disk(fault.target)
            await asyncio.sleep(fault.duration)
            self._free_disk(fault.target)
        self.note(f"healed {fault.kind} {fault.target}".rstrip())

    def _settled(self) -> bool:
        proc = self.hub
        if proc is None or proc.hub is None:
            return False
        core = proc.hub.core
        return all((run_id in core.runs and core.runs[run_id].state in RUN_TERMINAL) or run_id in core.archived
                   for _, run_id, _ in self.plan.runs)

    async def run(self) -> None:
        self._start_hub()
        for node, _ in self.plan.nodes:
            self._start_agent(node)
        scenario = [asyncio.create_task(self._submit(*run)) for run in self.plan.runs]
        scenario += [asyncio.create_task(self._inject(fault)) for fault in self.plan.faults]
        faults_end = max((f.at + f.duration + NOTICE_S[1] for f in self.plan.faults), default=0.0)
        quiet_since: float | None = None
        while self.now() < self.options.deadline_s:
            await asyncio.sleep(1.0)
            if self._settled() and self.now() >= faults_end and all(self.agents.values()):
                quiet_since = self.now() if quiet_since is None else quiet_since
                if self.now() - quiet_since >= QUIET_S:
                    self.quiet_end = True
                    break
            else:
                quiet_since = None
        self.finished_at = self.now()
        self.note("end of the simulation")
        self.ending = True
        self.final_core = self.hub.hub.core if self.hub is not None and self.hub.hub is not None else None
        for task in scenario:
            task.cancel()
        await asyncio.gather(*scenario, return_exceptions=True)
        await self._crash(HUB)  # first: its journal then ends where `final_core` stands
        for node in self.agents:
            await self._crash(node)

    def evidence(self) -> Evidence:
        """What the checker may read: the broker's log, the journal file, the outbox files. Read after the end."""
        journal = Journal(self.root / HUB / "journal.sqlite")
        try:
            events = [event for _, event in journal.events()]
            marks = journal.marks()
        finally:
            journal.close()
        outboxes = read_outboxes(self.root, self.agents)
        kinds = {run_id: str(spec["name"]) for _, run_id, spec in self.plan.runs}
        return Evidence(EPOCH_MS, {name: bytes(key.verify_key) for name, key in self.keys.items()},
                        self.broker.wire, self.broker.deliveries, events,
                        {node: found.entries for node, found in outboxes.items()},
                        [run_id for _, run_id, _ in self.plan.runs], self.final_core, self.options.core_class,
                        self.quiet_end, self.finished_at,
                        expected={run_id: EXPECTED.get(kind, SUCCEEDS) for run_id, kind in kinds.items()},
                        labels=kinds, marks=marks, faults=FaultLog(anywhere=True),  # its faults reach any agent
                        fences={node: found.fences for node, found in outboxes.items()},
                        committed=self.broker.committed)


_UNREPEATABLE = re.compile(r"\bpid \d+|\b0x[0-9a-fA-F]{4,}\b")  # what differs between two runs of one seed


def _repeatable(text: str, root: Path) -> str:
    """`text` without what differs from one run of the seed to the next, so a history stays byte for byte the same:
    the temporary directory `root` (a data lock's message names it), process ids, object addresses."""
    for where in dict.fromkeys((str(root.resolve()), str(root), root.name)):
        text = text.replace(where, "<data>")
    return _UNREPEATABLE.sub(lambda found: "pid ?" if found[0].startswith("pid") else "0x?", text)


def _reason(exc: BaseException, root: Path) -> str:
    """An exception as one line of a history: its type and message, repeatable; a task group's, by its first leaf
    (what actually went wrong)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return _repeatable(f"{type(exc).__name__}: {exc}", root)


def _refuse_writes(action: int, *names: str | None) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) \
        else sqlite3.SQLITE_OK


@contextlib.contextmanager
def _seeded_backoff(rng: random.Random) -> Iterator[None]:
    previous = Backoff.new_rng
    Backoff.new_rng = lambda: random.Random(rng.getrandbits(64))
    try:
        yield
    finally:
        Backoff.new_rng = previous


def _scratch() -> str | None:
    """A RAM disk when there is one: fsync is then free, and a seed costs CPU only."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def simulate(seed: int, options: Options | None = None) -> Outcome:
    """Run one seed and judge it."""
    options = options or Options()
    plan = make_plan(seed, options.faults)
    root = Path(tempfile.mkdtemp(prefix=f"fleetflow-dst-{seed}-", dir=_scratch()))
    try:
        world = World(plan, options, root)
        with _seeded_backoff(world.backoff_rng):
            virtual_time.run(world.run(), on_error=world.on_loop_error)
        evidence = world.evidence()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Outcome(seed, plan, check(evidence), evidence, world.events, world.finished_at)
