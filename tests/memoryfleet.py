"""The real hub and real agents in one process, on the in-memory broker (agent/runtime/memory.py) and virtual time
(sim/virtual_time.py), built as sim/dst.py builds them (sim/inprocess.py) without its seeded faults and checker: for
tests of the agent that need no process of its own (no signals, no exit codes). Sleeps are virtual, so a wait of a
minute costs no wall time.

    def test_something(tmp_path):
        async def scenario(fleet: MemoryFleet) -> None:
            fleet.start_agent("n1")
            await fleet.wait(lambda: fleet.online("n1"), 30, "n1 online")
            run_id = await fleet.submit(WORKFLOW)
            ...

        run_fleet(tmp_path, scenario)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.config import AgentConfig
from agent.node import Agent
from agent.runtime.memory import MemoryBroker, MemoryTransport
from agent.runtime.transport import Transport
from agent.telemetry import FixedSource
from hub.service import Hub, HubConfig
from hub.state import RUN_TERMINAL
from hub.workflow import workflow_from_data
from sim import virtual_time
from sim.inprocess import STEADY, memory_hub, unmeasured_policy, virtual_clock_ms
from tests.nodewire import NodeWire

T = TypeVar("T")
FLEET = "mem"
HUB = "hub"  # the hub's transport name and directory (agents use their node ids)
BROKER_URL = "mqtt://memory.invalid"  # never dialled: every process gets a MemoryTransport
POLL_S = 0.05
STOP_S = 60.0  # virtual seconds a process gets to stop cleanly (an agent waits up to 5 s for its last acks)


class MemoryFleet:
    """A hub (auto-accepting enrollments) on a perfect in-memory network; agents join with `start_agent`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.broker = MemoryBroker()
        config = HubConfig(broker=BROKER_URL, fleet=FLEET, data=root / HUB, auto_accept=True,
                           policy=unmeasured_policy())
        (root / HUB).mkdir(parents=True, exist_ok=True)
        self.hub: Hub = memory_hub(config, MemoryTransport(self.broker, HUB), virtual_clock_ms)
        self.agents: dict[str, Agent] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {
            HUB: asyncio.get_running_loop().create_task(self.hub.run(api=False, first_connection_required=False))}

    def start_agent(self, node: str, transport: Transport | None = None, **settings: Any) -> Agent:
        """A real agent with its own data directory under the fleet's root; `settings` are AgentConfig fields."""
        config = AgentConfig(broker=BROKER_URL, fleet=FLEET, node_id=node, data=self.root / node,
                             hub_key=self.hub.public_key, **settings)
        agent = Agent(config, transport=transport or MemoryTransport(self.broker, node),
                      telemetry=FixedSource(**STEADY), clock_ms=virtual_clock_ms)
        self.agents[node] = agent
        self._tasks[node] = asyncio.get_running_loop().create_task(agent.run(), name=node)
        return agent

    def wire(self, node: str) -> NodeWire:
        """What `node` sent and was sent, read from the broker's log of everything that reached it."""
        return NodeWire(lambda: [(r.topic, r.payload) for r in self.broker.wire if r.reached], FLEET, node,
                        lambda: self.agents[node].identity.public_key)

    def online(self, node: str) -> bool:
        known = self.hub.core.nodes.get(node)
        return known is not None and known.state == "online"

    async def submit(self, workflow: dict[str, Any]) -> str:
        """Submit a workflow (as data) through the hub, as its API does; returns the run id."""
        run_id, _ = await self.hub.submit(workflow_from_data(workflow), {}, None)
        return run_id

    def finished(self, run_id: str) -> str | None:
        """The run's terminal state, or None while it goes on."""
        state = self.hub.core.runs[run_id].state
        return str(state) if state in RUN_TERMINAL else None

    async def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """The predicate's first truthy value, checked every 50 ms of virtual time; AssertionError naming `what`
        after `timeout` virtual seconds, or at once when a process ended on an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self._check_processes()
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout} virtual seconds waiting for {what}")
            await asyncio.sleep(POLL_S)

    def _check_processes(self) -> None:
        for name, task in self._tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{name} ended on an error") from task.exception()

    async def close(self) -> None:
        """Stop every agent, then the hub, as SIGTERM would; each must end within STOP_S virtual seconds."""
        for agent in self.agents.values():
            agent.stop()
        agents = [task for name, task in self._tasks.items() if name != HUB]
        await asyncio.wait_for(asyncio.gather(*agents, return_exceptions=True), STOP_S)
        self.hub.stop()
        await asyncio.wait_for(asyncio.gather(self._tasks[HUB], return_exceptions=True), STOP_S)
        self._check_processes()


def run_fleet(root: Path, scenario: Callable[[MemoryFleet], Awaitable[T]]) -> T:
    """Run `scenario` against a fresh fleet on a virtual-time loop; any error the loop reports fails the test."""
    errors: list[str] = []

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    async def main() -> T:
        fleet = MemoryFleet(root)
        try:
            result = await scenario(fleet)
        except BaseException:
            with contextlib.suppress(Exception):  # the scenario's own failure is the one to report
                await fleet.close()
            raise
        await fleet.close()
        return result

    result = virtual_time.run(main(), on_error=on_error)
    assert not errors, f"the event loop reported errors: {errors}"
    return result
