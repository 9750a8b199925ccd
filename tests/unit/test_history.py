"""The history checker (sim/history.py) on histories built as data: real signed messages on a wire record, a journal,
outbox contents and a fault log. Each bad history must FAIL, naming the run, the step, the attempt or fence and the
wire indexes of the messages involved; a good one passes every check."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from agent.outbox import Entry
from agent.runtime.memory import WireRecord
from hub.events import (
    ActionTaken,
    AttemptAssigned,
    AttemptLost,
    Event,
    NodeBorn,
    NodeDied,
    ResultReported,
    RunSubmitted,
    StepReported,
)
from hub.state import Command, Core
from hub.transitions import AttemptState
from hub.workflow import workflow_from_data
from protocols import Ack, Assign, Birth, Body, Heartbeat, Signer, StepEvent, StepResult
from sim.acceptance import detections
from sim.evidence import Evidence, FaultLog, Injected
from sim.faults import FaultContext, RunningStep
from sim.history import judge
from sim.recorder import Gap
from sim.scenario import StepMigratedOff
from sim.verdict import Verdict

EPOCH = 1_700_000_000_000
FLEET = "f"
SPEC = workflow_from_data({"name": "t", "steps": [{"id": "a", "uses": "echo", "retry": {"max_attempts": 1}}]}
                          ).model_dump(by_alias=True, mode="json")


def ms(at: float) -> int:
    return EPOCH + round(at * 1000)


@dataclass
class History:
    """A run's evidence built by hand: `send` signs a message and puts it on the wire, `log` journals an event."""

    keys: dict[str, SigningKey] = field(default_factory=lambda: {n: SigningKey(bytes([i]) * 32) for i, n in
                                                                 enumerate(("hub", "n1", "n2"), start=1)})
    wire: list[WireRecord] = field(default_factory=list)
    journal: list[Event] = field(default_factory=list)
    outboxes: dict[str, list[Entry]] = field(default_factory=lambda: {"n1": [], "n2": []})
    expected: dict[str, frozenset[str]] = field(default_factory=dict)
    faults: FaultLog = field(default_factory=FaultLog)
    signers: dict[str, Signer] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)  # the hub's messages -> journal events committed then

    def signer(self, name: str) -> Signer:
        if name not in self.signers:
            self.signers[name] = Signer(self.keys[name], FLEET, name, boot=1)
        return self.signers[name]

    def send(self, sender: str, body: Body, at: float, dst: str | None = None) -> int:
        out = self.signer(sender).seal(body, ms(at), dst=dst, ttl_ms=60_000 if dst else None)
        return self.put(sender, out.topic, out.payload, at)

    def put(self, sender: str, topic: str, payload: bytes, at: float) -> int:
        """A message on the wire; the hub's, with the journal as committed when it was sent (as the simulation's
        broker notes it)."""
        self.wire.append(WireRecord(at, sender, topic, payload, 1, False, False, True, len(self.wire)))
        if sender == "hub":
            self.committed[len(self.wire) - 1] = len(self.journal)
        return len(self.wire) - 1

    def log(self, event: Event) -> None:
        self.journal.append(event)

    def boot(self, *nodes: str) -> None:
        for node in nodes:
            self.send(node, Birth("p", "1.0", caps=("echo",), slots=4), 0.5)
            self.log(NodeBorn(ms(0.5), node, 1, "p", {}, ("echo",), 4, {}, (), 5.0))

    def submit(self, run: str, at: float, expect: str = "succeeded") -> None:
        self.log(RunSubmitted(ms(at), run, SPEC, {}, None, ms(at) + 10**7))
        self.expected[run] = frozenset({expect})

    def assign(self, run: str, attempt: str, fence: int, node: str, at: float) -> int:
        self.log(AttemptAssigned(ms(at), run, "a", attempt, fence, node))
        return self.send("hub", Assign(run, "a", attempt, fence, "echo"), at + 0.001, dst=node)

    def result(self, node: str, run: str, attempt: str, fence: int, eid: int, at: float, ok: bool = True,
               journaled: bool = True, acked: bool = True) -> tuple[int, int | None]:
        """The node's result on the wire; journaled and acknowledged as a correct hub does, unless told not to."""
        sent = self.send(node, StepResult(run, "a", attempt, fence, ok, eid, {"v": 1} if ok else {},
                                          None if ok else "boom"), at)
        if journaled:
            self.log(ResultReported(ms(at) + 1, node, attempt, fence, ok, {"v": 1} if ok else {},
                                    None if ok else "boom"))
        ack = self.send("hub", Ack((eid,)), at + 0.01, dst=node) if acked else None
        return sent, ack

    def evidence(self, **changes: Any) -> Evidence:
        submitted = [e.run for e in self.journal if isinstance(e, RunSubmitted)]
        evidence = Evidence(EPOCH, {n: bytes(k.verify_key) for n, k in self.keys.items()}, self.wire, [],
                            self.journal, self.outboxes, submitted, None, end=60.0, expected=self.expected,
                            faults=self.faults, marks={}, committed=self.committed)
        return dataclasses.replace(evidence, **changes)


