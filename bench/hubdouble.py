"""The hub's side of the protocol, alone, for benchmarks that measure the agent without the hub's own costs
(dispatch.py, agent.py): it verifies what agents send, accepts enrollments, acknowledges events and results (both
switchable), publishes its retained state, sends signed commands, and keeps every verified message and refusal.
Tests run the real hub instead (tests/hubprocess.py, tests/memoryfleet.py).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import nacl.signing

from agent.runtime.clock import now_ms
from protocols import (HUB_ID, Ack, Body, HubState, Keyring, Message, ProtocolError, Receiver, Signer, StepEvent,
                       StepResult)
from tests.brokers import HOST, Broker

NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass
class Seen:
    topic: str
    message: Message
    at: float = field(default_factory=time.monotonic)


class HubDouble:
    def __init__(self, broker: Broker, fleet: str, key: nacl.signing.SigningKey | None = None,
                 auto_accept: bool = True, auto_ack: bool = True, boot: int = 1) -> None:
        self.broker, self.fleet = broker, fleet
        self.key = key or nacl.signing.SigningKey.generate()
        # A restarted hub must use a newer boot, or the agents' persisted replay windows refuse it.
        self.signer = Signer(self.key, fleet, HUB_ID, boot=boot)
        self.receiver = Receiver(fleet, Keyring())
        self.auto_accept, self.auto_ack = auto_accept, auto_ack
        self.seen: list[Seen] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._acks: dict[str, list[int]] = collections.defaultdict(list)
        self._ack_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[Any]] = set()

    @property
    def public_key_hex(self) -> str:
        return bytes(self.key.verify_key).hex()

    async def __aenter__(self) -> HubDouble:
        self._client = aiomqtt.Client(HOST, self.broker.port, identifier=f"hubdouble-{self.fleet}",
                                      max_inflight_messages=1000, socket_options=NO_DELAY)
        await self._client.__aenter__()
        await self._client.subscribe(f"fleetflow/v1/{self.fleet}/node/+/+", qos=1)
        state = self.signer.seal(HubState(True, bytes(self.key.verify_key), "test"), now_ms())
        await self._client.publish(state.topic, state.payload, qos=1, retain=True)
        self._task = asyncio.create_task(self._read())
        self._ack_task = asyncio.create_task(self._ack_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self._task, self._ack_task, *self._sends):
            if task:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, self._ack_task, *self._sends) if t), return_exceptions=True)
        if self._client:
            try:
                await self._client.publish(f"fleetflow/v1/{self.fleet}/hub/state", b"", qos=1, retain=True)
            except aiomqtt.MqttError:
                pass
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self._client is not None
        async for raw in self._client.messages:
            topic = str(raw.topic)
            if topic.endswith("/cmd"):
                continue
            try:
                message = self.receiver.receive(topic, bytes(raw.payload), now_ms())  # type: ignore[arg-type]
            except ProtocolError as exc:
                self.refused[exc.reason] += 1
                self._changed.set()
                continue
            self.seen.append(Seen(topic, message))
            body = message.body
            node = message.header.src
            if message.header.type == "enroll" and self.auto_accept:
                self.receiver.keyring.add(node, body.key)  # type: ignore[attr-defined]
                await self.send(node, Ack((), "accepted"))
            elif isinstance(body, (StepEvent, StepResult)) and self.auto_ack:
                self._acks[node].append(body.eid)  # batched like the real hub, never awaited here
            self._changed.set()

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(0.002)
            if self._acks:
                batch, self._acks = self._acks, collections.defaultdict(list)
                await asyncio.gather(*(self.send(node, Ack(tuple(eids))) for node, eids in batch.items()))

    def send_nowait(self, node: str, body: Body, ttl_ms: int = 30_000) -> None:
        """Publish without waiting for the broker's acknowledgement (keeps a high offered rate steady)."""
        task = asyncio.create_task(self.send(node, body, ttl_ms))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def send(self, node: str, body: Body, ttl_ms: int = 30_000) -> Any:
        assert self._client is not None
        out = self.signer.seal(body, now_ms(), dst=node, ttl_ms=ttl_ms)
        await self._client.publish(out.topic, out.payload, qos=1)
        return out

    async def publish_raw(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload, qos=1)

    def of(self, kind: str, node: str | None = None) -> list[Message]:
        return [s.message for s in self.seen
                if s.message.header.type == kind and (node is None or s.message.header.src == node)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
        """Wait until predicate() is truthy (re-checked on every message and at least every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; refused so far: "
                                     f"{dict(self.refused)}; seen: {[s.message.header.type for s in self.seen][-30:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(0.2, remaining))
            except asyncio.TimeoutError:
                pass

    def results(self, node: str | None = None) -> list[StepResult]:
        return [m.body for m in self.of("result", node)]  # type: ignore[misc]

    def events(self, node: str | None = None, event: str | None = None) -> list[StepEvent]:
        return [m.body for m in self.of("step", node)  # type: ignore[misc]
                if event is None or m.body.event == event]  # type: ignore[attr-defined]
