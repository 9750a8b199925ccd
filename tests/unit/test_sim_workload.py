"""The simulator's workload keeps its rate while the hub answers slowly, and ends with the duration."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from pathlib import Path
from typing import Any

from rich.console import Console

from sim.driver import SUBMITTING, Driver
from sim.hub_api import HubApi
from sim.scenario import Scenario, Submission, Workload


WINDOW_S = 2.0


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


def two_seconds_of_workload(api: SlowHub, tmp: Path) -> tuple[Driver, float]:
    """6,000 runs a minute over 100 devices, for two seconds: one due every 10 ms, 200 in all. Returns the driver and
    the time the workload took to end."""
    sim = driver(api, 100, tmp)

    async def main() -> float:
        started = time.monotonic()
        await sim._workload(scenario(60.0), started + WINDOW_S)
        return time.monotonic() - started

    return sim, asyncio.run(main())


def test_a_slow_hub_does_not_lower_the_rate(tmp_path: Path) -> None:
    # Each answered after 0.2 s: about 20 in flight.
    api = SlowHub(0.2)
    sim, took = two_seconds_of_workload(api, tmp_path)
    assert api.posted >= 80, api.posted  # one at a time, 0.2 s each, would send 10; a stall of the machine, fewer
    assert 1 < api.most <= SUBMITTING
    assert len(sim.expected) == api.posted and api.posted + sim.late in (199, 200)  # the window opens a moment late
    assert took < WINDOW_S + 2 * api.delay + 5  # the answers in flight, and a generous bound for a busy machine


def test_a_hub_slower_than_the_rate_holds_it_back_and_the_workload_still_ends(tmp_path: Path) -> None:
    # Each answered after 3 s, after the window: at most SUBMITTING in flight, the rest counted late.
    api = SlowHub(3.0)
    sim, took = two_seconds_of_workload(api, tmp_path)
    assert api.posted == api.most == SUBMITTING
    assert SUBMITTING + sim.late in (199, 200)  # every run due within the window: sent, or counted late
    assert took < WINDOW_S + api.delay + 5


class BlockingClient:
    """hub.client.Client's `call`, answering after `delay` seconds of a worker thread: notes how many at once."""

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.most = delay, 0, 0
        self.lock = threading.Lock()

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        return {"id": "r-1"}


def test_submissions_run_side_by_side_in_threads_of_their_own() -> None:
    # SUBMITTING posts at once, more than the default pool's threads, and the default pool stays free meanwhile: in
    # `fleetflow demo` the hub, in this same loop, needs it to answer them.
    client = BlockingClient(1.0)
    api = HubApi(client)  # type: ignore[arg-type]

    async def main() -> float:
        posts = [asyncio.create_task(api.post("/runs", {})) for _ in range(SUBMITTING)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 30)
        free_after = time.monotonic() - started
        await asyncio.gather(*posts)
        return free_after

    free_after = asyncio.run(main())
    assert client.most == SUBMITTING
    assert free_after < client.delay / 2  # not queued behind the posts
