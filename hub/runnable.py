"""Work that can never run: refused at submit, or failed with a clear reason instead of waiting or retrying forever.

Pure and deterministic (the clock is passed in), so the core decides with these rules and journal replay agrees:

- wire: a step whose assignment cannot be encoded under the protocol's limits (message size, CBOR nesting, container
  and text sizes) is refused at submit; one that still reaches placement (a journal written before this check)
  fails at once. The check encodes the real Assign with the real codec and opens it as a node would.
- fleet: a ready step that no known, non-removed node could ever take (none offers its executor, or none that does
  matches its selector and has its resources) fails after `grace`, so a run submitted just before the devices
  connect still runs. A node that is offline still counts: it may come back.
- unanswered: an assignment the node never answers is re-queued with the step's retry backoff and counted; the step
  fails after `max_unanswered` of them, naming the nodes. A node that died is the node-failure path's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import nacl.signing
from pydantic import BaseModel, ConfigDict, Field

from protocols import DEFAULT_MAX_SIZE, HUB_ID, Assign, ProtocolError, Signer, TooLarge, open_envelope
from protocols.cbor import MAX_DEPTH
from protocols.messages import UINT_MAX

from .events import AttemptLost, Event, StepUnrunnable
from .transitions import Liveness

if TYPE_CHECKING:
    from .fleet import Node
    from .runs import Attempt, StepRun
    from .state import Core
    from .workflow import Resources, Selector, Workflow

UNANSWERED_REASON = "the node did not answer the assignment"
AVOID_UNANSWERING_MS = 2_000  # after its backoff, a step skips the node that did not answer for this long


class UnrunnablePolicy(BaseModel):
    """The `unrunnable` section of the hub policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace: float = Field(30.0, ge=0, description="seconds a ready step may wait for the fleet to offer its executor "
                                                 "(and match its selector and resources) before it fails")
    max_unanswered: int = Field(5, ge=1, description="unanswered assignments of one step before it fails")


# -- wire ----------------------------------------------------------------------------------------------------------

# Any key will do: an Ed25519 signature has the same size whoever signs. The widest ids and counters the protocol
# allows make the probe at least as large as every real assignment of the step, on any node and at any fence.
_PROBE_KEY = nacl.signing.SigningKey(bytes(32))
_WIDEST_ID = "w" * 64
_PROBE_TTL_MS = 60_000
_CACHE_MAX = 4096
_checked: dict[int, tuple[dict[str, Any], str, float, str | None]] = {}


def assignment_problem(uses: str, with_: dict[str, Any], timeout: float) -> str | None:
    """Why an assignment with these fields can never reach a node, or None if it can.

    Seals the Assign with the hub's codec and opens it with the receiver's checks (size before parsing, CBOR profile,
    field checkers), so the verdict is the codec's own, never an estimate."""
    signer = Signer(_PROBE_KEY, _WIDEST_ID, HUB_ID, boot=UINT_MAX, seq=UINT_MAX - 1)
    body = Assign(_WIDEST_ID, _WIDEST_ID, _WIDEST_ID, UINT_MAX, uses, with_, timeout)
    try:
        out = signer.seal(body, UINT_MAX - _PROBE_TTL_MS, dst=_WIDEST_ID, ttl_ms=_PROBE_TTL_MS)
        open_envelope(out.payload, out.topic, _PROBE_KEY.verify_key, DEFAULT_MAX_SIZE)
    except TooLarge:
        return (f"the assignment would be {len(out.payload):,} bytes, over the {DEFAULT_MAX_SIZE:,}-byte message "
                "limit")
    except RecursionError:
        return _depth_problem(with_) or "nested too deeply"
    except ProtocolError as exc:
        return _depth_problem(with_) or str(exc)
    return None


def _depth_problem(with_: dict[str, Any]) -> str | None:
    """Name the first map or array the CBOR profile's depth limit refuses (the payload map is level 1)."""
    path = _too_deep(with_, 2, "with")
    if path is None:
        return None
    allowed = MAX_DEPTH - 2
    return f"field '{path[:200]}': nested too deeply (at most {allowed} levels of maps and arrays inside `with`)"


