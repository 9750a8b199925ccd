"""The fleetflow hub: durable workflow state (event journal), placement, failure detection, HTTP API.

The pure core (the state reducer, `scheduler`, `workflow`, `conditions`, `health`) does no I/O; `service.Hub` is the
shell. Other packages (the simulator, tests, benchmarks) use the names below; they load on first use, so importing
`hub` for its version costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .errors import OperatorError
    from .health import Policy
    from .journal import Journal
    from .service import Hub, HubConfig
    from .state import Core
    from .workflow import Workflow, WorkflowError, load_workflow

__all__ = ["Core", "Hub", "HubConfig", "Journal", "OperatorError", "Policy", "Workflow", "WorkflowError",
           "load_workflow", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Hub", "HubConfig"):
        from . import service

        return getattr(service, name)
    if name == "Core":
        from .state import Core

        return Core
    if name == "Journal":
        from .journal import Journal

        return Journal
    if name == "OperatorError":
        from .errors import OperatorError

        return OperatorError
    if name == "Policy":
        from .health import Policy

        return Policy
    if name in ("Workflow", "WorkflowError", "load_workflow"):
        from . import workflow

        return getattr(workflow, name)
    raise AttributeError(f"module 'hub' has no attribute {name!r}")
