"""The agent's loops that outlive a session: telemetry. A failure there stops the agent (crash-only: its process
exits 70 and the service manager restarts it); a full disk only costs telemetry samples, never the agent."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.node import Agent
from agent.runtime.transport import Session, TransportError, Will
from agent.telemetry import FixedSource
from sim import virtual_time
from sim.inprocess import STEADY, virtual_clock_ms


class BrokenSensors:
    def sample(self) -> dict[str, float]:
        raise RuntimeError("the sensor bus is gone")


class NoBroker:
    """A broker that is never reachable: the agent stays offline and keeps its telemetry in the outbox."""

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str, will: Will | None) -> AsyncIterator[Session]:
        raise TransportError("connection refused")
        yield  # pragma: no cover


def agent(tmp_path: Path, **kwargs: Any) -> Agent:
    config = AgentConfig(broker="mqtt://memory.invalid", fleet="f", node_id="n1", data=tmp_path / "n1",
                         hub_key=bytes(32), telemetry=1.0)
    return Agent(config, transport=NoBroker(), clock_ms=virtual_clock_ms, **kwargs)


def test_a_failing_telemetry_loop_stops_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="sensor bus"):
            await asyncio.wait_for(agent(tmp_path, telemetry=BrokenSensors()).run(), 60)

    virtual_time.run(scenario())


def test_a_full_disk_drops_telemetry_and_the_agent_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = agent(tmp_path, telemetry=FixedSource(**STEADY))
        tries: list[int] = []

        def full(body: dict[str, Any], at_ms: int) -> bool:
            tries.append(at_ms)
            raise sqlite3.OperationalError("database or disk is full")

        node.outbox.add_telemetry = full  # type: ignore[method-assign]
        task = asyncio.get_running_loop().create_task(node.run())
        await asyncio.sleep(10)  # virtual seconds: ten telemetry intervals
        assert len(tries) >= 5 and not task.done()  # every sample tried, none fatal
        node.stop()
        await asyncio.wait_for(task, 60)

    virtual_time.run(scenario())
