"""The agent's side of the protocol as a pure object, in the style of h11's `Connection`.

`AgentProtocol` is fed what arrived, `receive(topic, payload, now)`, and returns typed outputs saying what follows
from it: run or cancel work, drain, new intervals, acknowledged outbox entries, an enrollment verdict, a new birth,
hub keys to persist, a replay window to save, a refusal to count and log. It builds what the agent sends (birth,
heartbeat, enroll request, telemetry, outbox entries, the death certificate) as sealed `Outgoing` messages.

It never does I/O and never reads a clock: `now` is always an argument, so the same inputs give the same outputs
in a unit test, in a deterministic simulation, and on a device. The asyncio shell (`node.Agent`) moves the bytes,
runs the loops, and applies the outputs to the runner, the outbox, the identity files and the log.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.signing

from protocols import (HUB_ID, Ack, Assign, AttemptRef, Birth, Body, Cancel, Config, Drain, Enroll, Heartbeat,
                       HubState, Keyring, Outgoing, ProtocolError, Receiver, ReplayWindow, Signer, Telemetry, Topic,
                       WrongTopic, body_from_map, kid_for)
from protocols.enrollment import enroll_proof

# -- outputs: what the shell must do --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAssign:
    """The hub assigned a step: hand it to the runner (which may still refuse it, and reports why)."""
    assign: Assign


@dataclass(frozen=True, slots=True)
class CancelAttempts:
    refs: tuple[AttemptRef, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class SetDrain:
    on: bool


@dataclass(frozen=True, slots=True)
class SetIntervals:
    """The intervals now in force (persist them, and wake the loops that sleep on them)."""
    hb: float
    tel: float


@dataclass(frozen=True, slots=True)
class Acked:
    """The hub holds these outbox entries: they may be deleted."""
    eids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Enrolled:
    kid: bytes


@dataclass(frozen=True, slots=True)
class EnrollRefused:
    """Not (yet) enrolled: `pending` (an operator must accept), `taken` (the id has another key), `rejected`."""
    verdict: str
    kid: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    """Authentic, but not about this process (a verdict on another key that uses the same node id)."""
    detail: str


@dataclass(frozen=True, slots=True)
class PublishBirth:
    why: str


@dataclass(frozen=True, slots=True)
class PinHubKey:
    """Trust on first use: the first hub state seen named this key, and it now commands this node."""
    key: bytes


@dataclass(frozen=True, slots=True)
class SwitchHubKey:
    """The hub signs with its announced next key now; `retired` is trusted no longer."""
    key: bytes
    retired: bytes


@dataclass(frozen=True, slots=True)
class TrustNextHubKey:
    """A hub key rotation under way: `signed_by`, a key this node trusts, announced `key`."""
    key: bytes
    signed_by: bytes


@dataclass(frozen=True, slots=True)
class SaveHubWindow:
    """The replay window of hub commands after an accepted command (a snapshot, not the live window)."""
    window: ReplayWindow


@dataclass(frozen=True, slots=True)
class HubSeen:
    """A verified hub state: the hub is online or offline."""
    online: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """A message that was dropped; `source` is `cmd` or `hub_state`, `reason` one of `protocols.REASONS`."""
    source: str
    reason: str
    detail: str


Output = (RunAssign | CancelAttempts | SetDrain | SetIntervals | Acked | Enrolled | EnrollRefused | Ignored
          | PublishBirth | PinHubKey | SwitchHubKey | TrustNextHubKey | SaveHubWindow | HubSeen | Refused)


# -- inputs the builders need ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What a birth and an enroll request say about the node that does not change while the agent runs."""
    profile: str
    version: str
    labels: Mapping[str, str]
    caps: tuple[str, ...]
    slots: int
    resources: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Load:
    """The figures a heartbeat reports, read from the runner and the outbox at the moment it is sent."""
    running: int
    free: int
    outbox: int
    shed: int
    draining: bool


@dataclass(frozen=True, slots=True)
class HubTrust:
    """The hub keys and replay window a node starts with, as its identity and outbox kept them."""
    key: bytes | None  # None only with trust on first use, until a hub state arrives
    next_key: bytes | None = None
    window: ReplayWindow | None = None