def one_good_run() -> History:
    history = History()
    history.boot("n1", "n2")
    history.submit("r1", 1.0)
    history.assign("r1", "a1", 1, "n1", 2.0)
    history.result("n1", "r1", "a1", 1, eid=1, at=3.0)
    return history


def failed(verdict: Verdict) -> dict[str, str]:
    return {invariant: detail for invariant, (_, ok, detail) in zip(verdict.ids, verdict.checks) if not ok}


def test_a_good_history_passes_every_check() -> None:
    history = one_good_run()
    verdict = judge(history.evidence(marks={"n1": (1, history.signer("n1").seq, False)}))
    assert verdict.passed, verdict.render()
    assert {"every run terminal", "every run ended as expected", "no step accepted twice", "no result lost",
            "every acknowledged result journaled", "every accepted message verifies"} <= {c[0] for c in verdict.checks}


def test_a_result_acknowledged_but_never_journaled_is_found_though_a_retry_hides_it() -> None:
    """The hub acks n1's result without journaling it; the step times out and succeeds on n2, so the run ends well
    and the hub's API would show nothing wrong."""
    history = History()
    history.boot("n1", "n2")
    history.submit("r1", 1.0)
    history.assign("r1", "a1", 1, "n1", 2.0)
    lost, ack = history.result("n1", "r1", "a1", 1, eid=7, at=3.0, journaled=False)
    history.log(AttemptLost(ms(20), "a1", "timed out", counts=False))
    history.assign("r1", "a2", 2, "n2", 20.5)
    history.result("n2", "r1", "a2", 2, eid=1, at=21.0)
    found = failed(judge(history.evidence()))
    assert set(found) >= {"acked-journaled", "results-journaled"}, found
    detail = found["acked-journaled"]
    assert f"n1's result of run r1 step a attempt a1 fence 1 (ok=True, eid 7, #{lost})" in detail
    assert f"acknowledged by #{ack}" in detail and "journaled never" in detail
    assert "runs-terminal" not in found and "runs-expected" not in found  # the run itself ended well


def test_an_ack_sent_before_its_result_was_committed_to_the_journal_fails() -> None:
    """The result's event is stamped before the ack, but committed after it: a crash in between loses a result the
    device has already dropped. The order is the journal's commits at the ack, not the stamp."""
    history = one_good_run()
    history.submit("r2", 10.0)
    history.assign("r2", "a2", 1, "n2", 11.0)
    _, ack = history.result("n2", "r2", "a2", 1, eid=2, at=12.0, journaled=False)
    history.log(ResultReported(ms(12) + 1, "n2", "a2", 1, True, {"v": 1}, None))
    found = failed(judge(history.evidence()))
    assert set(found) == {"acked-journaled"}, found
    position = len(history.journal)
    assert (f"acknowledged by #{ack} at {ms(12.01)}, journaled later, as event {position} (the journal held "
            f"{position - 1} events at the ack)") in found["acked-journaled"]


