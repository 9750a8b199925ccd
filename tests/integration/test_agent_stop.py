"""A stop asked while the agent is still connecting: a broker that accepts TCP and then stays silent (overloaded, or
behind a proxy whose far side is cut) must not hold the stop for the transport's timeout, which is as long as
`docker stop` waits before SIGKILL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.node import Agent
from agent.runtime import transport
from agent.runtime.transport import BrokerSettings, MqttTransport


def test_a_stop_while_connecting_ends_the_attempt_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The operation timeout made practically endless: an agent that waits the attempt out never ends (the bound below
    # fails the test), one that ends it on the stop is unaffected.
    monkeypatch.setattr(transport, "OPERATION_TIMEOUT_S", 3600.0)

    async def scenario() -> None:
        accepted = asyncio.Event()
        closed = asyncio.Event()
        received = bytearray()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            while chunk := await reader.read(4096):  # never answers; reads until the agent closes its side
                received.extend(chunk)
            closed.set()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = f"mqtt://127.0.0.1:{port}"
        config = AgentConfig(broker=url, fleet="f", node_id="n1", data=tmp_path / "n1", hub_key=bytes(32))
        agent = Agent(config, transport=MqttTransport(BrokerSettings(url, keepalive=5)))
        try:
            running = asyncio.create_task(agent.run())
            await asyncio.wait_for(accepted.wait(), 30)
            for _ in range(300):  # bounded: until the CONNECT is in, so the attempt waits for its CONNACK
                if received:
                    break
                await asyncio.sleep(0.1)
            assert received[:1] == b"\x10", "the agent sent its CONNECT"
            agent.stop()
            await asyncio.wait_for(running, 60)
            assert agent.session is None
            await asyncio.wait_for(closed.wait(), 30)  # the attempt's socket is closed
        finally:
            server.close()

    asyncio.run(scenario())
