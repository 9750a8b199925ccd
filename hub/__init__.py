"""The fleetflow hub: durable workflow state (event journal), placement, failure detection, HTTP API.

The pure core (the state reducer, `scheduler`, `workflow`, `conditions`, `health`) does no I/O; `service.Hub` is the
shell. Other packages (the simulator, tests, benchmarks) use the names below; they load on first use, so importing
`hub` for its version costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import HubConfig
    from .errors import OperatorError
    from .health import Policy
    from .journal import Journal
    from .service import Hub
    from .state import Core
    from .workflow import Workflow, WorkflowError, load_workflow

__all__ = ["Core", "Hub", "HubConfig", "Journal", "OperatorError", "Policy", "Workflow", "WorkflowError",
           "load_workflow", "__version__"]


# The module each name above lives in, imported when the name is first asked for.
_HOMES = {"Core": "state", "Hub": "service", "HubConfig": "config", "Journal": "journal", "OperatorError": "errors",
          "Policy": "health", "Workflow": "workflow", "WorkflowError": "workflow", "load_workflow": "workflow"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
