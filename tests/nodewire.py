"""What one node sent and what it was told, as a third party reading the broker sees it: every message verified with
the sender's public key, in arrival order.

The same reader serves a real broker (tests/wire.py `Observer`) and the in-memory one (its wire log), so agent tests
judge the agent from the wire, not from the hub's view of it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from protocols import Death, Heartbeat, Message, ProtocolError, Receiver, StepEvent, StepResult, open_envelope
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.wire import Observer

Source = Callable[[], Sequence[tuple[str, bytes]]]  # (topic, payload) of everything seen so far, oldest first


@dataclass(frozen=True)
class Command:
    """A command on the node's topic, verified with the hub's key, with its raw bytes (so a test can replay it)."""

    topic: str
    payload: bytes
    message: Message


class NodeWire:
    """The messages of node `node` in `source`. Its own messages go through one `Receiver` (signature, topic and
    replay checks, as the hub does), so a message the hub would refuse shows up in `refused`. `key` gives the node's
    public key; it is read at the first message that needs it (a node makes its key on first start)."""

    def __init__(self, source: Source, fleet: str, node: str, key: Callable[[], bytes]) -> None:
        self._source, self.node, self._key = source, node, key
        self._prefix = f"fleetflow/v1/{fleet}/node/{node}/"
        self._receiver = Receiver(fleet)
        self._read = 0
        self.seen: list[Message] = []
        self.refused: collections.Counter[str] = collections.Counter()

    def _update(self) -> None:
        messages = self._source()
        for topic, payload in messages[self._read:]:
            if not topic.startswith(self._prefix) or topic.endswith("/cmd"):
                continue
            if not len(self._receiver.keyring) and not topic.endswith("/enroll"):
                self._receiver.keyring.add(self.node, self._key())
            try:
                self.seen.append(self._receiver.receive(topic, payload, 0))
            except ProtocolError as exc:
                self.refused[exc.reason] += 1
        self._read = len(messages)

    def of(self, kind: str) -> list[Message]:
        """The node's messages of one type (enroll, birth, death, hb, tel, step, result), oldest first."""
        self._update()
        return [m for m in self.seen if m.header.type == kind]

    def kinds(self) -> list[str]:
        self._update()
        return [m.header.type for m in self.seen]

    def results(self) -> list[StepResult]:
        return [m.body for m in self.of("result") if isinstance(m.body, StepResult)]

    def events(self, event: str | None = None) -> list[StepEvent]:
        return [m.body for m in self.of("step")
                if isinstance(m.body, StepEvent) and (event is None or m.body.event == event)]

    def heartbeats(self) -> list[Heartbeat]:
        return [m.body for m in self.of("hb") if isinstance(m.body, Heartbeat)]

    def deaths(self) -> list[tuple[int, Death]]:
        """(boot, death certificate), oldest first."""
        return [(m.header.boot, m.body) for m in self.of("death") if isinstance(m.body, Death)]

    def commands(self, hub_key: bytes) -> list[Command]:
        """What was published on the node's command topic and verifies as the hub's (forgeries are left out)."""
        out = []
        for topic, payload in self._source():
            if topic == self._prefix + "cmd":
                try:
                    out.append(Command(topic, payload, open_envelope(payload, topic, hub_key)))
                except ProtocolError:
                    continue
        return out


@contextlib.contextmanager
def observed(broker: Broker, agent: AgentProcess) -> Iterator[NodeWire]:
    """The agent's topics on a real broker, watched from a connection of their own from now until the end."""
    observer = Observer(broker, f"fleetflow/v1/{agent.fleet}/node/{agent.node_id}/#")
    try:
        yield NodeWire(lambda: list(observer.messages), agent.fleet, agent.node_id, agent.public_key)
    finally:
        observer.close()
