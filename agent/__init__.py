"""The fleetflow agent: the process that runs on each device.

Other packages (the simulator, tests) use the agent through the names below. They load on first use: the
`fleetflow` command imports this package and must start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import AgentConfig, load_config
    from .executors import StepContext, StepFailed
    from .identity import KEY_FILE
    from .node import Agent
    from .outbox import Entry as OutboxEntry
    from .outbox import Outbox
    from .telemetry import FixedSource

__all__ = ["KEY_FILE", "Agent", "AgentConfig", "FixedSource", "Outbox", "OutboxEntry", "StepContext", "StepFailed",
           "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from .node import Agent

        return Agent
    if name in ("AgentConfig", "load_config"):
        from . import config

        return getattr(config, name)
    if name in ("StepContext", "StepFailed"):
        from . import executors

        return getattr(executors, name)
    if name == "FixedSource":
        from .telemetry import FixedSource

        return FixedSource
    if name in ("Outbox", "OutboxEntry"):  # the disk outbox, and one of its entries (what a checker reads back)
        from . import outbox

        return outbox.Outbox if name == "Outbox" else outbox.Entry
    if name == "KEY_FILE":  # the node key's file name in the data directory
        from .identity import KEY_FILE

        return KEY_FILE
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
