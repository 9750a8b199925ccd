"""The history checker (sim/history.py) for system tests that run a real hub and real agents. It gets the evidence
`fleetflow sim` and `fleetflow demo` give it (sim/driver.py), read the same way and never through the hub's API:

- the wire, recorded by sim/recorder.py's `WireRecorder` on the test's broker, subscribed before any agent starts
  (on an event loop of its own, in a thread: system tests are synchronous);
- each agent's outbox and public key, read from its data directory once the agent has stopped;
- the hub's journal, exported from its file by `fleetflow journal export`, as an operator would.

Read in the driver's order: the recording is closed, then the outboxes are read (an entry gone from one was
acknowledged, so journaled, before the journal is read), then the journal. `wire.jsonl` and `journal.jsonl` stay
beside the hub's data directory, so a FAIL line's `#n` can be looked up (line n + 1 of `wire.jsonl`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Any, TypeVar

from hub.events import Event
from hub.state import Core
from hub.transitions import RUN_TERMINAL
from protocols import HUB_ID
from sim.driver import SETTLE_S
from sim.evidence import Evidence, FaultLog, load_export, outboxes_in
from sim.history import judge
from sim.recorder import Recording, WireRecorder
from sim.verdict import Verdict
from sim.wire_view import WireView
from tests.brokers import Broker
from tests.cli import ok
from tests.hubprocess import HubProcess

T = TypeVar("T")
STOP_S = 30.0  # the recorder's loop answers within this, or the test fails naming it

# What a test of a run through faults claims, as the checker's invariant ids (sim/verdict.py TITLES): every run
# terminal and ended as expected, no step accepted twice nor run to success on two devices, fences only grow, no
# result lost, every acknowledged result journaled, every accepted message verifies.
SAFETY = ("runs-terminal", "runs-expected", "accepted-once", "fences", "results-journaled", "acked-journaled",
          "wire-verifies")


class Recorder:
    """`with Recorder(broker, fleet) as recorder:` records from entering (once subscribed) until `stop()`."""

    def __init__(self, broker: Broker, fleet: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wire recorder", daemon=True)
        self._recorder = WireRecorder(broker.url, fleet)
        self._recording: Recording | None = None

    def __enter__(self) -> Recorder:
        self._thread.start()
        try:
            self._call(self._recorder.start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> Recording:
        """The recording, closed (once; later calls return it again)."""
        if self._recording is None:
            try:
                self._recording = self._call(self._recorder.stop())
            finally:
                self._close_loop()
        return self._recording

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(STOP_S)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_S)
        if self._thread.is_alive():
            raise AssertionError(f"the wire recorder's loop did not stop within {STOP_S:g} s")
        self._loop.close()


@dataclass(frozen=True)
class History:
    """What the checker judged, and its verdict."""

    evidence: Evidence
    verdict: Verdict

    def assert_passes(self, *invariants: str) -> None:
        """The verdict passes, each of `invariants` was judged (a check that did not run proves nothing), and every
        run ended exactly as expected: the checker excuses a run whose every attempt a fault took, these tests
        never do (their faults leave each step an attempt to run)."""
        missing = [name for name in invariants if name not in self.verdict.ids]
        assert self.verdict.passed and not missing, f"not judged: {missing}\n{self.verdict.render()}"
        ended = {run: str(self.core.runs[run].state) if run in self.core.runs else None
                 for run in self.evidence.expected}
        otherwise = {run: state for run, state in ended.items() if state not in self.evidence.expected[run]}
        assert not otherwise, f"ended otherwise than expected: {otherwise}\n{self.verdict.render()}"

    @cached_property
    def core(self) -> Core:
        """The journal folded by the hub's core: what the hub decided, as its file says."""
        return Core().fold(list(self.evidence.journal))

    @property
    def journal(self) -> list[Event]:
        return self.evidence.journal

    @cached_property
    def results_sent(self) -> dict[tuple[str, str, int, bool], list[int]]:
        """(node, attempt, fence, ok) of every verified result on the wire -> its wire indexes."""
        return WireView(self.evidence).results()


def wait_ended(hub: HubProcess, run_ids: Iterable[str], timeout: float) -> None:
    """Steer, as sim/driver.py does, through the API: wait until every run is terminal, for `timeout` seconds at
    most, then go on either way: the checker says which run did not end, and why."""
    pending = list(run_ids)
    try:
        hub.wait(lambda: all(hub.get(f"/runs/{run}")["state"] in RUN_TERMINAL for run in pending), timeout,
                 f"runs {', '.join(pending)} to end")
    except AssertionError as exc:
        warnings.warn(f"{exc}; judging the history as it stands", stacklevel=2)


def judge_hub(hub: HubProcess, recorder: Recorder, expected: Mapping[str, str],
              killed: Mapping[str, int] | None = None) -> History:
    """Stop the hub's agents, then judge the history of `recorder`'s recording, the agents' outboxes and the hub's
    journal. `expected`: run id -> the state it must end in; `killed`: node -> ms its process was killed (each must
    be declared gone after that)."""
    for agent in hub.agents:
        agent.stop()
    recording = recorder.stop()
    end = time.time() - recording.epoch_ms / 1000
    work = hub.data.parent
    recording.save(work / "wire.jsonl")
    outboxes = outboxes_in({agent.node_id: agent.data for agent in hub.agents})
    exported = work / "journal.jsonl"
    ok("journal", "export", "--data", hub.data, "--out", exported)
    events, marks = load_export(exported.read_text().splitlines())
    keys = {agent.node_id: agent.public_key() for agent in hub.agents}
    keys[HUB_ID] = bytes.fromhex(hub.public_key)
    evidence = Evidence(recording.epoch_ms, keys, recording.records, [], events,
                        {node: found.entries for node, found in outboxes.items()}, list(expected), None,
                        end=end, expected={run: frozenset({state}) for run, state in expected.items()},
                        faults=FaultLog(killed=dict(killed or {})), gaps=recording.gaps, marks=marks,
                        fences={node: found.fences for node, found in outboxes.items()}, settle_s=SETTLE_S)
    return History(evidence, judge(evidence))
