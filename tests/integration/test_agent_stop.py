"""A stop asked while the agent is still connecting, or still asking to enroll over the enrollment login: a broker
that accepts TCP and then stays silent (overloaded, or behind a proxy whose far side is cut) must not hold the stop
for the transport's timeout, which is as long as `docker stop` waits before SIGKILL."""

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


class SilentBroker:
    """Accepts TCP and reads; answers the first `refuse` CONNECTs with CONNACK 5 (not authorized), then never answers.
    `connects` counts the CONNECTs in; `open` the connections the agent has not closed yet."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse, self.connects, self.open = refuse, 0, 0
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
            self.connects += 1
            if self.connects <= self.refuse:
                writer.write(b"\x20\x02\x00\x05")
        self.changed.set()
        while await reader.read(4096):  # until the agent closes its side
            pass
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


def test_a_stop_while_connecting_ends_the_attempt_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = SilentBroker()
        agent = agent_for(await broker.start(), tmp_path)
        try:
            running = asyncio.create_task(agent.run())
            await broker.wait(lambda: broker.connects == 1)  # the CONNECT is in: the attempt waits for its CONNACK
            agent.stop()
            await asyncio.wait_for(running, 60)
            assert agent.session is None
            await broker.wait(lambda: broker.open == 0)  # the attempt's socket is closed
        finally:
            broker.close()

    asyncio.run(scenario())


def test_a_stop_while_asking_to_enroll_ends_the_request_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = SilentBroker(refuse=1)  # the node's own login refused; the enrollment login's CONNECT not answered
        agent = agent_for(await broker.start(), tmp_path, enroll_username="enroll", enroll_password="a-long-secret")
        try:
            running = asyncio.create_task(agent.run())
            await broker.wait(lambda: broker.connects == 2)
            agent.stop()
            await asyncio.wait_for(running, 60)
            await broker.wait(lambda: broker.open == 0)
        finally:
            broker.close()

    asyncio.run(scenario())
