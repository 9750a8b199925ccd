"""`fleetflow sim`: simulated devices against an external broker and hub, the timeline of a fault file, a workload
proportional to the fleet, and the driver's live table and history checker (sim/driver.py); then a JSON report."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from hub.client import Client

from .driver import Driver, Outcome
from .faults import Scheduled, needs_relay
from .hub_api import HubApi, WaitTimeout, lag_p99
from .orchestra import Orchestra, plan
from .scenario import Scenario, Submission, Workload

__all__ = ["SimOptions", "lag_p99", "sim_scenario", "simulate"]  # bench/sim.py takes lag_p99 from here

MONITORING_RUNS = 3
DEFAULT_RATE = 1.0  # runs per device per minute: a batch job's crunch lasts seconds, so faults find work in progress
WORKLOAD = (Submission("monitoring", "temperature_monitoring.yaml"), Submission("batch", "batch_job.yaml"))


@dataclass(frozen=True)
class SimOptions:
    broker: str
    fleet: str
    devices: int
    mix: dict[str, int]
    procs: int
    duration: float
    keepalive: int
    seed: int
    timeline: tuple[Scheduled, ...] = ()
    rate: float = DEFAULT_RATE
    journal: Path | None = None  # the hub's journal file, which the checker reads


def sim_scenario(duration: float, timeline: tuple[Scheduled, ...], rate: float = DEFAULT_RATE) -> Scenario:
    return Scenario("sim", tuple(Submission(f"monitoring-{i}", "temperature_monitoring.yaml")
                                 for i in range(MONITORING_RUNS)),
                    timeline, duration_s=duration, boot_deadline_s=120, end_deadline_s=60, settle_s=2.0,
                    workload=Workload(rate, WORKLOAD))


async def simulate(client: Client, options: SimOptions, report: Path | None, console: Console) -> int:
    """Exit code: 0 when the checker passes, 1 when it fails or the devices do not come up, 2 for another fleet or
    no journal to judge from."""
    if options.journal is None or not options.journal.is_file():
        console.print(f"[red]error: the checker reads the hub's journal file: {options.journal or 'none given'} "
                      f"is not one (give the hub's data directory with --data, or --journal FILE)[/red]")
        return 2
    api = HubApi(client)
    health = await api.get("/health")
    if health.get("fleet") != options.fleet:
        console.print(f"[red]error: the hub serves fleet {health.get('fleet')!r}, not {options.fleet!r}[/red]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleetflow-sim-"))
    devices = [{**d, "node_id": f"{options.fleet}-{d['node_id']}"[:64]} for d in plan(options.devices, options.mix)]
    orchestra = Orchestra(options.broker, options.fleet, health["public_key"], work, devices, procs=options.procs,
                          seed=options.seed, relay=needs_relay(options.timeline), keepalive=options.keepalive)
    try:
        async with Driver(api, orchestra, console, options.seed, options.journal) as driver:
            outcome = await driver.run(sim_scenario(options.duration, options.timeline, options.rate))
    except (WaitTimeout, TimeoutError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    console.print(outcome.verdict.render(), soft_wrap=True)  # one line per check: scripts read them
    if report is not None:
        report.write_text(json.dumps(report_of(options, outcome, work), indent=2))
    return 0 if outcome.verdict.passed else 1


def report_of(options: SimOptions, outcome: Outcome, work: Path) -> dict[str, object]:
    verdict = outcome.verdict
    return {"devices": options.devices, "mix": options.mix, "procs": options.procs, "duration_s": options.duration,
            "boot_s": round(outcome.boot_s, 2), "faults": list(outcome.faults), "killed": outcome.killed,
            "partitioned": outcome.partitioned, "injected_bad_messages": outcome.injected,
            "refused_bad_messages": outcome.refused, "figures": verdict.figures,
            "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in verdict.checks],
            "passed": verdict.passed, "work_dir": str(work),
            "rate_per_device_per_min": options.rate, "runs_submitted": outcome.runs, "runs_late": outcome.late,
            "faults_on_running_work": list(outcome.on_running_work),
            "waits": [asdict(w) for w in outcome.waits]}
