"""Simulator pieces: device profiles, the fleet plan, simulated telemetry, faults (their
targets, gates and file), the driver's waits, figures and table."""

from __future__ import annotations

import ast
import contextlib
import asyncio
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from agent.runtime.memory import WireRecord
from agent.runtime.profiles import ProfileError, as_document, load_profile, profile_from_document
from hub.client import Client
from hub.events import RunSubmitted
from hub.journal import Journal
from hub.workflow import WorkflowError
from protocols import FleetflowError
from sim.driver import Census, _read_files, faults_settled, fleet_table
from sim.fault_file import load_faults, parse_faults
from sim.faults import (BrokerRestart, Busy, FaultContext, Flap, Heat, Kill, KillsLanded, Partition, Pick, Rogue, RunEnded,
                        RunningStep, Scheduled, Skew, Slow, Spike, StepMigrated, needs_relay)
from sim.hub_api import (READS_PER_ROUND, HubApi, RunStates, WaitTimeout, lag_p99, messages_total, refused_total,
                         wait_until)
from sim.orchestra import Orchestra, Worker, parse_mix, plan
from sim.profiles import PROFILE_MODEL, ProfileFileError, load_all, parse
from sim.recorder import Gap, Recording
from sim.telemetry import SimTelemetry
from sim.worker import cancel_until_done

ROOT = Path(__file__).resolve().parents[2]


def fleetflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "fleetflow"), *args], capture_output=True, text=True,
                          timeout=60)


def test_five_device_classes_validate() -> None:
    profiles = load_all()
    assert {"rpi4", "ipc", "gateway", "jetson", "container"} <= set(profiles)
    out = fleetflow("profiles", "validate")
    assert out.returncode == 0 and out.stdout.count(": ok") >= 5
    assert '"step_speed"' in fleetflow("profiles", "show", "gateway").stdout


def test_bad_profiles_are_refused_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "toaster.toml"
    bad.write_text('name = "toaster"\n[resources]\ncores = 0\nmemory_mb = 1\ndisk_gb = 1\n'
                   '[intervals]\nheartbeat_s = 5\ntelemetry_s = 5\n')
    with pytest.raises(ProfileFileError, match="resources.cores"):
        parse(bad)
    out = fleetflow("profiles", "validate", str(bad))
    assert out.returncode == 1 and "resources.cores" in out.stderr
    assert fleetflow("profiles", "show", "toaster").returncode == 2


def test_plan_follows_the_mix() -> None:
    devices = plan(100, parse_mix("rpi4=60,ipc=40"))
    assert len(devices) == 100 and sum(d["profile"] == "rpi4" for d in devices) == 60
    assert len({d["node_id"] for d in devices}) == 100
    assert len(plan(7, {"a": 1, "b": 1, "c": 1})) == 7
    with pytest.raises(ValueError, match="name=weight"):
        parse_mix("rpi4")


def test_thermal_model_heats_with_load_and_obeys_overrides() -> None:
    profile = load_all()["rpi4"]
    idle = SimTelemetry(profile, random.Random(1))
    busy = SimTelemetry(profile, random.Random(1))
    busy.busy = profile.max_concurrent
    for _ in range(60):
        a, b = idle.sample(), busy.sample()
    assert b["temp"] > a["temp"] + 10 and b["cpu"] > a["cpu"]
    busy.overrides["temp"] = 95.0
    assert busy.sample()["temp"] == 95.0


# -- faults, their targets and gates, the fault file, the driver's table ------------------------------------------

DEVICES = ["d-0", "d-1", "d-2", "d-3", "d-4", "d-5"]


class RecordingOrchestra(Orchestra):
    """The real orchestra, never started: what it would send to its workers is kept instead."""

    def __init__(self) -> None:
        super().__init__("mqtt://127.0.0.1:1", "f", "00" * 32, Path("/nonexistent"),
                         [{"node_id": d, "profile": "rpi4"} for d in DEVICES])
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.cut: dict[str, int] = {}
        self.at_work: set[str] = set()  # what the workers' reports say is running steps

    async def fault(self, node: str, command: dict[str, Any]) -> None:
        self.sent.append((node, command))

    @property
    def killed(self) -> dict[str, int]:
        return dict(self.cut)

    @property
    def busy(self) -> set[str]:
        return set(self.at_work)