class AgentProtocol:
    """One node's protocol state: signer, hub keyring and replay window, enrollment, and the rebirth bookkeeping.

    A session starts with `new_session(boot)`; a birth built with `birth()` answers the newest hub state seen so
    far. A hub state online that is newer than what the last birth answered asks for a new birth (protocol section
    8a, Sparkplug's host rule), but only once this session's first birth is built: that birth answers it anyway.
    """

    def __init__(self, key: nacl.signing.SigningKey, fleet: str, node_id: str, *, boot: int, hub: HubTrust,
                 facts: NodeFacts, intervals: tuple[float, float], enrolled: bool = False,
                 enroll_token: str | None = None) -> None:
        self.signer = Signer(key, fleet, node_id, boot=boot)
        self.facts = facts
        self.hub_key = hub.key
        self.hub_next_key = hub.next_key
        # The pinned hub key, and during a hub key rotation the next key the hub announced (protocol section 7.2).
        keyring = Keyring([(HUB_ID, k) for k in (hub.key, hub.next_key) if k])
        self.receiver = Receiver(fleet, keyring, node_id=node_id, windows={HUB_ID: hub.window} if hub.window else {})
        self.hub_state_topic = Topic.hub_state(fleet).value
        self.cmd_topic = Topic.node(fleet, node_id, "cmd").value
        self.enrolled = enrolled
        # The token never leaves the device: the request carries a MAC bound to this fleet, node id and key.
        self.enroll_proof = (enroll_proof(enroll_token, fleet, node_id, self.signer.public_key)
                             if enroll_token else None)
        self.hb_interval, self.tel_interval = intervals
        self.rejected: collections.Counter[str] = collections.Counter()
        self._hub_seen: tuple[int, int] | None = None   # (boot, seq) of the newest hub state online seen
        self._birth_for: tuple[int, int] | None = None  # the hub state the last birth answered
        self._birth_built = False                       # this session's first birth is built

    @property
    def kid(self) -> bytes:
        return self.signer.kid

    @property
    def boot(self) -> int:
        return self.signer.boot

    def new_session(self, boot: int) -> None:
        """A new MQTT session with a new (already persisted) boot: seq starts again, and a first birth is due."""
        self.signer.new_boot(boot)
        self._birth_built = False

    # -- receiving --------------------------------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, now: int) -> list[Output]:
        """One message from a subscribed topic (this node's commands or the retained hub state)."""
        if topic == self.hub_state_topic:
            return self._hub_state(topic, payload)
        if topic != self.cmd_topic:  # another topic (a broad subscription or ACL): its checks are not the ones here
            return [self._refused("cmd", WrongTopic(f"not this node's command topic: {topic[:120]!r}"))]
        try:
            message = self.receiver.receive(topic, payload, now)
        except ProtocolError as exc:
            return [self._refused("cmd", exc)]
        window = dataclasses.replace(self.receiver.windows[HUB_ID])
        return [SaveHubWindow(window), *self._command(message.body)]

    def _refused(self, source: str, exc: ProtocolError) -> Refused:
        self.rejected[exc.reason] += 1
        return Refused(source, exc.reason, str(exc))

    def _command(self, body: Body) -> list[Output]:
        if isinstance(body, Assign):
            return [RunAssign(body)]
        if isinstance(body, Ack):
            out: list[Output] = [Acked(body.eids)] if body.eids else []
            if body.enroll is not None:
                out += self._enroll_verdict(body.enroll, body.kid)
            return out
        if isinstance(body, Cancel):
            return [CancelAttempts(body.attempts, body.reason)]
        if isinstance(body, Drain):
            return [SetDrain(body.on)]
        if isinstance(body, Config):
            self.hb_interval = body.hb or self.hb_interval
            self.tel_interval = body.tel or self.tel_interval
            out = [SetIntervals(self.hb_interval, self.tel_interval)]
            if body.rebirth:
                out += self._rebirth("the hub asked for it (it does not hold this node online)")
            return out
        return []

    def _enroll_verdict(self, verdict: str, kid: bytes | None) -> list[Output]:
        mine = self.signer.kid
        if kid is not None and kid != mine:
            # Another process asked for this node id with another key; the verdict is about that key, not ours.
            return [Ignored(f"an enroll verdict ({verdict}) about kid {kid.hex()}")]
        if verdict == "accepted":
            if self.enrolled:
                return []
            self.enrolled = True
            return [Enrolled(mine)]
        if verdict == "pending" and self.enrolled:
            return []  # a late answer to a request sent before the acceptance
        return [EnrollRefused(verdict, mine)]

    def _hub_state(self, topic: str, payload: bytes) -> list[Output]:
        # The retained state is delivered again on every subscribe, so it is verified but not replay-checked.
        out: list[Output] = []
        try:
            if self.hub_key is None:  # trust on first use: the shell refuses to start without it otherwise
                key = self.receiver.hub_key_from_state(topic, payload)
                self.hub_key = key
                self.receiver.keyring.add(HUB_ID, key)
                out.append(PinHubKey(key))
            message, signed_by = self.receiver.open_hub_state(topic, payload)
        except ProtocolError as exc:
            return [*out, self._refused("hub_state", exc)]
        state = message.body
        if not isinstance(state, HubState):
            return out
        out += self._follow_hub_keys(signed_by, state)
        out.append(HubSeen(state.online))
        stamp = (message.header.boot, message.header.seq)
        if state.online and (self._hub_seen is None or stamp > self._hub_seen):
            self._hub_seen = stamp
            # A hub that comes (back) online asks every node for a birth, as a Sparkplug host does: it may have
            # missed ours (it restarted, or we reconnected to a restarted broker before it did).
            if self._birth_for is None or stamp > self._birth_for:
                out += self._rebirth(f"the hub came online (boot {stamp[0]})")
        return out

    def _follow_hub_keys(self, signed_by: bytes, state: HubState) -> list[Output]:
        """A hub key rotation (protocol section 7.2), from a verified hub state: a state signed by the announced next
        key means the hub switched (the old key is retired, no longer trusted); a next key announced by a key this
        node trusts is trusted too. The shell persists both, so a restart with the old --hub-key keeps following."""
        out: list[Output] = []
        current = self.hub_key
        if current is not None and signed_by != current:
            self.receiver.keyring.remove(kid_for(current))
            self.hub_key, self.hub_next_key = signed_by, None
            out.append(SwitchHubKey(signed_by, current))
        announced = state.next_key
        if announced is None or announced in (self.hub_key, self.hub_next_key):
            return out
        if self.hub_next_key is not None:  # only the newest announcement of the current key counts
            self.receiver.keyring.remove(kid_for(self.hub_next_key))
        self.hub_next_key = announced
        self.receiver.keyring.add(HUB_ID, announced)
        out.append(TrustNextHubKey(announced, signed_by))
        return out

    def _rebirth(self, why: str) -> list[Output]:
        return [PublishBirth(why)] if self._birth_built else []

    # -- building what the agent sends ------------------------------------------------------------------------------

    def birth(self, running: tuple[AttemptRef, ...], outbox: int, now: int) -> Outgoing:
        """This session's birth, answering the newest hub state seen so far."""
        facts = self.facts
        body = Birth(facts.profile, facts.version, dict(facts.labels), facts.caps, running, outbox, facts.slots,
                     self.hb_interval, self.tel_interval, dict(facts.resources))
        self._birth_for = self._hub_seen
        self._birth_built = True
        return self.signer.seal(body, now)

    def heartbeat_body(self, load: Load) -> Heartbeat:
        return Heartbeat(load.running, load.free, load.outbox, load.shed, dict(self.rejected), load.draining)

    def heartbeat(self, load: Load, now: int) -> Outgoing:
        return self.signer.seal(self.heartbeat_body(load), now)

    def enroll_request(self, now: int, broker_password: str | None = None) -> Outgoing:
        """`broker_password`: only over the shared enrollment login, whose ACL lets no client but the hub read it."""
        body = Enroll(self.signer.public_key, self.facts.profile, dict(self.facts.labels), self.enroll_proof,
                      broker_password)
        return self.signer.seal(body, now)

    def telemetry(self, metrics: dict[str, float], now: int, at: int | None = None) -> Outgoing:
        """A telemetry sample; `at` is when it was taken, if it was kept in the outbox before being sent."""
        return self.signer.seal(Telemetry(metrics, at), now)

    def outbox_entry(self, type_name: str, fields: dict[str, Any], eid: int, now: int) -> Outgoing:
        """A step event or result from the outbox, sent (again) under its outbox id until the hub acknowledges it."""
        return self.signer.seal(body_from_map(type_name, {**fields, "eid": eid}), now)

    def death_certificate(self, now: int, reason: str = "lost") -> Outgoing:
        """The Last Will of this boot (reason `lost`), or the death a graceful stop publishes (`shutdown`)."""
        return self.signer.death_certificate(now, reason)
