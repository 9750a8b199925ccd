"""Runs the attempts the hub assigns: admission, fences, timeouts, cancellation; every outcome goes to the outbox.

Admission refuses an assignment (as a `refused` step event with a reason the hub reads) when the agent is draining,
the fence is stale, the executor is unknown or disabled, the agent is at its concurrency limit, the outbox is too
full to promise room for the result, or the inputs are too large. A newer fence for the same (run, step) cancels
the older attempt: the hub has moved on and only the newest attempt may commit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocols import Assign, AttemptRef, Malformed, StepEvent, StepResult, body_from_map, body_to_map, cbor

from .executors import Executor, StepContext, StepFailed, kill_process_group
from .outbox import Outbox, RunningAttempt
from .runtime.timeouts import within

log = logging.getLogger("fleetflow.agent")

REFUSALS = ("draining", "stale-fence", "unknown-executor", "executor-disabled", "busy", "outbox-full",
            "inputs-too-large")


@dataclass
class _Running:
    ref: AttemptRef
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    reported: bool = False  # its outcome (result or cancelled event) is in the outbox


@dataclass
class Runner:
    outbox: Outbox
    executors: dict[str, Executor]
    disabled: set[str]
    slots: int
    clock_ms: Callable[[], int]
    notify: Callable[[], None] = lambda: None  # wakes the outbox flusher
    max_step_bytes: int = 64 * 1024
    speed: float = 1.0
    draining: bool = False
    running: dict[str, _Running] = field(default_factory=dict)
    _done: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)

    # -- reporting -------------------------------------------------------------------------------------------------

    def _event(self, ref: AttemptRef, event: str, reason: str | None = None, *, finish: bool = False) -> None:
        body = StepEvent(ref.run, ref.step, ref.attempt, ref.fence, event, 0, reason, None, self.clock_ms())
        self._store("step", body, finish_attempt=ref.attempt if finish else None)

    def _store(self, type_name: str, body: StepEvent | StepResult, finish_attempt: str | None) -> None:
        wire = body_to_map(body)
        wire.pop("eid")  # the outbox assigns it
        self.outbox.add_event(type_name, wire, self.clock_ms(), finish_attempt=finish_attempt)
        self.notify()

    def _result(self, ref: AttemptRef, ok: bool, output: dict[str, Any], error: str | None) -> None:
        body = StepResult(ref.run, ref.step, ref.attempt, ref.fence, ok, 0, output if ok else {}, error,
                          self.clock_ms())
        try:
            body_from_map("result", body_to_map(body))  # output must be plain data within the limits
            if ok and len(cbor.dumps(output)) > self.max_step_bytes:
                raise Malformed(f"output of {len(cbor.dumps(output))} bytes is over the {self.max_step_bytes}-byte limit")
        except Malformed as exc:
            body = StepResult(ref.run, ref.step, ref.attempt, ref.fence, False, 0, {}, f"bad output: {exc}",
                              self.clock_ms())
        self._store("result", body, finish_attempt=ref.attempt)
        self._remember_done(ref.attempt)

    def _remember_done(self, attempt: str) -> None:
        self._done[attempt] = None
        while len(self._done) > 10_000:
            self._done.popitem(last=False)

    # -- commands --------------------------------------------------------------------------------------------------

    def free_slots(self) -> int:
        return max(0, self.slots - len(self.running))

    def running_refs(self) -> tuple[AttemptRef, ...]:
        return tuple(r.ref for r in self.running.values())

    def assign(self, cmd: Assign) -> str | None:
        """Admit or refuse one assignment; returns the refusal reason, or None when it was accepted or a repeat."""
        ref = AttemptRef(cmd.run, cmd.step, cmd.attempt, cmd.fence)
        if cmd.attempt in self.running or cmd.attempt in self._done:
            return None  # a re-delivered assign: the first one is being (or was) reported
        reason = self._refusal(cmd)
        if reason is not None:
            self._event(ref, "refused", reason)
            return reason
        now = self.clock_ms()
        for other in list(self.running.values()):
            if (other.ref.run, other.ref.step) == (cmd.run, cmd.step):
                self.cancel_attempt(other.ref.attempt, f"superseded by fence {cmd.fence}")
        self.outbox.raise_fence(cmd.run, cmd.step, cmd.fence, now)
        self.outbox.start_attempt(RunningAttempt(cmd.attempt, cmd.run, cmd.step, cmd.fence, None), now)
        entry = self.running[cmd.attempt] = _Running(ref)
        # Steps start at once, so "started" (which implies accepted) is the first event: one message fewer per step.
        entry.task = asyncio.get_running_loop().create_task(self._execute(entry, cmd), name=f"attempt {cmd.attempt}")
        entry.task.add_done_callback(lambda task: self._finished(entry))
        return None

    def _finished(self, entry: _Running) -> None:
        # A task cancelled before its first step never runs its body, so the outcome is reported here.
        self.running.pop(entry.ref.attempt, None)
        if not entry.reported:
            log.info("step %s of run %s cancelled (attempt %s): %s", entry.ref.step, entry.ref.run, entry.ref.attempt,
                     entry.cancel_reason or "cancelled")
            entry.reported = True
            self._event(entry.ref, "cancelled", entry.cancel_reason or "cancelled", finish=True)
            self._remember_done(entry.ref.attempt)

    def _refusal(self, cmd: Assign) -> str | None:
        if self.draining:
            return "draining"
        if cmd.fence < self.outbox.fence(cmd.run, cmd.step):
            return "stale-fence"
        if cmd.uses not in self.executors:
            return "executor-disabled" if cmd.uses in self.disabled else "unknown-executor"
        # An older attempt of the same step is about to be cancelled: its slot counts as free.
        superseded = sum(1 for r in self.running.values()
                         if (r.ref.run, r.ref.step) == (cmd.run, cmd.step) and r.ref.fence < cmd.fence)
        if len(self.running) - superseded >= self.slots:
            return "busy"
        if not self.outbox.has_room_for_new_work():
            return "outbox-full"
        if len(cbor.dumps(cmd.with_)) > self.max_step_bytes:
            return "inputs-too-large"
        return None

    def cancel_attempt(self, attempt: str, reason: str) -> bool:
        entry = self.running.get(attempt)
        if entry is None or entry.task is None:
            return False
        entry.cancel_reason = reason
        entry.task.cancel()
        return True

    def cancel(self, refs: tuple[AttemptRef, ...], reason: str) -> int:
        """Cancel the named attempts; a fence that does not match the running one is ignored (it is not ours)."""
        count = 0
        for ref in refs:
            entry = self.running.get(ref.attempt)
            if entry is not None and entry.ref.fence <= ref.fence:
                count += self.cancel_attempt(ref.attempt, reason or "cancelled by the hub")
        return count

    # -- execution -------------------------------------------------------------------------------------------------

    async def _execute(self, entry: _Running, cmd: Assign) -> None:
        ref = entry.ref
        ctx = StepContext(ref.run, ref.step, ref.attempt, ref.fence, cmd.timeout,
                          on_process_group=lambda pgid: self.outbox.set_pgid(ref.attempt, pgid), speed=self.speed)
        self._event(ref, "started")
        log.info("step %s of run %s started (attempt %s, fence %d, executor %s)", ref.step, ref.run, ref.attempt,
                 ref.fence, cmd.uses)
        began = self.clock_ms()
        try:
            output = await within(cmd.timeout, self.executors[cmd.uses](dict(cmd.with_), ctx))
        except asyncio.TimeoutError:
            outcome: tuple[bool, dict[str, Any], str | None] = (False, {}, f"timed out after {cmd.timeout:g} s")
        except StepFailed as exc:
            outcome = (False, {}, str(exc) or "failed")
        except asyncio.CancelledError:
            return  # _finished reports it
        except Exception as exc:  # a bug in an executor fails the step, never the agent
            log.exception("executor %s crashed on attempt %s", cmd.uses, ref.attempt)
            outcome = (False, {}, f"executor error: {type(exc).__name__}: {exc}")
        else:
            outcome = (True, output if isinstance(output, dict) else {"value": output}, None)
        took = (self.clock_ms() - began) / 1000  # the agent's clock: virtual in a simulation
        if outcome[0]:
            log.info("step %s of run %s succeeded in %.1f s (attempt %s)", ref.step, ref.run, took, ref.attempt)
        else:
            log.warning("step %s of run %s failed in %.1f s (attempt %s): %s", ref.step, ref.run, took, ref.attempt,
                        (outcome[2] or "")[:200])
        entry.reported = True
        self._result(ref, *outcome)

    async def drain_and_stop(self, grace: float) -> None:
        """Shutdown: take no new work, let running steps finish within `grace` seconds, then cancel the rest."""
        self.draining = True
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for attempt in list(self.running):
                self.cancel_attempt(attempt, f"agent shutting down (grace period of {grace:g} s over)")
            if pending:
                await asyncio.wait(pending, timeout=10)

    def recover(self) -> list[RunningAttempt]:
        """After a crash: kill what is left of interrupted attempts and report them failed."""
        lost = self.outbox.running_attempts()
        for attempt in lost:
            if attempt.pgid:
                kill_process_group(attempt.pgid)
            ref = AttemptRef(attempt.run, attempt.step, attempt.attempt, attempt.fence)
            self._result(ref, False, {}, "interrupted: the agent stopped while this attempt ran")
        return lost
