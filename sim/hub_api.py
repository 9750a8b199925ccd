"""The hub as the simulator reads it: its HTTP API through `hub.client.Client` (the same client, token and errors as
every CLI command, exit 3 when the hub cannot be reached), the state of every run the driver submitted, and the figures
the driver takes from its Prometheus text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hub.client import Client
from hub.transitions import RUN_TERMINAL
from protocols import FleetflowError

SUBMITTING = 32  # submissions in flight at once: a fleet's rate is kept while each takes its time (sim/driver.py)
REFUSAL_REASONS = ("replayed", "unknown-key", "bad-signature", "wrong-topic", "wrong-sender")
READS_PER_ROUND = 20  # runs read one by one in a round of reads, at most (the ones the listing no longer shows)


class HubApi:
    """Async calls over the blocking client (httpx's, which threads may share), in worker threads: the hub may live
    in this very event loop (`fleetflow demo`), which must stay free to answer. Reads run one at a time, which keeps
    the simulator's share of the hub's attention small; submissions are the workload itself and run side by side (up
    to SUBMITTING, in threads of their own), so a hub that takes its time per request still gets the rate asked."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._one_at_a_time = asyncio.Lock()
        # Threads of their own: the default pool (cores + 4 threads) would cap submissions below SUBMITTING and, with
        # the hub in this loop (`fleetflow demo`), leave the hub's own request handlers no thread to answer them.
        self._submitting = concurrent.futures.ThreadPoolExecutor(SUBMITTING, thread_name_prefix="fleetflow-submit")

    async def get(self, path: str) -> Any:
        return await self._call("GET", path)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        call = functools.partial(self.client.call, "POST", path, json=body)
        return await asyncio.get_running_loop().run_in_executor(self._submitting, call)

    async def metrics(self) -> str:
        async with self._one_at_a_time:
            response = await asyncio.to_thread(self.client.http.get, "/metrics")
        return str(response.text)

    def get_blocking(self, path: str) -> Any:
        """For the checker, which reads the API from its own thread."""
        return self.client.call("GET", path)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._one_at_a_time:
            return await asyncio.to_thread(self.client.call, method, path, **kwargs)


class RunStates:
    """The state of every run the driver submitted, as the hub's API says. `GET /runs` lists the newest runs only (200
    by default) and a session may submit many more (its workload: runs per device per minute), so a submitted run the
    listing no longer shows is read by itself (`GET /runs/{id}`), at most READS_PER_ROUND in a round, taking turns,
    until it is terminal. A terminal state never changes: such a run is not read again."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}  # run id -> state, as last read
        self._turn = 0                    # where the next round's reads one by one begin, among the runs left

    async def refresh(self, api: HubApi, submitted: Sequence[str]) -> list[dict[str, Any]]:
        """One round of reads; the listing, newest first."""
        listed: list[dict[str, Any]] = await api.get("/runs")
        self.states.update((run["id"], run["state"]) for run in listed)
        shown = {run["id"] for run in listed}
        left = [run for run in submitted if run not in shown and self.states.get(run) not in RUN_TERMINAL]
        if left:
            start = self._turn % len(left)
            batch = (left[start:] + left[:start])[:READS_PER_ROUND]
            self._turn = start + len(batch)
            for run_id in batch:
                self.states[run_id] = (await api.get(f"/runs/{run_id}"))["state"]
        return listed

    def of(self, submitted: Sequence[str]) -> list[str]:
        """The states of these runs, for the ones read so far."""
        return [self.states[run] for run in submitted if run in self.states]

    def all_terminal(self, submitted: Sequence[str]) -> bool:
        return all(self.states.get(run) in RUN_TERMINAL for run in submitted)


class WaitTimeout(FleetflowError, TimeoutError):
    """A bounded wait of the driver ran out; the message says what it waited for. A TimeoutError too, as callers
    catch it."""


async def wait_until(probe: Callable[[], Awaitable[Any]], timeout: float, what: str, every: float = 0.5,
                     give_up: bool = False) -> Any:
    """The probe's first truthy value, probing every `every` seconds (a probe may also wait itself). After `timeout`
    seconds, even in the middle of a probe: WaitTimeout naming `what`, or the last value when `give_up` is set."""
    value = None
    try:
        async with asyncio.timeout(timeout):
            while not (value := await probe()):
                await asyncio.sleep(every)
            return value
    except TimeoutError:
        if give_up:
            return value
        raise WaitTimeout(f"waited {timeout:g} s for {what}") from None


def _samples(metrics_text: str, prefix: str) -> list[tuple[str, float]]:
    return [(line, float(line.rsplit(" ", 1)[1])) for line in metrics_text.splitlines() if line.startswith(prefix)]


def messages_total(metrics_text: str) -> float:
    """Every message the hub received, of every type."""
    return sum(value for _, value in _samples(metrics_text, "fleetflow_messages_total{"))


def refused_total(metrics_text: str) -> float:
    """Messages the hub refused as forged or replayed (the reasons a rogue device causes)."""
    return sum(value for line, value in _samples(metrics_text, "fleetflow_rejected_total{")
               if any(f'reason="{r}"' in line for r in REFUSAL_REASONS))


def _lag_buckets(metrics_text: str) -> list[tuple[float, float]]:
    buckets = []
    for line, value in _samples(metrics_text, "fleetflow_ingest_lag_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), value))
    return buckets


def lag_p99(metrics_text: str, since: str | None = None) -> float:
    """The hub's ingest lag p99 (seconds, the upper bound of its histogram bucket), over the messages received
    after the `since` scrape when one is given (the histogram itself counts from the hub's start)."""
    buckets = _lag_buckets(metrics_text)
    if since is not None:
        base = dict(_lag_buckets(since))
        buckets = [(le, count - base.get(le, 0.0)) for le, count in buckets]
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= 0.99 * total:
            return le
    return float("nan")
