"""The hub's side of the wire protocol as a pure object: messages in, facts and sealed messages out.

`HubProtocol` does no I/O and reads no clock (h11's `Connection` is the model): the shell (hub/service.py) feeds it
each received `(topic, payload, at)` and the commands the core chose, and gets back typed values: the facts to
journal, the acknowledgements and replies owed, the senders whose replay marks moved, the enroll requests to put
to the registry, and finally the sealed, size-checked messages to publish. The journal, the registry files, the
broker session and the clock stay in the shell, so everything here can be driven by tests with any `now`.

It owns the receiver (signature and replay checks, and the clone watch that reads what the replay check refuses),
the signer, what the hub knows of each node beyond the journal (`NodeView`), the health tracker and the rebirth
bookkeeping. It reads the `Core`; its one write there is `Core.touch` (a node's last sighting, not journaled).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from protocols import (DEFAULT_MAX_SIZE, Ack, Assign, Birth, Cancel, Config, Death, Drain, Enroll, Heartbeat, Message,
                       Outgoing, ProtocolError, ReplayWindow, Signer, StepEvent, StepResult, Telemetry, kid_for)
from protocols.enrollment import check_enroll_proof

from .clones import CloneWatch
from .events import ActionTaken, Event, HealthChanged, NodeBorn, NodeDied, NodeSeen, ResultReported, StepReported
from .health import HealthTracker, Policy, Threshold
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES, Enrollment, EnrollPolicy, token_fingerprint
from .state import Command, Core, SendAssign, SendCancel, SendConfig, SendDrain
from .transitions import REACHABLE, Health

log = logging.getLogger("fleetflow.hub")

COMMAND_TTL_MS = 60_000
REBIRTH_EVERY_MS = 5000  # a live node the hub does not hold online is asked for a birth at most this often

Reply = tuple[str, Any]  # (node id, message body) sealed for that node by `outgoing`
ProfileThresholds = Callable[[str], dict[str, dict[str, float]]]  # a firmware profile's thresholds, by profile name


class Opened(NamedTuple):
    """A message an ingest worker verified and decoded, under the key `kid`; `late`: out of its sender's order. (This
    and `Ingested` are named tuples, not frozen dataclasses: one of each is built per message the hub takes in, and a
    tuple costs a third as much to build.)"""

    message: Message
    kid: bytes
    late: bool = False


@dataclass
class NodeView:
    """What the hub knows of a node beyond the journal: latest heartbeat and telemetry (not journaled)."""

    heartbeat: Heartbeat | None = None
    telemetry: dict[str, float] = field(default_factory=dict)
    telemetry_at: int = 0       # when `telemetry` was sampled, ms (0: no sample since the hub started)
    version: str | None = None  # the agent's version, from its latest birth


@dataclass(frozen=True)
class EnrollSettings:
    """The hub's enrollment settings (flags `--auto-accept`, `--enroll-token`, its uses, the pending cap)."""

    auto_accept: bool = False
    token: str | None = None
    token_uses: int = DEFAULT_TOKEN_USES
    max_pending: int = DEFAULT_MAX_PENDING


@dataclass(frozen=True)
class EnrollRequest:
    """An enroll request whose signature verified, with the token proof already judged: the registry decides it."""

    node: str
    body: Enroll
    at: int
    proof: bool | None  # None: no proof, or the hub has no token; else whether it verified for this id and key
    policy: EnrollPolicy


@dataclass(frozen=True)
class EnrollAnswer:
    """What a registry verdict calls for: the answer to send (none for the hub's own id) and whether the key is to be
    trusted now (the shell records that in the registry, then calls `HubProtocol.trust`)."""

    reply: Reply | None
    trust: bool


class Ingested(NamedTuple):
    """What one received message calls for. A refused message has `refused` set and nothing else."""

    facts: tuple[Event, ...] = ()
    acks: tuple[int, ...] = ()         # the sender's event ids to acknowledge
    replies: tuple[Reply, ...] = ()
    message: Message | None = None     # the verified message (observers and metrics read it)
    sender: str | None = None          # whose replay mark moved: made durable with the batch
    enroll: EnrollRequest | None = None
    refused: ProtocolError | None = None

    @property
    def born(self) -> str | None:
        """The node whose birth this is (its birth is not applied to the core until the batch is)."""
        return self.sender if self.message is not None and isinstance(self.message.body, Birth) else None


