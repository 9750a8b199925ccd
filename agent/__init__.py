"""The fleetflow agent: the process that runs on each device."""

__version__ = "0.1.0"