class FakeHub:
    """The hub's API answers, as plain data behind httpx's mock transport: the real client and HubApi run on it."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {"/nodes": [], "/runs/r1": {"id": "r1", "state": "running", "steps": []}}

    def handle(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=self.answers[request.url.path])

    def api(self, monkeypatch: pytest.MonkeyPatch) -> HubApi:
        monkeypatch.setenv("FLEETFLOW_TOKEN", "t")
        client = Client("http://hub.test", None, None)
        client.http = httpx.Client(base_url="http://hub.test", transport=httpx.MockTransport(self.handle))
        return HubApi(client)

    def step(self, *attempts: tuple[str, str, str | None]) -> None:
        self.answers["/runs/r1"]["steps"] = [{"id": "infer", "attempts": [
            {"id": f"a{i}", "node": node, "state": state, "reason": reason}
            for i, (node, state, reason) in enumerate(attempts)]}]


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> tuple[FaultContext, RecordingOrchestra, FakeHub]:
    hub = FakeHub()
    orchestra = RecordingOrchestra()
    return FaultContext(orchestra, hub.api(monkeypatch), random.Random(1), runs={"thermal": "r1"}), orchestra, hub


def test_fault_file_parses_into_fault_values(tmp_path: Path) -> None:
    timeline = load_faults(Path(__file__).resolve().parents[2] / "sim" / "faults" / "mixed.yaml")
    assert [type(s.fault) for s in timeline] == [Kill, Partition, Spike, Slow, Skew, Flap, Rogue]
    assert timeline[0] == Scheduled(Kill(Pick(percent=6)), at=3)
    assert timeline[1].fault == Partition(Pick(count=2), duration_s=15)
    assert timeline[5].fault == Flap(Pick(count=1), times=2, every_s=3)
    assert parse_faults("faults:\n  - {at: 0, heat: {nodes: [d-1], temp: 90}}\n", "f")[0].fault == \
        Heat(Pick(nodes=("d-1",)), temp=90)
    assert needs_relay(timeline) and not needs_relay(timeline[2:])
    for text, says in [("- {at: 1, kill: {count: 1}, rogue: {}}", "exactly one kind"),
                       ("- {at: 1, slow: {count: 1, percent: 5, factor: 2}}", "exactly one of count, percent"),
                       ("- {at: 1, partition: {count: 1, for: 0}}", "partition.for"),
                       ("- {at: 1, kill: {count: 1, label: x}}", "kill.label")]:
        with pytest.raises(WorkflowError, match=says):
            parse_faults(f"faults:\n  {text}\n", "f")


def test_random_picks_skip_devices_a_fault_took_down(fleet: tuple[FaultContext, RecordingOrchestra, FakeHub]
                                                     ) -> None:
    ctx, orchestra, _ = fleet

    async def scenario() -> None:
        assert await Kill(Pick(count=2)).apply(ctx)
        assert await Partition(Pick(count=2), duration_s=8).apply(ctx)
        assert await Slow(Pick(percent=100), factor=3).apply(ctx)
        assert await Skew(Pick(nodes=("d-0", "d-1", "d-2", "d-3", "d-4", "d-5")), seconds=30).apply(ctx)

    asyncio.run(scenario())
    killed = [n for n, c in orchestra.sent if c == {"cmd": "kill"}]
    partitioned = [n for n, c in orchestra.sent if c == {"cmd": "partition", "for": 8}]
    slowed = [n for n, c in orchestra.sent if c == {"cmd": "slow", "factor": 3}]
    skewed = [n for n, c in orchestra.sent if c == {"cmd": "skew", "seconds": 30}]
    assert len(killed) == 2 and len(partitioned) == 2 and not set(killed) & set(partitioned)
    assert sorted(slowed) == sorted(skewed) == sorted(set(DEVICES) - set(killed) - set(partitioned))  # slow: still up
    assert ctx.applied[0] == f"kill: {', '.join(killed)}" and ctx.applied[2].startswith("slow: ")
    assert ctx.kills_sent == set(killed)


def test_aimed_faults_wait_for_their_target(fleet: tuple[FaultContext, RecordingOrchestra, FakeHub]) -> None:
    ctx, orchestra, hub = fleet
    hot = RunningStep("thermal", "infer")

    async def scenario() -> None:
        hub.step(("d-1", "assigned", None))
        assert not await Heat(hot, temp=95).apply(ctx) and not orchestra.sent  # not running yet: nothing sent
        hub.step(("d-1", "running", None))
        assert await Heat(hot, temp=95).apply(ctx)
        assert not await StepMigrated("thermal", "infer").holds(ctx)
        hub.step(("d-1", "lost", "migrated: d-1 unhealthy"), ("d-4", "running", None))
        assert await StepMigrated("thermal", "infer").holds(ctx)
        assert not await RunEnded("thermal").holds(ctx)
        hub.answers["/runs/r1"]["state"] = "succeeded"
        assert await RunEnded("thermal").holds(ctx) and not await RunEnded("never submitted").holds(ctx)
        # Power cuts land on devices at work, as the devices report it, seen so over two of their reports.
        cut = Kill(Busy(2), label="power cut")
        orchestra.at_work = {"d-0", "d-2", "d-4"}
        assert not await cut.apply(ctx)                     # just seen: perhaps a step of a few ms
        now[0] += 1.0
        orchestra.at_work = {"d-0", "d-4", "d-5"}           # d-2 stopped; d-5 started
        assert not await cut.apply(ctx)
        now[0] += 1.0
        assert not await cut.apply(ctx)                     # only d-0 long enough (d-4 was taken down)
        now[0] += 5.0                                       # a pause: what was seen before counts no more
        orchestra.at_work = {"d-0", "d-2", "d-5"}
        assert not await cut.apply(ctx)
        now[0] += 0.8
        assert not await cut.apply(ctx)
        now[0] += 0.8
        assert await cut.apply(ctx)
        assert not await KillsLanded().holds(ctx)
        orchestra.cut = {"d-0": 1, "d-5": 1, "d-2": 1}
        assert await KillsLanded().holds(ctx)

    now = [0.0]
    ctx.clock = lambda: now[0]
    ctx.down.add("d-4")
    asyncio.run(scenario())
    assert orchestra.sent[0] == ("d-1", {"cmd": "heat", "temp": 95})
    cut_off = [node for node, command in orchestra.sent if command == {"cmd": "kill"}]
    assert len(set(cut_off)) == 2 and set(cut_off) <= {"d-0", "d-2", "d-5"}
    assert ctx.applied == ["d-1 overheats (95 C)", f"power cut: {', '.join(cut_off)}"]


def test_a_power_cut_the_agent_outlived_is_said_and_not_counted_as_a_kill(
        fleet: tuple[FaultContext, RecordingOrchestra, FakeHub]) -> None:
    ctx, recording, _ = fleet
    orchestra = Orchestra("mqtt://127.0.0.1:1", "f", "00" * 32, Path("/nonexistent"), recording.devices)
    worker = Worker(None, ["d-0", "d-1"])  # type: ignore[arg-type]  # fed its printed events, never started
    orchestra.workers.append(worker)
    ctx.orchestra = orchestra
    ctx.kills_sent.update({"d-0", "d-1"})
    worker.note({"event": "killed", "node": "d-1", "at": 5, "running": ["a1"]})
    assert not asyncio.run(KillsLanded().holds(ctx))  # d-0's cut has not been carried out yet
    worker.note({"event": "cut-failed", "node": "d-0", "fault": "kill"})
    assert asyncio.run(KillsLanded().holds(ctx))  # said not to have taken: nothing to wait for
    assert orchestra.killed == {"d-1": 5} and orchestra.killed_running == {"d-1": ["a1"]}
    assert orchestra.cut_failed == ["d-0"]


def test_the_broker_restart_says_what_it_did(fleet: tuple[FaultContext, RecordingOrchestra, FakeHub]) -> None:
    ctx, _, _ = fleet
    seen = []

    class Broker:
        async def restart(self, down_s: float) -> None:
            seen.append(list(ctx.applied))

    with pytest.raises(ValueError, match="manages"):
        asyncio.run(BrokerRestart().apply(ctx))
    ctx.broker = Broker()
    asyncio.run(BrokerRestart(down_s=2).apply(ctx))
    assert seen == [["broker down"]] and ctx.applied == ["broker restarted after 2 s"]


def test_bounded_waits() -> None:
    calls = []

    async def never() -> bool:
        calls.append(1)
        return False

    with pytest.raises(WaitTimeout, match="waited 0.2 s for nothing"):
        asyncio.run(wait_until(never, 0.2, "nothing", every=0.05))
    assert 2 <= len(calls) <= 6
    assert asyncio.run(wait_until(never, 0.1, "nothing", every=0.05, give_up=True)) is False

    async def stuck() -> bool:  # a probe waiting for a round of reads that never comes
        await asyncio.Event().wait()
        return True

    with pytest.raises(WaitTimeout, match="a stuck probe"):
        asyncio.run(wait_until(stuck, 0.1, "a stuck probe"))


def test_the_end_waits_for_partitions_to_heal_and_outboxes_to_drain() -> None:
    """The checker reads the outboxes once the faults are over: a device back from a partition must be online at the
    hub and what it held through the partition acknowledged (a CI run checked while it was resending)."""
    nodes = [{"id": "d1", "liveness": "online"}, {"id": "d2", "liveness": "failed"}, {"id": "d3", "liveness": "online"}]
    killed, partitioned = {"d2"}, {"d3"}
    assert faults_settled(nodes, killed, partitioned, set(), 0)
    assert not faults_settled(nodes, killed, partitioned, {"d3"}, 0)  # the partition is still on
    assert not faults_settled(nodes, killed, partitioned, set(), 1)   # a device still holds an unacknowledged entry
    back = [{**n, "liveness": "failed"} if n["id"] == "d3" else n for n in nodes]
    assert not faults_settled(back, killed, partitioned, set(), 0)    # healed, but the hub has not seen it return
    alive = [{**n, "liveness": "online"} for n in nodes]
    assert not faults_settled(alive, killed, partitioned, set(), 0)   # a device whose power was cut, not yet detected
    # a device partitioned and later killed is judged as killed
    assert faults_settled([*nodes[:2], {"id": "d3", "liveness": "offline"}], {"d2", "d3"}, partitioned, set(), 0)


def test_figures_from_the_hub_metrics() -> None:
    text = ('fleetflow_messages_total{type="hb"} 10\nfleetflow_messages_total{type="tel"} 5\n'
            'fleetflow_rejected_total{reason="replayed"} 3\nfleetflow_rejected_total{reason="too-big"} 7\n'
            'fleetflow_ingest_lag_seconds_bucket{le="0.01"} 90\nfleetflow_ingest_lag_seconds_bucket{le="0.1"} 99\n'
            'fleetflow_ingest_lag_seconds_bucket{le="+Inf"} 100\n')
    assert messages_total(text) == 15 and refused_total(text) == 3 and lag_p99(text) == 0.1


def test_one_table_for_both_commands() -> None:
    census = Census(devices=6, connected=5, liveness={"online": 5, "failed": 1}, health={"healthy": 6},
                    runs={"running": 2}, migrations=1, messages_per_s=12, lag_p99_s=0.05, unacknowledged=3,
                    faults=("kill: d-1",))
    console = Console(width=200, record=True)
    console.print(fleet_table("fleetflow sim", census))
    text = console.export_text()
    for row in ("devices connected  5/6", "nodes by liveness  online 5, failed 1", "nodes by health    healthy 6",
                "runs by state      running 2", "migrations         1", "messages/s at the hub  12",
                "hub ingest lag p99 <= 0.05 s", "results waiting for acks  3", "faults applied     kill: d-1"):
        assert " ".join(row.split()) in " ".join(text.replace("│", " ").split()), row


def test_one_profile_schema_for_the_agent_and_the_full_check(tmp_path: Path) -> None:
    """The full check is built from the agent's declaration: both read every profile, and every default, the same."""
    for name, checked in load_all().items():
        assert checked == load_profile(name)
    minimal = {"name": "tiny", "resources": {"cores": 1, "memory_mb": "64", "disk_gb": 1},
               "intervals": {"heartbeat_s": 2, "telemetry_s": 4}, "thresholds": {"temp": {"high": 60, "critical": 70}}}
    agent_reads = as_document(profile_from_document(minimal, tmp_path / "tiny.toml"))
    assert PROFILE_MODEL.model_validate(minimal).model_dump() == agent_reads
    assert agent_reads["sim"]["cooling"] == 0.1 and agent_reads["resources"]["memory_mb"] == 64.0
    for document, says in [({**minimal, "capabilities": "gpio"}, "capabilities: expected a list"),
                           ({"name": "tiny", "intervals": minimal["intervals"]}, "resources.cores: required"),
                           ({**minimal, "thresholds": {"temp": {"high": 60}}}, "thresholds.temp.critical: required")]:
        with pytest.raises(ProfileError, match=says):
            profile_from_document(document, tmp_path / "tiny.toml")


