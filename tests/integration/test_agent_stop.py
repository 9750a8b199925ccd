"""A stop asked while the agent is still connecting, waiting for its subscriptions to be confirmed, or asking to enroll
over the enrollment login: a broker that accepts TCP and then stays silent (overloaded, or behind a proxy whose far
side is cut) must not hold the stop for the transport's timeout, which is as long as `docker stop` waits before
SIGKILL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.node import Agent
from agent.runtime import transport
from agent.runtime.transport import BrokerSettings, MqttTransport


ACCEPT, REFUSE = b"\x20\x02\x00\x00", b"\x20\x02\x00\x05"  # CONNACK: accepted; refused, not authorized


class SilentBroker:
    """Accepts TCP and reads; the n-th CONNECT gets `connacks[n]` if there is one, and nothing else is ever answered
    (no SUBACK, no PUBACK). `connects` counts the CONNECTs in; `open` the connections the agent has not closed."""

    def __init__(self, *connacks: bytes) -> None:
        self.connacks, self.connects, self.open = connacks, 0, 0
        self.packets: list[bytes] = []  # the first byte of each later read: the packet types the agent sent
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def wait(self, condition: Callable[[], bool]) -> None:
        async def until() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), 30)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        first = await reader.read(4096)
        if first[:1] == b"\x10":  # a CONNECT
            if self.connects < len(self.connacks):
                writer.write(self.connacks[self.connects])
            self.connects += 1
        self.changed.set()
        while data := await reader.read(4096):  # until the agent closes its side
            self.packets.append(data[:1])
            self.changed.set()
        self.open -= 1
        self.changed.set()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def agent_for(url: str, tmp_path: Path, **settings: Any) -> Agent:
    config = AgentConfig(broker=url, fleet="f", node_id="n1", data=tmp_path / "n1", hub_key=bytes(32), **settings)
    return Agent(config, transport=MqttTransport(BrokerSettings(url, keepalive=5)))


@pytest.fixture(autouse=True)
def endless_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The operation timeout made practically endless: an agent that waits an attempt out never ends (the bounds below
    # fail the test), one that ends it on the stop is unaffected.
    monkeypatch.setattr(transport, "OPERATION_TIMEOUT_S", 3600.0)


def stopped_while(broker: SilentBroker, tmp_path: Path, ready: Callable[[], bool], **settings: Any) -> None:
    """Run an agent against `broker`, stop it once `ready()`, and check it ends, its sockets closed, with no error
    reported to the event loop (a callback raising on the way out)."""
    async def scenario() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        agent = agent_for(await broker.start(), tmp_path, **settings)
        try:
            running = asyncio.create_task(agent.run())
            await broker.wait(ready)
            agent.stop()
            await asyncio.wait_for(running, 60)
            assert agent.session is None
            await broker.wait(lambda: broker.open == 0)
            await asyncio.sleep(0)  # callbacks the closing sockets scheduled
            assert not errors, errors
        finally:
            broker.close()

    asyncio.run(scenario())


def test_a_stop_while_connecting_ends_the_attempt_at_once(tmp_path: Path) -> None:
    broker = SilentBroker()  # the CONNECT is never answered
    stopped_while(broker, tmp_path, lambda: broker.connects == 1)


def test_a_stop_while_subscribing_ends_the_attempt_at_once(tmp_path: Path) -> None:
    broker = SilentBroker(ACCEPT)  # connected, and the SUBSCRIBE is never answered
    stopped_while(broker, tmp_path, lambda: b"\x82" in broker.packets)


def test_a_stop_while_asking_to_enroll_ends_the_request_at_once(tmp_path: Path) -> None:
    broker = SilentBroker(REFUSE)  # the node's own login refused; the enrollment login's CONNECT never answered
    stopped_while(broker, tmp_path, lambda: broker.connects == 2, enroll_username="enroll",
                  enroll_password="a-long-secret")