def _too_deep(value: Any, level: int, path: str) -> str | None:
    if isinstance(value, dict):
        items: Any = ((f".{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    if level > MAX_DEPTH:
        return path
    for part, item in items:
        found = _too_deep(item, level + 1, path + part)
        if found is not None:
            return found
    return None


def workflow_problems(workflow: Workflow) -> list[str]:
    """Every step (and compensation) whose assignment can never be sent; for_each instances send their step's
    `with`, so checking the step covers them."""
    problems = []
    for step in workflow.steps:
        problem = assignment_problem(step.uses, step.with_, step.timeout)
        if problem is not None:
            problems.append(f"step {step.id!r}: `with` cannot be sent: {problem}")
        comp = step.compensate
        if comp is not None:
            problem = assignment_problem(comp.uses, comp.with_, comp.timeout)
            if problem is not None:
                problems.append(f"step {step.id!r}: compensation `with` cannot be sent: {problem}")
    return problems


def cannot_send(step: StepRun) -> str | None:
    """The wire rule at placement, remembered per `with` object (steps of one workflow, and a for_each's
    instances, share theirs), so placing costs one encode per distinct step, not one per attempt."""
    spec = step.spec
    entry = _checked.get(id(spec.with_))
    if entry is None or entry[0] is not spec.with_ or entry[1] != spec.uses or entry[2] != spec.timeout:
        if len(_checked) >= _CACHE_MAX:
            del _checked[next(iter(_checked))]
        problem = assignment_problem(spec.uses, spec.with_, spec.timeout)
        entry = _checked[id(spec.with_)] = (spec.with_, spec.uses, spec.timeout, problem)
    return None if entry[3] is None else f"step {step.id} can never run: `with` cannot be sent: {entry[3]}"


# -- fleet ---------------------------------------------------------------------------------------------------------

class FleetOffer:
    """What the known fleet offers, built once per placement pass and only when a step has waited past the grace."""

    def __init__(self, core: Core) -> None:
        self.offering: dict[str, list[Node]] = {}
        for node in core.nodes.values():
            if not node.removed:
                for cap in node.caps:
                    self.offering.setdefault(cap, []).append(node)
        # One verdict per step spec (the steps of one workflow share theirs): a long backlog costs a lookup each.
        self._verdicts: dict[int, str | None] = {}

    def missing(self, step: StepRun) -> str | None:
        """Why no node in the fleet could ever take this step, or None."""
        spec = step.spec
        if id(spec) in self._verdicts:
            verdict = self._verdicts[id(spec)]
        else:
            verdict = self._verdicts[id(spec)] = self._judge(step)
        return None if verdict is None else f"step {step.id} can never run: {verdict}"

    def _judge(self, step: StepRun) -> str | None:
        from .scheduler import fits

        spec = step.spec
        nodes = self.offering.get(spec.uses)
        if not nodes:
            return f"no node in the fleet offers executor {spec.uses!r} (disabled or unknown)"
        selector, resources = spec.placement.selector, spec.resources
        none_used = {"cores": 0.0, "memory_mb": 0.0, "disk_gb": 0.0}
        if any(selector.matches(n.id, n.labels, n.profile, n.caps) and fits(step, n, none_used) for n in nodes):
            return None
        return (f"no node in the fleet that offers executor {spec.uses!r} matches its selector and has its "
                f"resources ({_describe(selector, resources)})")


def _describe(selector: Selector, resources: Resources) -> str:
    parts = [f"labels {selector.labels}" if selector.labels else "",
             f"profile {selector.profile!r}" if selector.profile else "",
             f"capabilities {selector.capabilities}" if selector.capabilities else "",
             f"nodes {selector.nodes}" if selector.nodes else "",
             *(f"{name} {need:g}" for name, need in resources.model_dump().items() if need)]
    return ", ".join(p for p in parts if p) or "none"


# -- unanswered ----------------------------------------------------------------------------------------------------

def unanswered(core: Core, attempt: Attempt, now: int) -> list[Event]:
    """An assignment nobody answered: lost, and counted against the step if its node is online and was heard from
    since (alive, yet it did not answer: it may be unable to read it). A node that went silent is the liveness
    path's business. The step fails once the count reaches the limit."""
    node = core.nodes.get(attempt.node)
    # Heard from since both the assignment and the hub's (re)start, when every node's last_seen is set to "now".
    counts = (node is not None and node.state == Liveness.ONLINE
              and node.last_seen > max(attempt.assigned_at, core.loaded_at))
    out: list[Event] = [AttemptLost(now, attempt.id, UNANSWERED_REASON, counts=False, unanswered=counts)]
    run = core.runs[attempt.run]
    step = run.steps[attempt.step]
    if counts and step.unanswered + 1 >= core.policy.unrunnable.max_unanswered:
        nodes = sorted({core.attempts[a].node for a in step.attempts
                        if a == attempt.id or core.attempts[a].reason == UNANSWERED_REASON})
        out.append(StepUnrunnable(now, run.id, step.id,
                                  f"step {step.id} failed: {step.unanswered + 1} assignments were not answered "
                                  f"(node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)})"))
    return out