def test_the_driver_reads_every_submitted_run_though_the_listing_shows_the_newest_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /runs lists the newest 200; a session submits more (its workload): the others are read one by one, a
    bounded number per round, until terminal, and never again after that."""
    states = {f"r{k}": "running" for k in range(1, 251)}  # submitted in this order: r1 is the oldest
    reads: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/runs":
            newest = list(states)[::-1][:200]
            return httpx.Response(200, json=[{"id": r, "state": states[r]} for r in newest])
        run_id = request.url.path.rsplit("/", 1)[1]
        reads.append(run_id)
        return httpx.Response(200, json={"id": run_id, "state": states[run_id]})

    monkeypatch.setenv("FLEETFLOW_TOKEN", "t")
    client = Client("http://hub.test", None, None)
    client.http = httpx.Client(base_url="http://hub.test", transport=httpx.MockTransport(handle))
    api, runs, submitted = HubApi(client), RunStates(), list(states)

    async def rounds(count: int) -> None:
        for _ in range(count):
            await runs.refresh(api, submitted)

    for run_id in states:
        states[run_id] = "succeeded"
    asyncio.run(rounds(1))
    assert len(reads) == READS_PER_ROUND and not runs.all_terminal(submitted)  # bounded per round
    asyncio.run(rounds(2))
    assert runs.all_terminal(submitted) and sorted(reads) == sorted(submitted[:50])  # each of the 50 unlisted once
    assert runs.of(submitted).count("succeeded") == 250
    asyncio.run(rounds(1))
    assert len(reads) == 50  # terminal: not read again


def test_the_wire_recording_and_the_journal_export_are_private(tmp_path: Path) -> None:
    """wire.jsonl holds every payload (enrollment replies carry broker passwords); journal.jsonl, step inputs."""
    journal = Journal(tmp_path / "journal.sqlite")
    journal.append_now([RunSubmitted(1, "r1")])
    journal.close()
    (tmp_path / "wire.jsonl").write_text("left over\n")
    (tmp_path / "wire.jsonl").chmod(0o644)  # a file from an earlier run keeps no mode of its own
    recording = Recording(1_700_000_000_000, [WireRecord(0.5, "hub", "fleetflow/v1/f/node/n1/cmd", b"secret", 1,
                                                         False, False, True)], [Gap(1, 2)])
    _outboxes, events, _marks = _read_files(recording, tmp_path, [], tmp_path / "journal.sqlite")
    assert [e.run for e in events if isinstance(e, RunSubmitted)] == ["r1"]
    for name in ("wire.jsonl", "journal.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    saved = (tmp_path / "wire.jsonl").read_text()
    assert saved.count("\n") == 2 and b"secret".hex() in saved


def test_the_simulator_s_errors_are_fleetflow_errors_and_keep_their_old_base() -> None:
    assert issubclass(WaitTimeout, FleetflowError) and issubclass(WaitTimeout, TimeoutError)
    assert issubclass(ProfileFileError, FleetflowError) and issubclass(ProfileFileError, ValueError)


def test_the_simulator_uses_the_agent_through_its_public_api() -> None:
    """sim/ and bench/dst.py import `agent` (its curated names) and `agent.runtime`, the shared helpers; the one other
    module is the command composition (agent/extras.py), which the `profiles` command asks which extra is missing."""
    found = []
    for path in [*sorted((ROOT / "sim").glob("*.py")), ROOT / "bench" / "dst.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("agent.") and not name.startswith("agent.runtime") and \
                        (name, path.name) != ("agent.extras", "commands.py"):
                    found.append(f"{path.name}: {name}")
    assert found == []


def test_a_power_cut_cancels_again_an_agent_that_lost_a_cancellation() -> None:
    """A device whose wait lost the first cancellation (as Python 3.11's `asyncio.wait_for` can) still ends; one that
    never ends is reported as such after the tries run out, never waited for without bound."""

    async def main() -> tuple[int, bool, bool]:
        lost = 0
        undying = True

        async def device() -> None:
            nonlocal lost
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if lost == 0:  # the first one is lost, as a wait_for that completed at that moment loses it
                        lost += 1
                        continue
                    raise

        async def stubborn() -> None:
            while undying:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)

        task, other = asyncio.create_task(device()), asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        ended = await cancel_until_done(task, tries=5, every=0.05)
        gave_up = not await cancel_until_done(other, tries=3, every=0.01)
        undying = False  # let it end, so the loop can close
        other.cancel()
        await asyncio.wait({other})
        return lost, ended and task.cancelled(), gave_up

    assert asyncio.run(main()) == (1, True, True)
