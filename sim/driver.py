"""The one driver behind `fleetflow sim` and `fleetflow demo`: starts the wire recorder, boots the simulated fleet,
submits the scenario's workflows and its workload, applies its fault timeline, keeps one live table, waits (always
within a deadline, each wait reported) for the runs to end and the killed devices to be seen, and runs the history
checker.

The driver steers through the hub's HTTP API (sim/hub_api.py), whether the hub is another process (`sim`) or lives
in this one (`demo`). The checker never does: it judges from the wire recording, the journal file, the outbox files
and the fault log (sim/history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.runtime.storage import write_private
from hub.events import Event
from hub.journal import Mark
from hub.journal_commands import export
from protocols import HUB_ID

from .evidence import (
    Evidence,
    FaultLog,
    OutboxFile,
    load_export,
    node_keys,
    read_outboxes,
)
from .faults import BrokerControl, FaultContext, Scheduled, migrated
from .history import judge
from .hub_api import SUBMITTING, HubApi, RunStates, WaitTimeout, lag_p99, messages_total, wait_until
from .orchestra import Orchestra
from .recorder import Recording, WireRecorder
from .scenario import Scenario, Submission
from .verdict import Verdict

READ_SHARE = 10      # the reads behind the table and the waits take at most 1/10 of the time, however large the fleet
MIGRATIONS_EVERY = 4  # rounds of reads per read of every submitted run
SETTLE_S = 5.0       # a real broker delivers within this: older unacknowledged entries are stuck, not on their way


def tally(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


@dataclass(frozen=True)
class Census:
    """What the live table shows."""

    devices: int
    connected: int = 0
    liveness: dict[str, int] = field(default_factory=dict)
    health: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    migrations: int = 0
    messages_per_s: float = 0.0
    lag_p99_s: float = float("nan")
    unacknowledged: int = 0
    faults: tuple[str, ...] = ()


def faults_settled(nodes: list[dict[str, Any]], killed: set[str], partitioned: set[str], cut_off: set[str],
                   outbox: int) -> bool:
    """The faults are over as the hub and the devices see them: every device whose power was cut is failed or
    offline at the hub, no partition is still on, every device whose partition healed is online again, and the
    running devices' outboxes hold nothing (`outbox`: their count of unacknowledged entries)."""
    liveness = {node["id"]: node["liveness"] for node in nodes}
    return (not cut_off and outbox == 0
            and all(liveness.get(node) in ("failed", "offline") for node in killed)
            and all(liveness.get(node) == "online" for node in partitioned - killed))


def fleet_table(title: str, census: Census) -> Table:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("now")
    table.add_row("devices connected", f"{census.connected}/{census.devices}")
    table.add_row("nodes by liveness", _pairs(census.liveness))
    table.add_row("nodes by health", _pairs(census.health))
    table.add_row("runs by state", _pairs(census.runs))
    table.add_row("migrations", str(census.migrations))
    table.add_row("messages/s at the hub", f"{census.messages_per_s:.0f}")
    table.add_row("hub ingest lag p99", "-" if census.lag_p99_s != census.lag_p99_s else f"<= {census.lag_p99_s:g} s")
    table.add_row("results waiting for acks", str(census.unacknowledged))
    table.add_row("faults applied", "; ".join(census.faults[-4:]) or "-")
    return table


@dataclass(frozen=True)
class Waited:
    """One bounded wait of the driver: what for, how long it took, and whether it ran out."""

    what: str
    seconds: float
    timed_out: bool


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    boot_s: float
    faults: tuple[str, ...]
    killed: dict[str, int]        # node -> when its power was cut (ms, wall clock)
    partitioned: dict[str, int]   # node -> when its partition began
    injected: int                 # forged or replayed messages sent by a rogue device
    refused: int                  # of those, the ones the checker found refused, message by message
    runs: int = 0                 # runs submitted (the scenario's and the workload's)
    on_running_work: tuple[str, ...] = ()  # faults that landed on a device while it ran steps
    waits: tuple[Waited, ...] = ()
    late: int = 0                 # workload runs that fell due and were not sent: the hub answered too slowly