class HubProtocol:
    def __init__(self, core: Core, receiver: CloneWatch, signer: Signer, policy: Policy,
                 enrollment: EnrollSettings = EnrollSettings(), profile_thresholds: ProfileThresholds = lambda _: {},
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.core, self.receiver, self.signer, self.policy = core, receiver, signer, policy
        self.enrollment, self.profile_thresholds, self.max_size = enrollment, profile_thresholds, max_size
        self.tracker = HealthTracker(policy)
        self.views: dict[str, NodeView] = collections.defaultdict(NodeView)
        self.refused: collections.Counter[str] = collections.Counter()  # by reason, after the intake's screening
        self._rebirth_asked: dict[str, int] = {}
        self._thresholds: dict[str, dict[str, Threshold]] = {}  # by profile

    # -- inbound -------------------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, at: int, unapplied: AbstractSet[str] = frozenset()) -> Ingested:
        """One message that arrived at `at`. `unapplied`: nodes whose births came earlier in the same batch and are
        not applied to the core yet (they are not asked for another)."""
        try:
            message = self.receiver.receive(topic, payload, at)
        except ProtocolError as exc:
            self.refused[exc.reason] += 1
            return Ingested(refused=exc)
        return self._received(message, at, unapplied)

    def receive_opened(self, opened: Opened, payload: bytes, at: int,
                       unapplied: AbstractSet[str] = frozenset()) -> Ingested:
        """One message an ingest worker opened (hub/ingest/): the replay check is left, here where the windows are."""
        try:
            self.receiver.admit_verified(opened.message, opened.kid, payload, at, opened.late)
        except ProtocolError as exc:
            self.refused[exc.reason] += 1
            return Ingested(refused=exc)
        return self._received(opened.message, at, unapplied)

    def _received(self, message: Message, at: int, unapplied: AbstractSet[str]) -> Ingested:
        header, body = message.header, message.body
        node = header.src
        if isinstance(body, Enroll):
            return Ingested(message=message, enroll=self.enroll_request(node, body, at))
        replies: tuple[Reply, ...] = ()
        if not isinstance(body, (Birth, Death)) and node not in unapplied:
            replies = self._ask_rebirth(node, at)
        seen: list[Event] = [NodeSeen(at, node)] if self.core.touch(node, at) else []
        if isinstance(body, Heartbeat):
            self.views[node].heartbeat = body
        elif isinstance(body, Telemetry):
            view = self.views[node]
            view.telemetry, view.telemetry_at = dict(body.metrics), body.at or header.ts
        elif isinstance(body, Birth):
            self.views[node].version = body.version
        acks: tuple[int, ...] = ()
        facts: list[Event] = seen
        if isinstance(body, Telemetry):
            facts = seen + self._health(node, dict(body.metrics), at)
        elif isinstance(body, Birth):
            facts = [NodeBorn(at, node, header.boot, body.profile, dict(body.labels), tuple(body.caps), body.slots,
                              dict(body.resources), tuple(body.running), body.hb, body.tel)]
        elif isinstance(body, Death):
            facts = [NodeDied(at, node, header.boot, body.reason)]
        elif isinstance(body, StepEvent):
            acks = (body.eid,)
            if body.event != "progress":
                facts = seen + [StepReported(at, node, body.attempt, body.fence, body.event, body.reason)]
        elif isinstance(body, StepResult):
            acks = (body.eid,)
            facts = seen + [ResultReported(at, node, body.attempt, body.fence, body.ok, dict(body.output), body.error)]
        return Ingested(tuple(facts), acks, replies, message, node)

    def _ask_rebirth(self, node: str, at: int) -> tuple[Reply, ...]:
        """A node that is alive (it just sent a verified message) but that the hub does not hold online (declared
        failed during a stall, offline, or never seen because its birth was lost) is asked for a birth. Recovery is
        a protocol rule, not a reconnect: the birth lists its attempts and the hub cancels those it moved."""
        known = self.core.nodes.get(node)
        if known is not None and known.state in REACHABLE:
            return ()
        if at - self._rebirth_asked.get(node, -REBIRTH_EVERY_MS) < REBIRTH_EVERY_MS:
            return ()
        self._rebirth_asked[node] = at  # bounded: only enrolled senders get past the signature check
        log.info("node %s is alive but %s here: asking it for a birth", node,
                 known.state if known is not None else "unknown")
        return ((node, Config(rebirth=True)),)

    def _health(self, node_id: str, metrics: dict[str, float], at: int) -> list[Event]:
        """Classify a telemetry sample; health changes and the actions they call for become journal events."""
        node = self.core.nodes.get(node_id)
        if node is None:
            return []
        if self.core.overloaded and node.health == Health.HEALTHY:
            return []  # shedding load: only nodes already in trouble are followed closely
        thresholds = self._thresholds.get(node.profile)
        if thresholds is None:  # the policy and a profile's thresholds are fixed for the hub's life
            thresholds = self._thresholds[node.profile] = self.policy.thresholds_for(
                node.profile, self.profile_thresholds(node.profile))
        if node_id not in self.tracker.nodes:
            self.tracker.seed(node_id, node.health, node.throttled, list(thresholds))
        changes, actions = self.tracker.observe(node_id, metrics, thresholds, at)
        events: list[Event] = [HealthChanged(at, node_id, c.health, c.metric, c.value, c.threshold, c.duration,
                                             c.reason) for c in changes]
        events += [ActionTaken(at, node_id, a.action, a.reason) for a in actions]
        for action in actions:
            log.warning("node %s: %s (%s)", node_id, action.action, action.reason)
        return events

    # -- enrollment ----------------------------------------------------------------------------------------------

    def enroll_request(self, node: str, body: Enroll, at: int) -> EnrollRequest:
        """Judge the token proof (bound to this fleet, id and key, so a sniffed proof admits nothing else)."""
        settings, token = self.enrollment, self.enrollment.token
        proof = (None if token is None or body.proof is None
                 else check_enroll_proof(body.proof, token, self.signer.fleet, node, body.key))
        policy = EnrollPolicy(settings.auto_accept, token_fingerprint(token) if token else None, settings.token_uses,
                              settings.max_pending)
        return EnrollRequest(node, body, at, proof, policy)

    @staticmethod
    def answer_enroll(request: EnrollRequest, verdict: Enrollment) -> EnrollAnswer:
        """The registry's verdict on a request, as the node hears it. The hub's own id gets no answer: the hub does
        not command itself."""
        if verdict.verdict == "reserved":
            return EnrollAnswer(None, False)
        reply = (request.node, Ack((), verdict.verdict, kid_for(request.body.key)))
        return EnrollAnswer(reply, verdict.verdict == "accepted")

    def trust(self, node: str, key: bytes, fresh: bool) -> None:
        """Trust a node's accepted key. `fresh`: a key its replay state was not built with, so the node's boots may
        count from 1 again and its window starts afresh (the shell makes the fresh mark durable first)."""
        if fresh:
            self.receiver.windows[node] = ReplayWindow()
        self.receiver.keyring.add(node, key)

    def distrust(self, node: str) -> None:
        """Refuse the node's messages from now on (rejected, revoked, deleted)."""
        self.receiver.keyring.remove_owner(node)

    def forget(self, node: str) -> None:
        """A deleted node: nothing kept of it here."""
        self.views.pop(node, None)
        self.tracker.nodes.pop(node, None)
        self._rebirth_asked.pop(node, None)

    # -- outbound ------------------------------------------------------------------------------------------------

    def outgoing(self, commands: Iterable[Command], acks: Mapping[str, Sequence[int]], replies: Iterable[Reply],
                 now: int) -> list[Outgoing]:
        """The messages to publish for what the core decided, the events to acknowledge and the replies owed, each
        sealed for its node with an expiry. A message the node would drop unread (invalid, or over the size limit)
        is logged and left out: a bug of ours must not stop the hub."""
        bodies: list[Reply] = [(command.node, body) for command in commands
                               if (body := command_body(command)) is not None]
        bodies += [(node, Ack(tuple(eids))) for node, eids in acks.items()]
        bodies += replies
        sealed = []
        for node, body in bodies:
            try:
                out = self.signer.seal(body, now, dst=node, ttl_ms=COMMAND_TTL_MS)
            except ProtocolError as exc:
                log.error("not sending an invalid %s to %s: %s", type(body).__name__, node, exc)
                continue
            if len(out.payload) > self.max_size:  # an assignment never gets here (checked at submit and placement)
                log.error("not sending a %s of %d bytes to %s: over the %d-byte message limit", type(body).__name__,
                          len(out.payload), node, self.max_size)
                continue
            sealed.append(out)
        return sealed


def command_body(command: Command) -> Any:
    """The wire message for one of the core's commands."""
    if isinstance(command, SendAssign):
        return Assign(command.run, command.step, command.attempt, command.fence, command.uses, command.inputs,
                      command.timeout)
    if isinstance(command, SendCancel):
        return Cancel(tuple(command.refs), command.reason[:200])
    if isinstance(command, SendDrain):
        return Drain(command.on)
    if isinstance(command, SendConfig):
        return Config(None, command.tel)
    return None  # nothing this hub sends
