"""The agent against real brokers: enrollment, birth, heartbeats, telemetry, death on kill -9 and on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path


from protocols import Assign, Birth, Heartbeat, Telemetry
from tests.brokers import Broker
from tests.hubdouble import AgentProcess, HubDouble


def agent_for(broker: Broker, tmp_path: Path, hub: HubDouble, node: str = "n1", *args: str) -> AgentProcess:
    return AgentProcess(broker, hub.fleet, node, tmp_path / node / "data", hub.public_key_hex,
                        ("--heartbeat", "0.5", "--telemetry", "0.5", *args))


def test_enroll_birth_heartbeat_telemetry_and_kill9_death(broker: Broker, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with HubDouble(broker, "f-session") as hub:
            agent = agent_for(broker, tmp_path, hub).start()
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                assert hub.of("enroll", "n1"), "the agent enrolled before its birth"
                birth = hub.of("birth", "n1")[0]
                assert isinstance(birth.body, Birth) and birth.body.profile == "container"
                assert {"noop", "echo", "sleep", "fail"} <= set(birth.body.caps)
                assert "shell" not in birth.body.caps  # dangerous executors are off by default
                await hub.wait_for(lambda: len(hub.of("hb", "n1")) >= 2 and hub.of("tel", "n1"), 15, "hb and tel")
                hb = hub.of("hb", "n1")[-1].body
                assert isinstance(hb, Heartbeat) and hb.free == birth.body.slots
                tel = hub.of("tel", "n1")[-1].body
                assert isinstance(tel, Telemetry) and {"cpu", "mem", "rss_mb"} <= set(tel.metrics)
                boot = birth.header.boot
                killed = time.monotonic()
                agent.kill()
                death = await hub.wait_for(lambda: hub.of("death", "n1"), 10, "death certificate")
                assert time.monotonic() - killed < 2.0
                assert death[0].body.reason == "lost" and death[0].header.boot == boot  # type: ignore[attr-defined]
                assert not hub.refused
            finally:
                agent.stop()

    asyncio.run(scenario())


def test_sigterm_finishes_the_step_then_dies_cleanly(broker: Broker, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with HubDouble(broker, "f-term") as hub:
            agent = agent_for(broker, tmp_path, hub).start()
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                await hub.send("n1", Assign("r1", "s1", "r1.s1.1", 1, "sleep", {"seconds": 1.0}, 30))
                await hub.wait_for(lambda: hub.events("n1", "started"), 10, "started")
                agent.signal(signal.SIGTERM)
                assert await agent.wait_exit(20) == 0
                results = hub.results("n1")
                assert [r.attempt for r in results] == ["r1.s1.1"] and results[0].ok
                deaths = hub.of("death", "n1")
                assert len(deaths) == 1 and deaths[0].body.reason == "shutdown"  # type: ignore[attr-defined]
                # the result was delivered before the death
                order = [s.message.header.type for s in hub.seen if s.message.header.type in ("result", "death")]
                assert order == ["result", "death"]
            finally:
                agent.stop()

    asyncio.run(scenario())
