"""The deployments half's decisions: everything due at `now`, as journaled events (hub/deployments/core.py applies
them). Pure: the state and `now` in, events out; the same state and time give the same events.

For each deployment decide looks at, in this order, one pass:
1. a scheduled deployment fires when its time comes (its round's target taken, split into waves) or has its next
   cron fire time journaled;
2. each execution at most once: a forced cancel ends the executions live when it came; a cancelled or aborted
   deployment ends its queued ones (and, aborted, stops the ones in progress: run cancelled, what it completed
   rolled back); a queued node that left the target ends removed; and each state's deadline and outcome: the run's
   result, retries, a run lost with its node, rejection, the verify window, the rollback's result;
3. under `--rollback on-abort`, the succeeded nodes of an aborted deployment roll back (only where the node still
   runs this deployment's version and no other deployment is updating it); nodes that newly match are queued (into
   the last wave);
4. only when nothing of that happened (the counts are settled): abort criteria, a wave's success threshold, the
   next wave or a pause, the end of the round;
5. only when nothing at all happened in the pass (so the abort criteria and the waves were judged on counts that
   include every change before; the shell asks again at once after a pass that decided something): starts, queued
   executions of the current wave, at the rate (at most one per pass when a rate is set, so consecutive starts are
   at least 60/N s apart in the journal), within `--max-concurrent`, inside maintenance windows, one deployment of
   a component on a node at a time.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..events import DeploymentChanged, Event, ExecutionChanged, RunCancelRequested, RunSubmitted
from ..transitions import AttemptState, Health, Liveness, RunState, StepState
from .machine import EXECUTION_LIVE, DeploymentState, ExecutionState
from .runspec import pinned_spec, rollback_spec, run_id
from .schedule import Window, iso, next_fire
from .versions import UNKNOWN, migration_problem

if TYPE_CHECKING:
    from ..fleet import Node
    from ..runs import Run
    from .core import Deployment, Deployments, Execution

_D, _E = DeploymentState, ExecutionState
HARD_REFUSALS = frozenset({"executor-disabled", "unknown-executor"})  # the node can never run the step
HEARD_WITHIN_HEARTBEATS = 2  # verify: heard from within this many heartbeat intervals (not suspected)
_ABORT_KINDS = {"FAILED": ("failed", "failed"), "REJECTED": ("rejected", "were rejected"),
                "TIMED_OUT": ("timed_out", "timed out")}
_STOPPED = (_D.CANCELED, _D.ABORTED)  # no new run of the update starts (rollbacks still do)
_KEEP = -1  # no fire time is negative: `move` keeps the journaled one


def decide(deps: Deployments, now: int, full: bool, liveness: bool, heard_since: int) -> tuple[list[Event], int]:
    """The decisions due, and when to ask again besides the timer scan (a rate's next start, a fire time)."""
    from .core import NEVER

    out: list[Event] = []
    wake = NEVER
    windows = _Windows(now)
    claimed: set[tuple[str, str]] = set()  # (node, component) started in this pass, by any deployment
    for dep in sorted((deps.deployments[d] for d in deps.active), key=lambda d: d.seq):
        step = _Pass(deps, dep, now, liveness, windows, claimed, heard_since)
        step.run(full)
        out += step.out
        wake = min(wake, step.wake)
    return out, wake


def _percent(part: int, whole: int) -> str:
    """As the threshold is written: 12.5%, 30%, 66.7%."""
    return f"{round(100 * part / whole, 1):g}%"


class _Windows:
    """Whether each maintenance window is open at `now`, worked out once per pass."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.open: dict[Window, bool] = {}

    def allow(self, windows: Iterable[Window], labels: dict[str, str]) -> bool:
        """A node starts only while every window that applies to it is open."""
        for window in windows:
            if window.applies(labels):
                if window not in self.open:
                    self.open[window] = window.open_at(self.now)
                if not self.open[window]:
                    return False
        return True


class _Pass:
    """One deployment's decisions in one pass; each execution changes at most once in it."""

    def __init__(self, deps: Deployments, dep: Deployment, now: int, liveness: bool, windows: _Windows,
                 claimed: set[tuple[str, str]], heard_since: int) -> None:
        from .core import NEVER

        self.deps, self.dep, self.now, self.liveness, self.windows = deps, dep, now, liveness, windows
        self.claimed, self.heard_since = claimed, heard_since
        self.spec = dep.spec
        self.out: list[Event] = []
        self.touched: set[str] = set()
        self.wake = NEVER

    def run(self, full: bool) -> None:
        if self.dep.state == _D.SCHEDULED:
            self.schedule()
            return
        self.executions(full)
        self.undo_and_join()
        if not self.out and self.dep.state in (_D.RUNNING, _D.PAUSED):
            self.rollout()
        if not self.out and self.dep.state in (_D.RUNNING, _D.SUCCEEDED):
            self.starts()

    # -- events ----------------------------------------------------------------------------------------------------

    def change(self, node: str, state: ExecutionState, reason: str, run: str | None = None,
               version: str | None = None, wave: int | None = None, failure: str | None = None,
               retry: bool = False) -> None:
        self.out.append(ExecutionChanged(self.now, self.dep.id, node, state, reason[:500], run, version, wave, failure,
                                         retry))
        self.touched.add(node)

    def move(self, state: DeploymentState, reason: str, wave: int | None = None, fired: int | None = None,
             next_fire: int | None = _KEEP) -> None:
        """The deployment's next state; its next fire time is kept unless one (or None: none) is given."""
        following = self.dep.next_fire if next_fire == _KEEP else next_fire
        self.out.append(DeploymentChanged(self.now, self.dep.id, state, reason[:500], wave, fired, following))

    def submit(self, node: str, spec: dict[str, object], deadline: int | None = None) -> str:
        """A run of this deployment on `node` (its first, a retry, or a rollback); its id never repeats. Its
        deadline is the in-progress timeout from now, unless one is given."""
        rid = run_id(self.dep.id, node, self.dep.run_counts.get(node, 0) + 1)
        self.out.append(RunSubmitted(self.now, rid, spec, dict(self.spec.inputs), None,  # type: ignore[arg-type]
                                     self.now + self.spec.in_progress_timeout_ms if deadline is None else deadline))
        return rid

    def cancel(self, ex: Execution, reason: str) -> None:
        """End it canceled at once (cancel --force); a run under way is cancelled, which tells its node to stop."""
        if ex.state in (_E.IN_PROGRESS, _E.ROLLING_BACK) and ex.run is not None:
            self.out.append(RunCancelRequested(self.now, ex.run, reason))
        done = self.outcome(ex.run)[2] & self.spec.compensated if ex.state == _E.IN_PROGRESS else set()
        partial = {_E.VERIFYING: f"it runs {self.spec.version} unproven (its verify was cut short)",
                   _E.ROLLING_BACK: "its rollback was stopped part-way"}.get(ex.state)
        self.canceled(ex, reason, done, partial)

    def canceled(self, ex: Execution, reason: str, done: set[str], partial: str | None = None) -> None:
        """Canceled. When the update may have changed the node (`done`: compensated steps it completed and nobody
        undid, or `partial` says how), the inventory claims no version for it: UNKNOWN, with the reason."""
        if done and partial is None:
            partial = f"its update was stopped part-way (done: {', '.join(sorted(done))})"
        if partial is None:
            self.change(ex.node, _E.CANCELED, reason)
        else:
            self.change(ex.node, _E.CANCELED, f"{reason}; {partial}: its {self.spec.component} version is unknown",
                        version=UNKNOWN)

    # -- 1. the schedule -------------------------------------------------------------------------------------------

    def schedule(self) -> None:
        dep, spec, now = self.dep, self.spec, self.now
        if dep.next_fire is None:  # a cron deployment: its first fire time (and, later, after each round)
            following = next_fire(spec.cron, now) if spec.cron else None
            if following is None:
                self.move(_D.CANCELED, f"its cron expression {spec.cron!r} fires no more", next_fire=None)
            else:
                self.move(_D.SCHEDULED, f"next fire at {iso(following)}", next_fire=following)
            return
        if now < dep.next_fire:
            self.wake = dep.next_fire
            return
        targets = sorted(n for n, node in self.deps.nodes.items() if self.deps.matches(dep, node)
                         and node.versions.get(spec.component) != spec.version
                         and not (n in dep.executions and dep.executions[n].state in EXECUTION_LIVE))
        plan = spec.waves.plan(len(targets))
        following = next_fire(spec.cron, max(now, dep.next_fire)) if spec.cron else None
        late = f" (due at {iso(dep.next_fire)})" if now - dep.next_fire > 60_000 else ""
        self.move(_D.RUNNING, f"round {dep.round + 1} fired{late}: {len(targets)} node(s) to update" if spec.cron
                  else f"started{late}: {len(targets)} node(s) to update", wave=1, fired=dep.next_fire,
                  next_fire=following)
        for index, node in enumerate(targets):
            wave = next(w for w, size in enumerate(plan, 1) if index < size)
            self.change(node, _E.QUEUED, "in the target", wave=wave)

    # -- 2. each execution -------------------------------------------------------------------------------------------

    def executions(self, full: bool) -> None:
        dep = self.dep
        for node in sorted(dep.live):
            ex = dep.executions[node]
            if node in dep.stopping:
                self.cancel(ex, "canceled (cancel --force)" + (f": {dep.reason}" if dep.state == _D.CANCELED else ""))
            elif ex.state == _E.QUEUED:
                if dep.state in _STOPPED:
                    self.change(node, _E.CANCELED, f"deployment {dep.state}: {dep.reason}")
                elif node in dep.leaving or self.deps.nodes.get(node) is None:
                    self.change(node, _E.REMOVED, "the node left the target")
                elif ex.deadline is not None and self.now >= ex.deadline:
                    self.change(node, _E.TIMED_OUT, f"still queued after --timeout {self.spec.timeout_ms / 1000:g} s",
                                failure="timed_out")
            elif dep.state == _D.ABORTED and ex.state == _E.IN_PROGRESS:
                self.stop(ex, f"deployment aborted: {dep.reason}")
            elif full:
                self.progress(ex)

    def stop(self, ex: Execution, reason: str) -> None:
        """Stopped by an abort: its run is cancelled (the node told to stop), and what the run completed is rolled
        back as a failure's would be; what no rollback may undo leaves the node's version unknown."""
        if ex.run is not None:
            self.out.append(RunCancelRequested(self.now, ex.run, reason))
        done = self.outcome(ex.run)[2] & self.spec.compensated
        if self.spec.rollback != "never" and done:
            rid = self.submit(ex.node, rollback_spec(self.spec.workflow, ex.node, done))
            self.change(ex.node, _E.ROLLING_BACK, f"{reason}: its run {ex.run} was cancelled; rolling back "
                                                  f"{', '.join(sorted(done))} (run {rid})", run=rid)
        else:
            self.canceled(ex, f"{reason}: its run {ex.run} was cancelled", done)

    def progress(self, ex: Execution) -> None:
        if ex.state == _E.VERIFYING:
            if self.liveness and self.now >= (ex.deadline or 0):
                self.verify(ex)
            return
        state, error, completed, run = self.outcome(ex.run)
        timed_out = self.liveness and self.now >= (ex.deadline or 0)
        ongoing = state in (RunState.RUNNING, RunState.COMPENSATING)
        if ex.state == _E.ROLLING_BACK:
            if ongoing and timed_out:
                self.out.append(RunCancelRequested(self.now, str(ex.run), "rollback timed out"))
                self.change(ex.node, _E.ROLLBACK_FAILED, f"rollback run {ex.run} still running after "
                                                          f"{self.spec.in_progress_timeout_ms / 1000:g} s: cancelled")
            elif state == RunState.SUCCEEDED:
                back = ex.version_before
                self.change(ex.node, _E.ROLLED_BACK, f"rolled back to {back or 'no version'} (run {ex.run})",
                            version=back)
            elif not ongoing:
                self.change(ex.node, _E.ROLLBACK_FAILED, f"rollback run {ex.run} {state or 'lost'}: {error}")
            return
        refused = self.refusal(run) if ongoing and run is not None else None
        if refused is not None:
            self.out.append(RunCancelRequested(self.now, str(ex.run), refused))
            self.change(ex.node, _E.REJECTED, refused, failure="rejected")
        elif ongoing and timed_out:
            self.out.append(RunCancelRequested(self.now, str(ex.run), "execution timed out (--in-progress-timeout)"))
            self.fail(ex, f"in progress for {self.spec.in_progress_timeout_ms / 1000:g} s (--in-progress-timeout): "
                          "its run was cancelled", "timed_out", completed)
        elif state == RunState.SUCCEEDED:
            self.change(ex.node, _E.VERIFYING, f"run {ex.run} succeeded: verifying for "
                                               f"{self.spec.verify_ms / 1000:g} s")
        elif state == RunState.CANCELLED:
            self.canceled(ex, f"its run {ex.run} was cancelled: {error}", completed & self.spec.compensated)
        elif state == RunState.TIMED_OUT:
            self.fail(ex, f"run {ex.run} timed out", "timed_out", completed)
        elif not ongoing:  # failed, or a run the hub no longer knows
            self.failed_run(ex, error, completed, run, timed_out)

    def failed_run(self, ex: Execution, error: str, completed: set[str], run: Run | None, timed_out: bool) -> None:
        """Its run failed: rejected (it can never run there), started again when it was lost with its node (no
        retry used: the node was unreachable, the update did not fail), retried, or failed."""
        lost = self.lost_with_node(run, ex.node)
        stopped = self.dep.state in _STOPPED
        if "can never run" in error:
            self.change(ex.node, _E.REJECTED, f"run {ex.run}: {error}", failure="rejected")
        elif lost is not None and not stopped and timed_out:
            self.fail(ex, f"run {ex.run} was lost with its node ({lost}) and the node was not back within "
                          f"--in-progress-timeout {self.spec.in_progress_timeout_ms / 1000:g} s", "timed_out",
                      completed)
        elif lost is not None and not stopped:
            rid = self.submit(ex.node, pinned_spec(self.spec.workflow, ex.node), ex.deadline)
            self.change(ex.node, _E.IN_PROGRESS, f"run {ex.run} was lost with its node ({lost}): run {rid} waits for "
                                                 "it, no retry used", run=rid)
        elif ex.retries < self.spec.retries and not stopped:
            rid = self.submit(ex.node, pinned_spec(self.spec.workflow, ex.node))
            self.change(ex.node, _E.IN_PROGRESS, f"retry {ex.retries + 1} of {self.spec.retries} (run {rid}): "
                                                 f"run {ex.run} failed: {error}", run=rid, retry=True)
        else:
            self.fail(ex, f"run {ex.run} failed: {error}", "failed", completed)

    def lost_with_node(self, run: Run | None, node_id: str) -> str | None:
        """Why the run failed when that was its node going down (a step's last attempt lost with the node, as
        hub/state.py's `_take_down` words it), else None. A node since removed is not waited for."""
        node = self.deps.nodes.get(node_id)
        if run is None or node is None or node.removed:
            return None
        for step in run.steps.values():
            if step.state == StepState.FAILED and step.attempts:
                attempt = self.deps.work.attempts.get(step.attempts[-1])
                if (attempt is not None and attempt.state == AttemptState.LOST
                        and (attempt.reason or "").startswith(f"node {node_id} ")):
                    return attempt.reason
        return None

    def outcome(self, rid: str | None) -> tuple[RunState | None, str, set[str], Run | None]:
        """The run's state, error, completed steps, and the run itself while the hub keeps it whole."""
        work = self.deps.work
        run = work.runs.get(rid or "")
        if run is not None:
            completed = {sid for sid, step in run.steps.items() if step.state == StepState.SUCCEEDED}
            return run.state, run.error or "", completed, run
        archived = work.archived.get(rid or "")
        if archived is not None:  # only its summary is left: every step with a compensation may need undoing
            return RunState(archived[2]), archived[5] or "", set(self.spec.compensated), None
        return None, "the hub does not know its run", set(), None

    def refusal(self, run: Run) -> str | None:
        """A step its node refused for good (the executor is disabled or unknown there): the node rejects it."""
        for step in run.steps.values():
            if step.state == StepState.QUEUED and step.attempts:
                attempt = self.deps.work.attempts.get(step.attempts[-1])
                if attempt is not None and attempt.state == AttemptState.REFUSED and attempt.reason in HARD_REFUSALS:
                    return f"the node refused step {step.spec.id}: {attempt.reason}"
        return None

    def fail(self, ex: Execution, reason: str, failure: str, completed: set[str]) -> None:
        """Failed (or timed out): rolled back when the policy allows and a completed step can be undone."""
        undo = completed & self.spec.compensated
        if self.spec.rollback != "never" and undo:
            rid = self.submit(ex.node, rollback_spec(self.spec.workflow, ex.node, undo))
            self.change(ex.node, _E.ROLLING_BACK, f"{reason}; rolling back (run {rid})", run=rid, failure=failure)
            return
        state = _E.TIMED_OUT if failure == "timed_out" and ex.state == _E.IN_PROGRESS else _E.FAILED
        note = "" if self.spec.rollback == "never" else "; nothing to roll back (no step with a compensation completed)"
        self.change(ex.node, state, reason + note, failure=failure)

    def verify(self, ex: Execution) -> None:
        """The window ended: decided once the node has been heard from since the window began and since the hub
        could hear nodes again (a restart gives every node a fresh heartbeat window, which proves nothing); until
        then it waits, and a node that stays silent is suspected, which fails it."""
        node = self.deps.nodes.get(ex.node)
        if (node is not None and not node.removed and node.state == Liveness.ONLINE
                and not (node.last_seen >= (ex.verify_from or 0) and node.last_seen > self.heard_since)):
            return
        problem = self.verify_problem(ex, node)
        if problem is None:
            rebooted = node is not None and ex.verify_boot is not None and node.boot != ex.verify_boot
            self.change(ex.node, _E.SUCCEEDED, "verified: healthy through the verify window" + (
                f" (rebooted: boot {ex.verify_boot} -> {node.boot}, back within it)" if rebooted and node else ""),
                version=self.spec.version)
        else:  # undo what its run did: the steps that completed (a `when:` may have skipped some)
            self.fail(ex, f"verify failed: {problem}", "failed", self.outcome(ex.run)[2])

    def verify_problem(self, ex: Execution, node: Node | None) -> str | None:
        """Why the node did not prove healthy for the window (None: it did): online at its end and throughout it
        (an outage is allowed only as a reboot whose new boot came back within it), never unhealthy in it, heard
        from recently."""
        if node is None or node.removed:
            return "the node was removed"
        rebooted = ex.verify_boot is not None and node.boot != ex.verify_boot
        if node.state != Liveness.ONLINE:
            return f"the node is {node.state} at the end of the window" + ("" if rebooted else
                                                                           " (it did not come back)")
        if ex.outage_at is not None and not rebooted:
            return (f"the node was not online throughout the window: it was lost at {iso(ex.outage_at)} and came "
                    f"back without a reboot (boot {node.boot})")
        since = ex.verify_from or 0
        if node.health == Health.UNHEALTHY or any(
                entry.get("kind") == "health" and entry.get("health") == Health.UNHEALTHY and entry["at"] >= since
                for entry in node.history):
            return "the node was unhealthy during the window"
        silent = self.now - node.last_seen
        if silent > HEARD_WITHIN_HEARTBEATS * node.hb * 1000:
            return f"nothing heard from the node for {silent / 1000:.1f} s (heartbeat every {node.hb:g} s)"
        return None

    # -- 3. rollbacks after an abort, nodes joining -----------------------------------------------------------------

    def undo_and_join(self) -> None:
        dep = self.dep
        for node in sorted(dep.undo - self.touched):
            ex = dep.executions[node]
            if ex.state != _E.SUCCEEDED:
                continue
            done = self.outcome(ex.run)[2] & self.spec.compensated
            problem = self.undo_problem(ex) or (None if done else "no step with a compensation ran")
            if problem is not None:
                self.change(node, _E.SUCCEEDED, f"not rolled back after the abort: {problem}")
                continue
            self.claimed.add((node, self.spec.component))
            rid = self.submit(node, rollback_spec(self.spec.workflow, node, done))
            self.change(node, _E.ROLLING_BACK, f"deployment aborted (--rollback on-abort): rolling back (run "
                                               f"{rid})", run=rid)
        if dep.joining and (dep.state != _D.SUCCEEDED or dep in self.deps.tracking()):
            for node in sorted(dep.joining - self.touched):
                self.change(node, _E.QUEUED, "joined the target", wave=dep.waves)

    def undo_problem(self, ex: Execution) -> str | None:
        """Why a succeeded node must not be rolled back now: it is no longer this deployment's (removed, or another
        deployment has updated it since, or is updating it), so undoing would undo someone else's version."""
        node = self.deps.nodes.get(ex.node)
        if node is None or node.removed:
            return "the node was removed"
        component, version = self.spec.component, node.versions.get(self.spec.component)
        if version != self.spec.version:
            return f"the node runs {component} {version or 'no version'} now, not {self.spec.version}"
        key = (ex.node, component)
        holder = self.deps.busy.get(key, self.dep.id)
        if holder != self.dep.id or key in self.claimed:
            return f"deployment {holder if holder != self.dep.id else 'another'} is updating {component} on it"
        return None

    # -- 4. the rollout --------------------------------------------------------------------------------------------

    def rollout(self) -> None:
        dep, spec, now = self.dep, self.spec, self.now
        if spec.cron and dep.next_fire is not None and now >= dep.next_fire:
            self.move(dep.state, f"fire at {iso(dep.next_fire)} skipped: round {dep.round} still running",
                      next_fire=next_fire(spec.cron, now))
            return
        reason = self.abort_reason()
        if reason is not None:
            self.move(_D.ABORTED, reason)
            return
        counts = dep.counts(dep.wave)
        if any(counts[s] for s in EXECUTION_LIVE):
            return
        done = sum(counts.values()) - counts[_E.REMOVED]
        succeeded = counts[_E.SUCCEEDED]
        later = [w for w in range(dep.wave + 1, dep.waves + 1) if sum(dep.counts(w).values())]
        if later:
            if done and succeeded * 100 < spec.waves.success * done:
                self.move(_D.ABORTED, f"aborted: wave {dep.wave}: {succeeded} of {done} succeeded, needs "
                                      f"{spec.waves.success:g}%")
            elif spec.waves.pause_between or dep.state == _D.PAUSED:
                self.move(_D.PAUSED, f"wave {dep.wave} done ({succeeded} of {done} succeeded): paused until "
                                     f"`deployments resume`; wave {later[0]} is next", wave=later[0])
            else:
                self.move(_D.RUNNING, f"wave {later[0]} started (wave {dep.wave}: {succeeded} of {done} succeeded)",
                          wave=later[0])
            return
        total = dep.counts()
        summary = f"{total[_E.SUCCEEDED]} of {sum(total.values()) - total[_E.REMOVED]} succeeded"
        if spec.cron:  # each round's nodes not at the version are the next round's: failures are tried again
            following = dep.next_fire if dep.next_fire is not None and dep.next_fire > now else next_fire(spec.cron,
                                                                                                         now)
            self.move(_D.SCHEDULED, f"round {dep.round} done ({summary}); next fire at "
                                    f"{iso(following) if following else 'never'}", next_fire=following)
            return
        unfinished = self.unfinished(total)
        if unfinished is None:
            self.move(_D.SUCCEEDED, f"done: {summary}")
        else:
            self.move(_D.ABORTED, unfinished)

    def failed(self) -> tuple[int, str]:
        """This round's executed failures of the abort type, and the word for them."""
        if self.spec.abort.type == "ALL":
            return sum(self.dep.failures.values()), "failed"
        kind, word = _ABORT_KINDS[self.spec.abort.type]
        return self.dep.failures[kind], word

    def abort_reason(self) -> str | None:
        abort, executed = self.spec.abort, self.dep.executed
        if abort.threshold is None or executed < abort.min_executed:
            return None
        failed, word = self.failed()
        if failed == 0 or failed * 100 < abort.threshold * executed:
            return None
        return (f"aborted: {failed} of {executed} executed ({_percent(failed, executed)}) {word}, threshold "
                f"{abort.threshold:g}%")

    def unfinished(self, total: collections.Counter[ExecutionState]) -> str | None:
        """Why a finished round is not a success (None: it is): an execution ended other than succeeded (removed
        and canceled ones aside), and no abort criterion the operator gave tolerates it (its threshold, judged on
        the final counts even below its minimum, was not reached)."""
        ended = sum(total.values()) - total[_E.REMOVED] - total[_E.CANCELED]
        bad = ended - total[_E.SUCCEEDED]
        if bad == 0:
            return None
        abort, executed = self.spec.abort, self.dep.executed
        if abort.threshold is None:
            why = "no abort criteria tolerate failures"
        else:
            failed, word = self.failed()
            if failed == 0 or failed * 100 < abort.threshold * executed:
                return None
            why = (f"{failed} of {executed} executed ({_percent(failed, executed)}) {word}, over --abort-threshold "
                   f"{abort.threshold:g}%")
        return f"finished with {bad} of {ended} executions not succeeded ({why})"

    # -- 5. starts -------------------------------------------------------------------------------------------------

    def starts(self) -> None:
        dep, spec, now = self.dep, self.spec, self.now
        if dep.state == _D.SUCCEEDED and dep not in self.deps.tracking():
            return
        spacing = spec.rate.spacing_ms(dep.notified, dep.succeeded)
        if spacing and dep.last_start is not None and now < dep.last_start + spacing:
            self.wake = dep.last_start + spacing
            return
        wave = dep.wave if dep.state == _D.RUNNING else dep.waves
        queued = sorted((ex for n, ex in dep.executions.items() if ex.state == _E.QUEUED and ex.wave <= wave
                         and n not in self.touched), key=lambda ex: ex.seq)
        active = dep.active
        for ex in queued:
            if spec.max_concurrent is not None and active >= spec.max_concurrent:
                return
            node = self.deps.nodes.get(ex.node)
            key = (ex.node, spec.component)
            if node is None or key in self.claimed or self.deps.busy.get(key, dep.id) != dep.id:
                continue  # deleted (the next pass ends it removed), or another deployment is updating the component
            if not self.windows.allow(spec.windows, node.labels):
                continue
            problem = self.rejection(node)  # judged when its turn comes: the node's version may have moved since
            if problem is not None:
                self.change(ex.node, _E.REJECTED, problem, failure="rejected")
                continue
            self.claimed.add(key)
            rid = self.submit(ex.node, pinned_spec(spec.workflow, ex.node))
            self.change(ex.node, _E.IN_PROGRESS, f"started (run {rid})", run=rid)
            active += 1
            if spacing:
                self.wake = now + spacing
                return

    def rejection(self, node: Node) -> str | None:
        """Why the node cannot take this version: an executor it lacks, or no migration from its version."""
        missing = sorted(self.spec.executors - node.caps)
        if missing:
            return f"the node lacks executor(s) {', '.join(missing)}"
        return migration_problem(node.versions.get(self.spec.component), self.spec.version, self.spec.migrates_from)
