"""Two devices that share one identity (a cloned SD card: the same key, node id and boot counter), detected from
the messages the hub's replay check refuses (docs/protocol.md section 8a).

Each device counts boots from its own copy of the identity, so the hub sees one sender whose messages come from two
boot sequences. The replay window keeps the newest boot and refuses the other device's messages as `replayed`. A
refusal alone proves nothing (a broker redelivers, an attacker replays what it recorded), so only two kinds count as
evidence, both judged here, where messages are verified:

- older boot, signed later: a live message refused because its boot is older than the sender's current boot, yet
  signed (its `ts`) after the first message the hub accepted from that current boot. One device never signs for an
  older boot once it has started a newer one, and a replayed message keeps the time it was signed at.
- one seq, two contents: a birth refused because its boot and seq were already received, whose bytes differ from the
  birth accepted with that boot and seq. One device signs one message per (boot, seq); a broker's duplicate is the
  same bytes (Ed25519 signatures are deterministic).

Evidence becomes a `NodeConflict` fact, at most one per node per REPORT_EVERY_MS, journaled and applied like any
other, and the core marks the node (hub/state.py). Nothing here answers the devices: the hub never makes them
reconnect, so the two boot counters do not drive each other up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocols import Birth, Death, Message, Receiver, Replayed, UnknownKey, cbor, envelope
from protocols.messages import decode_payload

from .ingest.reorder import ArrivedLate, would_accept

from .events import NodeConflict

if TYPE_CHECKING:
    from .service import Hub

log = logging.getLogger("fleetflow.hub")

REPORT_EVERY_MS = 60_000  # a conflict that goes on is journaled again at most this often (it keeps `last` fresh)
POLL_S = 1.0


@dataclass(frozen=True)
class Evidence:
    node: str
    boot: int          # the boot of the refused message
    current: int       # the sender's current boot at the hub
    reason: str
    at: int


@dataclass
class CloneWatch(Receiver):
    """The hub's receiver, which also looks at what the replay check refuses. The bookkeeping is per enrolled sender
    (only messages with a valid signature get this far) and is not journaled: after a restart it starts again."""

    started: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)  # sender -> (boot, first ts, kid)
    births: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)  # sender -> (boot, seq, digest)
    found: dict[str, Evidence] = field(default_factory=dict)                 # waiting to be journaled
    reported: dict[str, int] = field(default_factory=dict)                   # sender -> when last journaled

    def receive(self, topic: str, data: bytes, now_ms: int) -> Message:
        try:
            message = super().receive(topic, data, now_ms)
        except Replayed:
            self._refused(data, now_ms)  # the signature was verified before the replay check refused it
            raise
        self._note(message, data)
        return message

    def admit_verified(self, message: Message, kid: bytes, data: bytes, now_ms: int, late: bool = False) -> None:
        """The rest of `receive` for a message an ingest worker opened (hub/ingest/): the key must still be trusted
        (it may have been revoked meanwhile), then the replay check. `late`: the reorder buffer released it out of
        order; it is never accepted, but a replay among such messages is refused and read as above."""
        trusted = self.keyring.get(kid)
        if trusted is None or trusted.owner != message.header.src:
            raise UnknownKey(f"kid {kid.hex()} is no longer trusted for {message.header.src!r}")
        try:
            if late and would_accept(self.windows.get(message.header.src), message):
                raise ArrivedLate(f"seq {message.header.seq} of boot {message.header.boot} arrived after later "
                                  f"messages of its sender were applied")
            self.admit(message)
        except Replayed:
            self._refused(data, now_ms)
            raise
        self._note(message, data, kid)

    def _note(self, message: Message, data: bytes, kid: bytes | None = None) -> None:
        header = message.header
        boot, first, kid_seen = self.started.get(header.src, (-1, 0, b""))
        if header.boot > boot:  # once per boot: the kid tells a re-keyed node (it starts at boot 1) from a clone
            self.started[header.src] = (header.boot, header.ts, kid or envelope.parse(data, self.max_size).kid)
        elif header.boot == boot and header.ts < first:
            self.started[header.src] = (boot, header.ts, kid_seen)
        if isinstance(message.body, Birth):
            self.births[header.src] = (header.boot, header.seq, hashlib.blake2b(data, digest_size=16).digest())

    def _refused(self, data: bytes, now_ms: int) -> None:
        parsed = envelope.parse(data, self.max_size)
        message = decode_payload(cbor.loads(parsed.payload))
        header = message.header
        if isinstance(message.body, Death):
            return  # signed before its session started: its time says nothing about which boot came first
        current, first, kid = self.started.get(header.src, (-1, 0, b""))
        reason = None
        if header.boot < current and header.ts > first and parsed.kid == kid:
            reason = f"a {header.type} of boot {header.boot} was signed after boot {current} began"
        elif isinstance(message.body, Birth):
            boot, seq, digest = self.births.get(header.src, (-1, -1, b""))
            if (boot, seq) == (header.boot, header.seq) and digest != hashlib.blake2b(data, digest_size=16).digest():
                reason = f"two different births were signed for boot {header.boot} seq {header.seq}"
        if reason is not None and header.src not in self.found:
            self.found[header.src] = Evidence(header.src, header.boot, max(current, header.boot), reason, now_ms)

    def take(self, now_ms: int) -> list[Evidence]:
        """Evidence to journal now: at most one per node per REPORT_EVERY_MS; the rest waits."""
        due = [e for e in self.found.values() if now_ms - self.reported.get(e.node, -REPORT_EVERY_MS) >= REPORT_EVERY_MS]
        for evidence in due:
            del self.found[evidence.node]
            self.reported[evidence.node] = now_ms
        return due


async def report_conflicts(hub: Hub, watch: CloneWatch) -> None:
    """Journal the evidence the receiver found; one log line when a node enters conflict."""
    while True:
        await asyncio.sleep(POLL_S)
        for evidence in watch.take(hub.clock()):
            node = hub.core.nodes.get(evidence.node)
            if node is None:
                continue  # never born here: nothing to mark (its first birth starts the bookkeeping)
            if node.conflict is None:
                log.error("node %s: two devices use this identity (%s); stop one and give it its own data directory "
                          "and node id (docs/operations.md, troubleshooting)", evidence.node, evidence.reason)
            await hub.request([NodeConflict(evidence.at, evidence.node, evidence.boot, evidence.current,
                                            evidence.reason)])
