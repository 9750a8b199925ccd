"""Sparkplug B 3.0 bridge: the hub as a Sparkplug Edge Node, each fleetflow node one of its Devices (README.md).

`EdgeNode` is the pure protocol object (no I/O, no clock); `SparkplugBridge` runs it over its own MQTT connection
inside the hub. Settings and `bridge_for` import no protobuf: the rest is loaded on first use, so a hub without
--sparkplug never needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .settings import DEFAULT_DEADBAND, DEFAULT_GROUP, NoBridge, SparkplugSettings, bridge_for

if TYPE_CHECKING:
    from .bridge import SparkplugBridge
    from .codec import REASONS
    from .edge import DeviceView, DrainRequest, EdgeConfig, EdgeNode, Output, Publish, Refusal

__all__ = ["DEFAULT_DEADBAND", "DEFAULT_GROUP", "REASONS", "DeviceView", "DrainRequest", "EdgeConfig", "EdgeNode",
           "NoBridge", "Output", "Publish", "Refusal", "SparkplugBridge", "SparkplugSettings", "bridge_for"]

_LAZY = {"SparkplugBridge": ".bridge", "REASONS": ".codec", "DeviceView": ".edge", "DrainRequest": ".edge",
         "EdgeConfig": ".edge", "EdgeNode": ".edge", "Output": ".edge", "Publish": ".edge", "Refusal": ".edge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