def test_a_history_where_every_run_failed_fails() -> None:
    history = History()
    history.boot("n1", "n2")
    for k, node in enumerate(("n1", "n2"), start=1):
        history.submit(f"r{k}", 1.0)
        history.assign(f"r{k}", f"a{k}", k, node, 2.0)
        history.result(node, f"r{k}", f"a{k}", k, eid=1, at=3.0, ok=False)
    found = failed(judge(history.evidence()))
    assert set(found) == {"runs-expected"}, found
    assert "2 run(s) ended otherwise" in found["runs-expected"]
    for k, node in enumerate(("n1", "n2"), start=1):
        assert (f"r{k} failed, expected succeeded: step a failed after 1 attempt(s): boom; attempts a{k} fence {k} on "
                f"{node} failed (boom)") in found["runs-expected"]


def test_a_run_whose_attempt_was_lost_is_excused_only_where_a_fault_struck() -> None:
    """The run's one attempt is lost on n1 and the run fails. That is the faults' doing only if a fault hit n1 (or
    could hit every device); a lost attempt on a device no fault touched is a hub defect the checker must name."""
    history = History()
    history.boot("n1", "n2")
    history.submit("r1", 1.0)
    history.assign("r1", "a1", 1, "n1", 2.0)
    history.log(AttemptLost(ms(5), "a1", "node n1 failed: heartbeats stopped", counts=True))
    found = failed(judge(history.evidence()))
    assert set(found) == {"runs-expected"}, found
    assert "r1 failed, expected succeeded" in found["runs-expected"]
    for faults in (FaultLog(killed={"n1": ms(4)}), FaultLog(partitioned={"n1": ms(4)}), FaultLog(anywhere=True)):
        verdict = judge(history.evidence(faults=faults))
        assert "runs-expected" not in failed(verdict), failed(verdict)
        assert "1 failed only because the faults took every attempt" in verdict.render()
    assert "runs-expected" in failed(judge(history.evidence(faults=FaultLog(killed={"n2": ms(4)}))))


class SecondSuccessCore(Core):
    """Planted bug: a late successful result from an attempt the hub moved away from is taken as a success too."""

    def apply(self, event: Event) -> list[Command]:
        attempt = self.attempts.get(event.attempt) if isinstance(event, ResultReported) else None
        if isinstance(event, ResultReported) and event.ok and attempt is not None and attempt.state == "lost":
            attempt.state = AttemptState.SUCCEEDED
            return []
        return super().apply(event)


def test_a_step_that_ran_to_success_on_two_devices_fails() -> None:
    """n1 is cut off mid-step, the step moves to n2 and succeeds; n1's late success is taken as well."""
    history = History()
    history.boot("n1", "n2")
    history.submit("r1", 1.0)
    history.assign("r1", "a1", 1, "n1", 2.0)
    history.log(AttemptLost(ms(10), "a1", "node n1 failed", counts=False))
    history.assign("r1", "a2", 2, "n2", 10.5)
    second, _ = history.result("n2", "r1", "a2", 2, eid=1, at=12.0)
    late, _ = history.result("n1", "r1", "a1", 1, eid=1, at=15.0)
    assert judge(history.evidence()).passed  # the real core refuses the late result: nothing wrong
    found = failed(judge(history.evidence(core_class=SecondSuccessCore)))
    assert set(found) == {"accepted-once"}, found
    detail = found["accepted-once"]
    assert "run r1 step a: accepted a1 fence 1 from n1" in detail and "newest attempt is a2 fence 2 on n2" in detail
    assert (f"run r1 step a: successful results of a2 fence 2 on n2 (#{second}) and a1 fence 1 on n1 (#{late}) both "
            f"accepted" in detail)


