"""The real hub as one process of a simulated world: on the in-memory broker (agent/runtime/memory.py), on the
loop's thread, reading the loop's (virtual) clock. sim/dst.py builds its worlds from these; tests/memoryfleet.py
runs the real hub and agents the same way for the agent's tests. Nothing here imports the checker."""

from __future__ import annotations

import asyncio

from agent.runtime.clock import Clock
from agent.runtime.memory import MemoryTransport
from hub.health import Policy, SelfProtection
from hub.service import Hub, HubConfig
from hub.state import Core

EPOCH_MS = 1_700_000_000_000   # the simulated wall clock at loop time 0
STEADY = {"cpu": 20.0, "mem": 30.0, "disk": 40.0, "temp": 45.0}  # healthy on every profile: health is not under test


def virtual_clock_ms() -> int:
    """The simulated wall clock, ms since the epoch: EPOCH_MS at loop time 0."""
    return EPOCH_MS + round(asyncio.get_running_loop().time() * 1000)


def unmeasured_policy() -> Policy:
    """The hub's policy in a simulated world. Its load monitor reads the real process (CPU, commit time), which is
    outside that world, so those limits are put out of reach; its event-loop lag is virtual, and exact."""
    return Policy(self_protection=SelfProtection(cpu_percent=1e9, journal_commit_ms=1e9))


def memory_hub(config: HubConfig, transport: MemoryTransport, clock: Clock, core_class: type[Core] = Core) -> Hub:
    """The real hub on an in-memory transport, all on the loop's thread; its core of `core_class` (a test's subclass
    of Core, planting a bug)."""
    hub = Hub(config, transport=transport, clock=clock)
    transport.incoming = lambda maxsize=0: hub.intake  # as Hub does for MqttTransport
    hub.journal.inline = True  # no writer thread: its timing would make the history unrepeatable
    if core_class is not Core:
        recast(hub.core, core_class)
    return hub


def recast(core: Core, core_class: type[Core]) -> None:
    """Make `core` (as the hub loaded it from its journal: the hub builds its own, and everything in it holds that
    one object) behave as an instance of `core_class` from now on: its class, and its event handlers, which Core binds
    to itself once, in `__init__`, so a handler the subclass overrides would otherwise never be called. The subclass's
    own `__init__` does not run: a planted bug keeps no state of its own."""
    core.__class__ = core_class
    handlers = core._handlers  # the one table of bound methods the new class must take over
    for kind, handler in handlers.items():
        if getattr(handler, "__self__", None) is core:  # Core's own methods; the halves' (core.work, core.fleet) stay
            handlers[kind] = getattr(core, handler.__name__)
