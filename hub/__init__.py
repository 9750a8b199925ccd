"""The fleetflow hub: durable workflow state (event journal), placement, failure detection, HTTP API.

The pure core (`state.Core`, `scheduler`, `workflow`, `conditions`) does no I/O; `service.Hub` is the shell.
"""

__version__ = "0.1.0"