def test_a_crashed_agent_s_outbox_is_read_too() -> None:
    """n1 loses power after its result left its outbox (it saw the ack) but the hub never journaled it. An outbox
    check that skips crashed agents passes this; reading n1's outbox file finds it."""
    history = History()
    history.boot("n1", "n2")
    history.submit("r1", 1.0)
    history.assign("r1", "a1", 1, "n1", 2.0)
    sent, _ = history.result("n1", "r1", "a1", 1, eid=3, at=3.0, journaled=False, acked=False)
    will = history.signer("n1").death_certificate(ms(1), "lost")
    history.put("n1", will.topic, will.payload, 4.0)
    history.log(NodeDied(ms(4), "n1", 1, "lost"))
    history.log(AttemptLost(ms(4), "a1", "node n1 failed", counts=False))
    history.assign("r1", "a2", 2, "n2", 4.5)
    history.result("n2", "r1", "a2", 2, eid=1, at=5.0)
    history.faults = FaultLog(killed={"n1": ms(3.5)}, down_at_end={"n1"})
    found = failed(judge(history.evidence()))
    assert set(found) == {"acked-journaled", "results-journaled"}, found
    assert f"n1's result of run r1 step a attempt a1 fence 1 (ok=True, eid 3, #{sent}) gone from its outbox" \
        in found["acked-journaled"]
    # The same history with the entry still in n1's outbox: the result died with the device, nothing was lost.
    history.outboxes["n1"] = [Entry(3, "evt", "result", {"run": "r1", "step": "a", "attempt": "a1"}, ms(3.0))]
    assert judge(history.evidence()).passed


def rogue(history: History, at: float) -> tuple[int, int]:
    """A forged heartbeat under n1 with boot 10**6, and a byte-for-byte replay of n1's last result."""
    forger = Signer(SigningKey(bytes([9]) * 32), FLEET, "n1", boot=10**6)
    forged = forger.seal(Heartbeat(), ms(at))
    original = next(r for r in reversed(history.wire) if r.topic.endswith("/n1/evt"))
    history.faults.injected += [Injected("forged", forged.topic, forged.payload),
                                Injected("replayed", original.topic, original.payload)]
    return history.put("rogue", forged.topic, forged.payload, at), history.put("rogue", original.topic,
                                                                              original.payload, at + 0.1)


def test_refusals_are_judged_message_by_message_not_by_a_hub_wide_count() -> None:
    history = one_good_run()
    forged, replayed = rogue(history, 5.0)
    top = history.signer("n1").seq
    refused = judge(history.evidence(marks={"n1": (1, top, False)}))
    assert refused.passed, refused.render()
    assert "2/2 injected messages refused" in {n: d for n, _, d in refused.checks}[
        "every forged or replayed message refused"]
    # The hub took both: the forged boot is its replay mark for n1, and the replayed result is journaled twice. However
    # many other messages it refused, these two were not.
    history.log(ResultReported(ms(5.1) + 1, "n1", "a1", 1, True, {"v": 1}))
    found = failed(judge(history.evidence(marks={"n1": (10**6, 1, False)})))
    assert set(found) == {"refusals", "wire-verifies"}, found
    assert "2 injected message(s) not refused" in found["refusals"]
    assert f"forged hb under n1 (boot 1000000 seq 1) accepted: #{forged}: the hub's replay mark for n1 is boot " \
           f"1000000" in found["refusals"]
    assert f"replayed result under n1 (boot 1 seq 2) accepted: #{replayed}: the journal holds 2 result " \
           f"fact(s) ('n1', 'a1', 1, True)" in found["refusals"]


def test_an_unsigned_fact_and_a_message_no_fault_forged_fail_but_recording_gaps_excuse_what_they_hide() -> None:
    history = one_good_run()
    history.log(StepReported(ms(30), "n2", "a9", 9, "started"))  # no such message from n2
    bad = history.put("n2", f"fleetflow/v1/{FLEET}/node/n2/evt", b"\xd2garbage", 31.0)
    found = failed(judge(history.evidence()))
    assert set(found) == {"wire-verifies"}, found
    assert f"#{bad} on fleetflow/v1/f/node/n2/evt does not verify" in found["wire-verifies"]
    assert "step fact(s) ('n2', 'a9', 9, 'started')" in found["wire-verifies"]
    history.wire.pop()
    assert judge(history.evidence(gaps=[Gap(ms(28), ms(29))])).passed


