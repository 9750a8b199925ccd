"""The simulator's workload keeps its rate while the hub answers slowly, and ends with the duration."""

from __future__ import annotations

import asyncio
import time
import types
from pathlib import Path
from typing import Any

from rich.console import Console

from sim.driver import SUBMITTING, Driver
from sim.scenario import Scenario, Submission, Workload


class SlowHub:
    """Answers every submission after `delay` seconds; notes how many were in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.most, self.posted = delay, 0, 0, 0

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        self.posted += 1
        return {"id": f"r-{self.posted}"}


def driver(api: SlowHub, devices: int, tmp: Path) -> Driver:
    orchestra = types.SimpleNamespace(devices=[{"node_id": f"n{i}"} for i in range(devices)],
                                      broker="mqtt://broker.invalid:1", fleet="f")
    return Driver(api, orchestra, Console(quiet=True), 1, tmp / "journal.sqlite")  # type: ignore[arg-type]


def scenario(rate: float) -> Scenario:
    return Scenario("t", (), workload=Workload(rate, (Submission("batch", "batch_job.yaml"),)))


def one_second_of_workload(api: SlowHub, tmp: Path) -> tuple[Driver, float]:
    """6,000 runs a minute over 100 devices, for one second: one due every 10 ms. Returns the driver and the time
    the workload took to end."""
    sim = driver(api, 100, tmp)

    async def main() -> float:
        started = time.monotonic()
        await sim._workload(scenario(60.0), started + 1.0)
        return time.monotonic() - started

    return sim, asyncio.run(main())


def test_a_slow_hub_does_not_lower_the_rate(tmp_path: Path) -> None:
    # Each answered after 0.2 s: 20 in flight.
    api = SlowHub(0.2)
    sim, took = one_second_of_workload(api, tmp_path)
    assert api.posted >= 60, api.posted  # one at a time, 0.2 s each, would send 5
    assert 1 < api.most <= SUBMITTING
    assert len(sim.expected) == api.posted and api.posted + sim.late in (99, 100)
    assert took < 1.0 + 2 * api.delay + 5  # the answers in flight, and a generous bound for a busy machine


def test_a_hub_slower_than_the_rate_holds_it_back_and_the_workload_still_ends(tmp_path: Path) -> None:
    # Each answered after 2 s: at most SUBMITTING in flight, the rest counted late.
    api = SlowHub(2.0)
    sim, took = one_second_of_workload(api, tmp_path)
    assert api.posted == api.most == SUBMITTING
    assert SUBMITTING + sim.late in (99, 100)  # every run due within the second: sent, or counted late
    assert took < 1.0 + api.delay + 5