class Driver:
    """`async with Driver(...) as driver: outcome = await driver.run(scenario)`; the simulated devices run from
    entering to leaving, so a caller may keep them up after the run (`fleetflow demo --keep-running`)."""

    def __init__(self, api: HubApi, orchestra: Orchestra, console: Console, seed: int, journal: Path,
                 broker: BrokerControl | None = None) -> None:
        self.api, self.orchestra, self.console, self.journal = api, orchestra, console, journal
        self.ctx = FaultContext(orchestra, api, random.Random(seed), broker)
        self.recorder = WireRecorder(orchestra.broker, orchestra.fleet)
        self.expected: dict[str, Submission] = {}   # run id -> what was submitted
        self.waits: list[Waited] = []
        self.late = 0
        self.phase = "starting"
        self.started = time.monotonic()
        self._census = Census(len(orchestra.devices))
        self._messages: tuple[float, float] | None = None  # (when, total) at the last scrape
        # the last round of reads, for the waits
        self._round = 0
        self._rounds = asyncio.Condition()
        self._broken: Exception | None = None
        self._nodes: list[dict[str, Any]] = []      # the simulated devices, as the hub lists them
        self._runs = RunStates()                    # the submitted runs' states

    async def __aenter__(self) -> Self:
        await self.recorder.start()  # before any device: the record begins with their first message
        await self.orchestra.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.recorder.stop()
        took = await self.orchestra.stop()
        if took > 5:
            self.console.print(f"stopping the simulated devices took {took:.1f} s")

    async def _wait(self, probe: Callable[[], Awaitable[Any]], timeout: float, what: str, every: float = 0.5,
                    give_up: bool = False) -> Any:
        """`wait_until`, with the wait kept for the report (and said at once when it ran out)."""
        started = time.monotonic()
        try:
            value = await wait_until(probe, timeout, what, every=every, give_up=give_up)
        except WaitTimeout:
            self.waits.append(Waited(what, round(time.monotonic() - started, 2), True))
            raise
        took = round(time.monotonic() - started, 2)
        timed_out = give_up and took >= timeout
        self.waits.append(Waited(what, took, timed_out))
        if timed_out:
            self.console.print(f"waited {timeout:g} s for {what}: went on without it")
        return value

    async def _submit(self, submission: Submission, label: str | None = None) -> None:
        created = await self.api.post("/runs", {"workflow": submission.text()})
        run_id = str(created["id"])
        self.ctx.runs[label or submission.label] = run_id
        self.expected[run_id] = submission

    async def _workload(self, scenario: Scenario, until: float) -> None:
        """The scenario's workload, at its rate per device, until `until` (monotonic)."""
        workload = scenario.workload
        if workload is None or workload.rate <= 0 or not workload.submissions:
            return
        every = 60.0 / (workload.rate * len(self.orchestra.devices))
        start, count = time.monotonic(), 0
        # Due times are absolute (start + k * every) and up to SUBMITTING requests are in flight at once, so a slow
        # answer does not lower the rate; a hub slower than that holds the workload back (`late` counts the runs that
        # fell due and were never sent), and it ends with the duration all the same.
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while start + (count + 1) * every <= until:
                await _sleep_until(start + (count + 1) * every)
                while True:
                    for task in [t for t in in_flight if t.done()]:
                        in_flight.discard(task)
                        task.result()  # a refused submission stops the session, as one awaited would
                    if len(in_flight) < SUBMITTING or time.monotonic() >= until:
                        break
                    await asyncio.wait(in_flight, timeout=until - time.monotonic(), return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() >= until:
                    break
                submission = workload.submissions[count % len(workload.submissions)]
                count += 1
                in_flight.add(asyncio.create_task(self._submit(submission, f"{submission.label}-{count}")))
            due = count
            while start + (due + 1) * every <= until:  # the loop's own condition, so the count cannot drift by one
                due += 1
            self.late = due - count
            await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            # Collected, so a second failure is not reported as never retrieved: the session raises the first.
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def run(self, scenario: Scenario) -> Outcome:
        self.started = time.monotonic()
        async with self._live_table(scenario):
            self.phase = "devices booting"
            await self._boot(scenario.boot_deadline_s)
            boot_s = time.monotonic() - self.started
            self.phase = "running scenarios"
            for submission in scenario.submissions:
                await self._submit(submission)
            submitted = time.monotonic()
            workload = asyncio.create_task(self._workload(scenario, submitted + scenario.duration_s))
            try:
                for entry in sorted(scenario.timeline, key=lambda e: e.at):
                    # A fault scheduled past the duration still happens, when the duration ends.
                    await _sleep_until(submitted + min(entry.at, scenario.duration_s or entry.at))
                    await self._apply(entry)
                if scenario.duration_s:
                    self.phase = f"running ({scenario.duration_s:g} s)"
                    await _sleep_until(submitted + scenario.duration_s)
                await workload
            finally:
                workload.cancel()
            self.phase = "waiting for every run to end and every outbox to drain"
            await self._wait(self._ended, scenario.end_deadline_s, "every run to end and every outbox to drain",
                             every=0, give_up=True)
            await asyncio.sleep(scenario.settle_s)
            self.phase = "checking"
            evidence = await self._evidence()
            # The checker reads files: in a thread, so this loop (and a hub living in it) keeps serving meanwhile.
            verdict = await asyncio.to_thread(judge, evidence)
            for expectation in scenario.expectations:
                verdict.add(*await asyncio.to_thread(expectation.evaluate, self.ctx, evidence.journal))
        injected = verdict.figures.get("injected", {})
        return Outcome(verdict, boot_s, tuple(self.ctx.applied), self.orchestra.killed, self.orchestra.partitioned,
                       self.ctx.injected, int(injected.get("refused", 0)), len(self.expected),
                       tuple(self.orchestra.on_running_work + self.ctx.on_work), tuple(self.waits), self.late)

    async def _evidence(self) -> Evidence:
        """What the checker judges, read in the order that makes it consistent: the wire record is closed first;
        then the outboxes (an entry gone was acked, so journaled, before this read); then the journal."""
        recording = await self.recorder.stop()
        end = time.time() - recording.epoch_ms / 1000
        nodes = [d["node_id"] for d in self.orchestra.devices]
        root = self.orchestra.root
        outboxes, events, marks = await asyncio.to_thread(_read_files, recording, root, nodes, self.journal)
        keys = node_keys(root, nodes)
        keys[HUB_ID] = bytes.fromhex(self.orchestra.hub_key)
        killed = self.orchestra.killed
        # A device still cut off at the end (its partition outlasted the wait) keeps what it holds, as one powered off.
        down = set(killed) | self.orchestra.cut_off
        faults = FaultLog(list(self.ctx.messages), killed, self.orchestra.partitioned, down,
                          self.orchestra.cut_failed,
                          anywhere=any(entry.startswith("broker restarted") for entry in self.ctx.applied))
        return Evidence(recording.epoch_ms, keys, recording.records, [], events,
                        {node: found.entries for node, found in outboxes.items()}, list(self.expected), None,
                        end=end, expected={run: s.expect for run, s in self.expected.items()},
                        labels={run: label for label, run in self.ctx.runs.items()}, faults=faults,
                        gaps=recording.gaps, marks=marks,
                        fences={node: found.fences for node, found in outboxes.items()}, settle_s=SETTLE_S)

    async def _boot(self, deadline_s: float) -> None:
        online = 0

        async def all_online() -> bool:
            nonlocal online
            await self._next_round()
            online = sum(1 for n in self._nodes if n["liveness"] == "online")
            return online == len(self.orchestra.devices)

        try:
            await self._wait(all_online, deadline_s, "the devices", every=0)
        except WaitTimeout:
            raise WaitTimeout(f"only {online}/{len(self.orchestra.devices)} devices came online within "
                              f"{deadline_s:g} s") from None

    async def _apply(self, entry: Scheduled) -> None:
        ctx = self.ctx
        gate = entry.after
        if gate is not None:
            self.phase = f"waiting for {gate}"
            await self._wait(lambda: gate.holds(ctx), entry.wait_s, str(gate), give_up=True)
        self.phase = "faults"
        aim = getattr(entry.fault, "target", "its target")
        await self._wait(lambda: entry.fault.apply(ctx), entry.wait_s, f"{aim} (for {type(entry.fault).__name__})")

    async def _ended(self) -> bool:
        """Every submitted run is over, every device whose power was cut is seen as such, every partition has healed
        with its devices back online, and the devices' outboxes are empty (as their last stats line says): a result
        held through a partition is resent and acknowledged before the checker reads the outboxes."""
        await self._next_round()
        orchestra = self.orchestra
        return (self._runs.all_terminal(list(self.ctx.runs.values()))
                and faults_settled(self._nodes, set(orchestra.killed), set(orchestra.partitioned), orchestra.cut_off,
                                   orchestra.outbox))

    @contextlib.asynccontextmanager
    async def _live_table(self, scenario: Scenario) -> AsyncIterator[None]:
        """Rounds of reads of the hub, each shown in the table and then handed to the waits (`_next_round`), so
        the table and the waits cost the hub one set of reads."""
        with Live(self._table(scenario), console=self.console, refresh_per_second=4, transient=False) as live:

            async def refresh() -> None:
                try:
                    while True:
                        took = await self._observe()
                        live.update(self._table(scenario))
                        async with self._rounds:
                            self._rounds.notify_all()
                        await asyncio.sleep(max(scenario.refresh_s, (READ_SHARE - 1) * took))
                except Exception as exc:
                    self._broken = exc
                    async with self._rounds:
                        self._rounds.notify_all()
                    raise

            refresher = asyncio.create_task(refresh())
            try:
                yield
            finally:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
                live.update(self._table(scenario))
        if not self.console.is_terminal:  # Rich ends a live display with a newline only on a terminal
            self.console.line()
        if self._broken is not None:
            raise self._broken

    async def _next_round(self) -> None:
        """Until the next round of reads is in; its error if the reads failed."""
        async with self._rounds:
            if self._broken is None:
                await self._rounds.wait()
        if self._broken is not None:
            raise self._broken

    def _table(self, scenario: Scenario) -> Table:
        title = f"fleetflow {scenario.name} - {self.phase} - {time.monotonic() - self.started:.0f} s"
        return fleet_table(title, self._census)

    async def _observe(self) -> float:
        """One round of reads; how long it took."""
        started = time.monotonic()
        text = await self.api.metrics()
        now, total = time.monotonic(), messages_total(text)
        rate = self._census.messages_per_s
        if self._messages is not None:
            rate = (total - self._messages[1]) / max(1e-6, now - self._messages[0])
        self._messages = (now, total)
        submitted = list(self.ctx.runs.values())
        await self._runs.refresh(self.api, submitted)
        mine = {d["node_id"] for d in self.orchestra.devices}
        self._nodes = [n for n in await self.api.get("/nodes") if n["id"] in mine]
        migrations = self._census.migrations
        if self._round % MIGRATIONS_EVERY == 0:  # only the migrations row needs every submitted run in full
            details = [await self.api.get(f"/runs/{r}") for r in submitted]
            migrations = sum(1 for d in details for s in d.get("steps", []) for a in s["attempts"] if migrated(a))
        self._round += 1
        self._census = Census(len(mine), self.orchestra.connected, tally(n["liveness"] for n in self._nodes),
                              tally(n["health"] for n in self._nodes), tally(self._runs.of(submitted)), migrations,
                              rate, lag_p99(text), self.orchestra.outbox, tuple(self.ctx.applied))
        return time.monotonic() - started


def _read_files(recording: Recording, root: Path, nodes: list[str], journal: Path
                ) -> tuple[dict[str, OutboxFile], list[Event], dict[str, Mark]]:
    """The outboxes, then the journal (exported into the work directory, beside the wire recording, so what the
    checker judged can be looked at again)."""
    recording.save(root / "wire.jsonl")
    outboxes = read_outboxes(root, nodes)
    exported = io.StringIO()
    export(journal, exported)
    write_private(root / "journal.jsonl", exported.getvalue().encode())  # 0600: step inputs and outputs
    events, marks = load_export(exported.getvalue().splitlines())
    return outboxes, events, marks


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))