def test_an_assignment_sent_before_it_was_journaled_and_a_fence_held_beyond_the_hub_s_fail() -> None:
    history = one_good_run()
    history.submit("r2", 39.0)
    early = history.send("hub", Assign("r2", "a", "a5", 5, "echo"), 40.0, dst="n2")
    held = len(history.journal)
    history.log(AttemptAssigned(ms(39.5), "r2", "a", "a5", 5, "n2"))  # stamped before the send, committed after it
    history.log(StepReported(ms(42), "n2", "a5", 5, "accepted"))
    history.send("n2", StepEvent("r2", "a", "a5", 5, "accepted", 1), 42.0)
    history.result("n2", "r2", "a5", 5, eid=2, at=43.0)
    found = failed(judge(history.evidence(fences={"n2": {("r2", "a"): 7}})))
    assert set(found) == {"assign-journaled", "fences"}, found
    assert (f"#{early}: a5 (run r2 step a fence 5) sent when the journal held {held} events, journaled later as "
            f"event {held + 1}") in found["assign-journaled"]
    assert "n2 holds fence 7 for run r2 step a; the hub assigned up to 5" in found["fences"]


def test_a_thermal_runaway_must_end_in_a_migration_read_from_the_journal() -> None:
    spec = workflow_from_data({"name": "thermal", "steps": [{"id": "infer", "uses": "echo", "migratable": True}]}
                              ).model_dump(by_alias=True, mode="json")
    journal: list[Event] = [NodeBorn(ms(1), node, 1, "rpi4", {}, ("echo",), 4, {}, (), 5.0) for node in ("d-1", "d-4")]
    journal += [RunSubmitted(ms(2), "r1", spec, {}, None, ms(2) + 10**7),
                AttemptAssigned(ms(3), "r1", "infer", "a1", 1, "d-1"), StepReported(ms(3.1), "d-1", "a1", 1, "started")]
    ctx = FaultContext(None, None, random.Random(1), runs={"thermal": "r1"})  # type: ignore[arg-type]
    hot = RunningStep("thermal", "infer")
    ctx.resolved[hot] = ("d-1",)
    expectation = StepMigratedOff("moved", hot)
    not_moved = "d-1 overheated but run r1 step infer was not migrated"
    assert expectation.evaluate(ctx, journal) == ("moved", False, not_moved)
    lost = [*journal, NodeDied(ms(4), "d-1", 1, "lost"), AttemptAssigned(ms(4.1), "r1", "infer", "a2", 2, "d-4"),
            ResultReported(ms(6), "d-4", "a2", 2, True, {})]  # ended elsewhere, but its device died: no migration
    assert expectation.evaluate(ctx, lost) == ("moved", False, not_moved)
    journal += [ActionTaken(ms(4), "d-1", "migrate", "temp over critical"),
                AttemptAssigned(ms(4.1), "r1", "infer", "a2", 2, "d-4")]
    assert expectation.evaluate(ctx, journal)[1] is False  # moved, not finished
    journal.append(ResultReported(ms(6), "d-4", "a2", 2, True, {}))
    moved = "d-1 overheated; run r1 step infer moved to d-4 (a2 fence 2 succeeded)"
    assert expectation.evaluate(ctx, journal) == ("moved", True, moved)


def test_detection_figures_give_the_worst_the_mean_and_the_99th_percentile() -> None:
    # 200 devices powered off at 10 s; the i-th declared dead i ms later: the 99th percentile (nearest rank) is the
    # 198th time, below the worst.
    history = one_good_run()
    killed = {f"d{i:03d}": ms(10.0) for i in range(1, 201)}
    for i in range(1, 201):
        history.log(NodeDied(ms(10.0) + i, f"d{i:03d}", 1))
    verdict = Verdict()
    detections(history.evidence(faults=FaultLog(killed=killed)), verdict)
    assert verdict.figures["detection_ms"] == {"max": 200, "mean": 100, "p99": 198}
    assert verdict.passed


def test_a_power_cut_that_did_not_take_fails_the_detection_check() -> None:
    history = one_good_run()
    history.log(NodeDied(ms(10.0) + 5, "d001", 1))
    for faults in (FaultLog(killed={"d001": ms(10.0)}, cut_failed=["d002"]), FaultLog(cut_failed=["d002"])):
        verdict = Verdict()
        detections(history.evidence(faults=faults), verdict)
        assert not verdict.passed
        assert [v.invariant for v in verdict.violations] == ["killed-detected"]
        assert "d002: its power cut did not take" in verdict.violations[0].detail
    verdict = Verdict()
    detections(history.evidence(faults=FaultLog(killed={"d001": ms(10.0)})), verdict)
    assert verdict.passed
